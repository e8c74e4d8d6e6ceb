"""Interference diagnostics between value vectors: cosine similarity and an MI estimate.

The paper plots the cosine similarity between value vectors (per adapted module, flattened
delta W = s B A), with and without the decorrelation penalty. We add an MI estimate between
them, on the same features the ``mi=mine`` penalty uses by default:

    u = A_i h,  v = A_j h   (r-dim, one sample per real token),

with h the hidden state entering each adapted module when the BASE model (w = 0, every adapter
off) reads held-out batches. Using the base model gives every pair the same inputs, whichever
adapter is being compared. A fresh MINE head is trained on the (u, v) samples of all modules,
standardised per module and pooled (:func:`mva_lightning.mi.estimate_mi`); the number is the
Donsker-Varadhan bound in nats (a lower bound on I(U; V), near 0 for independent features).

Pure functions; :class:`mva_lightning.diagnostics.callback.InterferenceDiagnostics` runs them
at the end of training and writes/logs the result.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mva_lightning.io import atomic_path
from mva_lightning.mi import MINE, check_pairs, estimate_mi
from mva_lightning.model import lora

ALL_MODULES = "(all modules)"
FEATURES_NOTE = (
    "u = A_i h, v = A_j h per token; h = hidden state entering each adapted module under the "
    "base model (w = 0) on held-out batches; u, v standardised per module and coordinate; "
    "MINE (Donsker-Varadhan bound, nats) pooled over modules"
)


@dataclass
class PairInterference:
    """Diagnostics of one pair of value vectors.

    Attributes:
        value_a: First value (earlier in training order).
        value_b: Second value.
        cosine: Module name -> cos(flat delta W_a, flat delta W_b) (0 where either is zero).
        mi: MINE estimate of I(A_a h; A_b h) in nats, pooled over modules (None: not computed).
        mi_per_module: Module name -> the same estimate per module (empty unless asked for).
    """

    value_a: str
    value_b: str
    cosine: dict[str, float]
    mi: float | None = None
    mi_per_module: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``<a>-<b>``, the suffix of the logged scalars."""
        return f"{self.value_a}-{self.value_b}"

    @property
    def mean_cosine(self) -> float:
        """Mean of the per-module cosines."""
        return sum(self.cosine.values()) / len(self.cosine)

    @property
    def mean_abs_cosine(self) -> float:
        """Mean of the per-module |cosine|."""
        return sum(abs(c) for c in self.cosine.values()) / len(self.cosine)


def short_name(module: str) -> str:
    """PEFT's qualified module name without the wrapper prefix (``base_model.model.``)."""
    return module.removeprefix("base_model.model.")


