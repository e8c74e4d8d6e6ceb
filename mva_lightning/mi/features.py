"""Paired features of two value vectors, one tensor per adapted module.

Value i is the one being trained: its features carry gradient (through A_i). Value j is
frozen, or it is "the other" value of a pair in the joint schedule; its features are detached
so that a penalty MI(theta_i, theta_j) moves theta_i only.
Features are computed in fp32 whatever the adapters' dtype (the released code casts to float).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mva_lightning.model.lora import LoraFactors

WEIGHT_FEATURES = ("lora_a",)


def _check_modules(
    factors_i: Mapping[str, LoraFactors], factors_j: Mapping[str, LoraFactors]
) -> None:
    if factors_i.keys() != factors_j.keys():
        raise ValueError(
            f"value vectors adapt different modules: {sorted(factors_i)} vs {sorted(factors_j)}"
        )
    if not factors_i:
        raise ValueError("no adapted modules: expected LoRA factors for at least one module")


def lora_features(
    factors_i: Mapping[str, LoraFactors],
    factors_j: Mapping[str, LoraFactors],
    kind: str,
    detach_y: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Features read from the weights alone (no inputs needed).

    Args:
        factors_i: Module name -> factors of the trainable value i (gradient flows).
        factors_j: Module name -> factors of value j (detached), same modules.
        kind: ``lora_a``: the r rows of A are the paired samples, x[m] = A_i (r, d_in), as the
            paper's code does.
        detach_y: Detach value j's features (sequential schedule: j is frozen). The joint
            schedule passes False so that the penalty moves both vectors.

    Returns:
        (x, y): module name -> features of value i and of value j, rows paired.

    Raises:
        ValueError: unknown ``kind`` (``activations`` needs :func:`activation_features`), or the
            two values adapt different modules or have different shapes.
    """
    if kind not in WEIGHT_FEATURES:
        hint = "; use activation_features for 'activations'" if kind == "activations" else ""
        raise ValueError(
            f"lora_features: kind must be one of {WEIGHT_FEATURES}, got {kind!r}{hint}"
        )
    _check_modules(factors_i, factors_j)
    x: dict[str, torch.Tensor] = {}
    y: dict[str, torch.Tensor] = {}
    for m, fi in factors_i.items():
        fj = factors_j[m]
        if fi.A.shape != fj.A.shape or fi.B.shape != fj.B.shape:
            raise ValueError(
                f"LoRA factors at {m}: value i has A {tuple(fi.A.shape)}, B {tuple(fi.B.shape)}; "
                f"value j has A {tuple(fj.A.shape)}, B {tuple(fj.B.shape)}"
            )
        x[m] = fi.A.float()  # (r, d_in)
        y[m] = fj.A.float()  # (r, d_in)
        if detach_y:
            y[m] = y[m].detach()
    return x, y


def activation_features(
    inputs: Mapping[str, torch.Tensor],
    factors_i: Mapping[str, LoraFactors],
    factors_j: Mapping[str, LoraFactors],
    max_samples: int,
    generator: torch.Generator | None = None,
    detach_y: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-token low-rank projections u = A_i h, v = A_j h of the same hidden states h.

    The hidden states are detached: the penalty reaches value i only through A_i at each
    module, not through the representations that earlier layers (and their adapters) produce.

    Args:
        inputs: Module name -> hidden states entering that module, (N_tokens, d_in), already
            restricted to real (non-padding) tokens. Every module named here needs factors.
        factors_i: Module name -> factors of the trainable value i.
        factors_j: Module name -> factors of value j (its features are detached).
        max_samples: Keep at most this many tokens per module, drawn without replacement;
            x and y keep the same rows, so the pairing survives.
        generator: Source of the subsampling permutation (None: the global RNG).
        detach_y: Detach value j's projections (False in the joint schedule).

    Returns:
        (x, y): module name -> (n, r) projections of value i and of value j, n <= max_samples.

    Raises:
        ValueError: modules without factors, non-2-D inputs, d_in mismatch, max_samples < 1.
    """
    if max_samples < 1:
        raise ValueError(f"activation_features: max_samples must be >= 1, got {max_samples}")
    _check_modules(factors_i, factors_j)
    missing = [m for m in inputs if m not in factors_i]
    if missing:
        raise ValueError(f"hidden states given for modules without LoRA factors: {missing}")
    if not inputs:
        raise ValueError("activation_features: no hidden states given")
    x: dict[str, torch.Tensor] = {}
    y: dict[str, torch.Tensor] = {}
    for m, h in inputs.items():
        a_i, a_j = factors_i[m].A, factors_j[m].A  # (r, d_in) each
        if h.dim() != 2 or h.shape[1] != a_i.shape[1] or a_i.shape != a_j.shape:
            raise ValueError(
                f"activation features at {m}: hidden states {tuple(h.shape)}, A_i "
                f"{tuple(a_i.shape)}, A_j {tuple(a_j.shape)}; expected (N, d_in) and (r, d_in)"
            )
        n = h.shape[0]
        if n > max_samples:
            device = generator.device if generator is not None else torch.device("cpu")
            rows = torch.randperm(n, generator=generator, device=device)[:max_samples]
            h = h[rows.to(h.device)]
        h = h.detach().float()  # (n, d_in)
        x[m] = h @ a_i.float().T  # (n, r): u = A_i h per token
        y[m] = h @ (a_j.detach() if detach_y else a_j).float().T  # (n, r): v = A_j h
    return x, y