def value_pairs(values: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair (a, b), a before b in ``values``."""
    return list(itertools.combinations(values, 2))


def cosine_table(model: nn.Module, values: Sequence[str]) -> list[PairInterference]:
    """Per-module cosine similarity of flattened delta W for every pair of value vectors."""
    if len(values) < 2:
        raise ValueError(f"interference diagnostics need at least two values, got {list(values)}")
    out = []
    for a, b in value_pairs(values):
        cos = lora.cosine_similarity(model, a, b)
        out.append(PairInterference(a, b, {short_name(m): c for m, c in cos.items()}))
    return out


@torch.no_grad()
def base_projections(
    model: nn.Module,
    values: Sequence[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_tokens: int = 4096,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-token projections A_v h of the hidden states h entering every adapted module, when
    the base model (w = 0) reads ``batches``.

    Only the r-dim projections leave the device (not h itself: at 7B scale h of one batch at
    every module would take gigabytes).

    Args:
        model: The policy from :func:`lora.add_value_vectors`; its weights and train/eval mode
            are restored afterwards.
        values: Value vectors to project with.
        batches: Dicts with ``input_ids`` and ``attention_mask``, (S, T) each, on the model's
            device (e.g. collated ``[chosen; rejected]`` batches).
        max_tokens: Keep at most this many real tokens (the same rows for every module and
            value, so that u and v stay paired).
        seed: Seeds the subsampling.

    Returns:
        value -> module name -> (N, r) projections of the real (non-padding) tokens, fp32, CPU.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    factors = {v: lora.lora_factors(model, v) for v in values}
    layers = [
        (name, layer) for name, layer in lora.lora_layers(model) if name in factors[values[0]]
    ]
    store: dict[str, dict[str, list[torch.Tensor]]] = {
        v: {name: [] for name, _ in layers} for v in values
    }
    current: dict[str, torch.Tensor] = {}
    adapted = {name for name, _ in layers}

    def project(name: str, h: torch.Tensor) -> None:
        if name not in adapted:
            return
        h = h[current["mask"]].float()  # (N_batch, d_in), real tokens only
        for v in values:
            a = factors[v][name].A.float()  # (r, d_in)
            store[v][name].append((h @ a.T).cpu())  # (N_batch, r): A_v h

    was_training = model.training
    model.eval()
    try:
        with lora.using_weights(model, {}), lora.capture_inputs(model, project):
            for batch in batches:
                current["mask"] = batch["attention_mask"].bool()  # (S, T)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        model.train(was_training)
    if not current:
        raise ValueError("base_projections: no batches given")
    out = {v: {m: torch.cat(chunks) for m, chunks in mods.items()} for v, mods in store.items()}
    n = next(iter(out[values[0]].values())).shape[0]
    if n > max_tokens:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens]
        out = {v: {m: t[rows] for m, t in mods.items()} for v, mods in out.items()}
    return out


def activation_mi(
    u: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    steps: int = 300,
    hidden: int = 32,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    per_module: bool = False,
) -> tuple[float, dict[str, float]]:
    """MINE estimate of I(U; V) in nats, pooled over modules (and per module if asked).

    Each module's u and v are standardised per coordinate (zero mean, unit variance over the
    tokens) before pooling. The MI of a module is invariant to that; a MINE head with a fixed
    budget of steps is not, and LoRA can shrink A while B grows (delta W = s B A unchanged),
    which would otherwise read as "less MI".

    Args:
        u: Module name -> (N_m, r) projections A_a h of one value (:func:`base_projections`).
        v: Module name -> (N_m, r) projections A_b h of the other, rows paired with ``u``.
        steps: Adam steps of the fresh MINE head.
        hidden: Width of the head's hidden layers.
        lr: Its learning rate.
        batch_size: Samples per head step.
        seed: Seeds the head's init and minibatches.
        per_module: Also train one head per module (costs one estimate per module).

    Returns:
        (pooled estimate, module short name -> estimate; empty unless ``per_module``).
    """
    check_pairs(dict(u), dict(v))
    x = {m: standardize(t.float()) for m, t in u.items()}
    y = {m: standardize(t.float()) for m, t in v.items()}
    r = next(iter(x.values())).shape[1]
    head = MINE(r, r, hidden=hidden)
    kw = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    pooled = estimate_mi(head, torch.cat(list(x.values())), torch.cat(list(y.values())), **kw)
    modules = {}
    if per_module:
        modules = {short_name(m): estimate_mi(head, x[m], y[m], **kw) for m in x}
    return pooled, modules


def standardize(z: torch.Tensor) -> torch.Tensor:
    """(n, d) -> per-column zero mean, unit variance (constant columns become 0)."""
    centred = z - z.mean(dim=0, keepdim=True)
    std = centred.pow(2).mean(dim=0, keepdim=True).sqrt()
    return centred / torch.where(std > 0, std, torch.ones_like(std))


def interference(
    model: nn.Module,
    values: Sequence[str],
    projections: Mapping[str, Mapping[str, torch.Tensor]] | None,
    mine_steps: int = 300,
    mine_hidden: int = 32,
    per_module_mi: bool = False,
    seed: int = 0,
) -> list[PairInterference]:
    """Cosine similarity and (when ``projections`` are given) the MI estimate for every pair.

    Args:
        model: The policy holding the value vectors.
        values: Value names, in training order.
        projections: value -> module -> (N, r) base-model projections A_v h
            (:func:`base_projections`), or None to skip the MI.
        mine_steps: Steps of each fresh MINE head (0 skips the MI).
        mine_hidden: Width of its hidden layers.
        per_module_mi: Also estimate the MI per module.
        seed: Seeds the MINE heads.

    Returns:
        One :class:`PairInterference` per pair.
    """
    pairs = cosine_table(model, values)
    if projections and mine_steps > 0:
        for p in pairs:
            p.mi, p.mi_per_module = activation_mi(
                projections[p.value_a],
                projections[p.value_b],
                steps=mine_steps,
                hidden=mine_hidden,
                seed=seed,
                per_module=per_module_mi,
            )
    return pairs


def table_rows(pairs: Sequence[PairInterference]) -> list[dict]:
    """CSV rows: one per (pair, module), then one ``(all modules)`` row per pair.

    Columns: value_a, value_b, module, cosine, mi. The per-module ``mi`` is None (an empty CSV
    cell) unless it was estimated; the ``(all modules)`` row holds the mean cosine and the
    pooled MI.
    """
    rows = []
    for p in pairs:
        for m, c in p.cosine.items():
            mi = p.mi_per_module.get(m)
            rows.append(dict(value_a=p.value_a, value_b=p.value_b, module=m, cosine=c, mi=mi))
        rows.append(
            dict(
                value_a=p.value_a,
                value_b=p.value_b,
                module=ALL_MODULES,
                cosine=p.mean_cosine,
                mi=p.mi,
            )
        )
    return rows


def summary(pairs: Sequence[PairInterference], values: Sequence[str]) -> dict:
    """JSON-ready summary: per pair the mean (|)cosine(|), the MI and the per-module numbers."""
    return {
        "values": list(values),
        "mi_features": FEATURES_NOTE,
        "pairs": [
            {
                "value_a": p.value_a,
                "value_b": p.value_b,
                "mean_cosine": p.mean_cosine,
                "mean_abs_cosine": p.mean_abs_cosine,
                "mi": p.mi,
                "cosine": p.cosine,
                "mi_per_module": p.mi_per_module,
            }
            for p in pairs
        ],
    }


def scalars(pairs: Sequence[PairInterference]) -> dict[str, float]:
    """Logger scalars per pair: ``diagnostics/cos/<a>-<b>`` (mean over modules),
    ``diagnostics/abs_cos/<a>-<b>`` (mean |cos|) and ``diagnostics/mi/<a>-<b>`` (nats)."""
    out = {}
    for p in pairs:
        out[f"diagnostics/cos/{p.name}"] = p.mean_cosine
        out[f"diagnostics/abs_cos/{p.name}"] = p.mean_abs_cosine
        if p.mi is not None:
            out[f"diagnostics/mi/{p.name}"] = p.mi
    return out


def abs_cosine_matrix(pairs: Sequence[PairInterference], values: Sequence[str]) -> torch.Tensor:
    """(K, K) mean |cosine| between value vectors, 1 on the diagonal."""
    index = {v: i for i, v in enumerate(values)}
    mat = torch.eye(len(values))
    for p in pairs:
        i, j = index[p.value_a], index[p.value_b]
        mat[i, j] = mat[j, i] = p.mean_abs_cosine
    return mat


def plot_heatmap(
    pairs: Sequence[PairInterference], values: Sequence[str], path: str | os.PathLike
) -> Path:
    """Heatmaps to a PNG (atomic): modules x pairs cosine, and values x values mean |cosine|."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modules = list(pairs[0].cosine)
    cos = torch.tensor([[p.cosine[m] for p in pairs] for m in modules])  # (modules, pairs)
    mat = abs_cosine_matrix(pairs, values)  # (K, K)
    fig = Figure(figsize=(4 + 1.2 * len(pairs) + 0.8 * len(values), 1.5 + 0.35 * len(modules)))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[max(len(pairs), 1) + 3, len(values) + 1])
    im = left.imshow(cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    left.set_xticks(range(len(pairs)), [p.name for p in pairs], rotation=30, ha="right")
    left.set_yticks(range(len(modules)), modules, fontsize=7)
    left.set_title("cos(delta W_a, delta W_b) per module")
    for (i, j), c in _cells(cos):
        left.text(j, i, f"{c:.2f}", ha="center", va="center", fontsize=7, color=_ink(c))
    fig.colorbar(im, ax=left, fraction=0.05)
    right.imshow(mat.numpy(), cmap="Reds", vmin=0, vmax=1)
    right.set_xticks(range(len(values)), values, rotation=30, ha="right")
    right.set_yticks(range(len(values)), values)
    right.set_title("mean |cos|")
    for (i, j), c in _cells(mat):
        right.text(j, i, f"{c:.2f}", ha="center", va="center", fontsize=8, color=_ink(c))
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _cells(mat: torch.Tensor) -> Iterable[tuple[tuple[int, int], float]]:
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            yield (i, j), float(mat[i, j])


def _ink(c: float) -> str:
    return "white" if abs(c) > 0.6 else "black"  # readable on the dark end of the colour map
