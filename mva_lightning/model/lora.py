"""Value vectors as PEFT LoRA adapters, and their exact weighted combination.

A value vector theta_v is one LoRA adapter named after value v, on the same target modules for
every value. Per adapted module: A_v (r x d_in), B_v (d_out x r), s = lora_alpha / r and
delta W_v = s * B_v @ A_v.

The model for a preference vector w is W(w) = W_0 + sum_v w_v * delta W_v (docs/method.md §1).
It is applied exactly by keeping every adapter loaded, activating those with w_v != 0 and
setting each one's scale to w_v * s. A's and B's are never combined separately (PEFT's
``add_weighted_adapter(combination_type="linear")`` adds cross terms B_i A_j), nothing is merged
and nothing is reloaded, so switching w costs a loop over the LoRA layers.

The same mechanism serves training: value v trains as w = e_v, the reference is w = 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class LoraFactors:
    """One value's LoRA factors at one module (live parameters: gradients flow).

    Attributes:
        A: ``lora_A`` weight, shape (r, d_in).
        B: ``lora_B`` weight, shape (d_out, r).
        scale: lora_alpha / r, the scale at w_v = 1.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def delta_w(self) -> torch.Tensor:
        """delta W = s * B @ A, shape (d_out, d_in)."""
        return self.scale * (self.B @ self.A)


def add_value_vectors(
    model: nn.Module,
    values: Sequence[str],
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    disable_dropout: bool = True,
    init_seed: int = 0,
) -> nn.Module:
    """Freeze ``model`` and give it one LoRA adapter per value (B = 0, so W(w) = W_0 at start).

    Args:
        model: A ``transformers`` causal LM.
        values: Value names; each becomes an adapter name.
        r: LoRA rank.
        lora_alpha: LoRA alpha (scale s = lora_alpha / r).
        lora_dropout: Dropout on the LoRA branch.
        target_modules: Module names to adapt, the same for every value.
        disable_dropout: Zero the base model's dropout so that the policy at w = 0 and the
            reference give identical log-probs (as TRL does).
        init_seed: Seed of the A init; each value's A differs (seed + index).

    Returns:
        The ``peft.PeftModel``; no adapter is active and none is trainable yet.
    """
    from peft import LoraConfig, get_peft_model

    if not values:
        raise ValueError("add_value_vectors: expected at least one value name")
    if len(set(values)) != len(values):
        raise ValueError(f"add_value_vectors: value names must be unique, got {list(values)}")
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = None
    for i, value in enumerate(values):
        with torch.random.fork_rng():
            torch.manual_seed(init_seed + i)
            if peft_model is None:
                peft_model = get_peft_model(model, config, adapter_name=value)
            else:
                peft_model.add_adapter(value, config)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    set_weights(peft_model, {})
    return peft_model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every PEFT LoRA layer of ``model``, with its qualified name."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def fsdp_wrap_policy(layer_classes: Sequence[str] = ("LlamaDecoderLayer",)):
    """FSDP auto-wrap policy that keeps the value vectors apart from the frozen base.

    Each decoder layer (class name in ``layer_classes``) is an FSDP unit, and so is every LoRA
    factor (``lora_A`` / ``lora_B`` of every value, trainable or not). A unit that mixed frozen
    base weights with trainable ones would allocate gradients for all of them (litgpt#1417) and
    would mix the base dtype with the adapters' fp32; this way the sequential schedule can
    switch which value trains without re-wrapping. Use with ``use_orig_params=True``.

    Args:
        layer_classes: Class names of the decoder layers (``model._no_split_modules``).

    Returns:
        A ``torch.distributed.fsdp.wrap.CustomPolicy``.
    """
    from peft.tuners.lora import LoraLayer
    from torch.distributed.fsdp.wrap import CustomPolicy

    names = set(layer_classes)
    factors: set[int] = set()

    def wrap(module: nn.Module) -> bool:
        # CustomPolicy visits modules parents first: a LoRA layer names its factors before
        # they are visited.
        if isinstance(module, LoraLayer):
            factors.update(id(m) for d in (module.lora_A, module.lora_B) for m in d.values())
            return False
        return id(module) in factors or type(module).__name__ in names

    return CustomPolicy(wrap)


def value_names(model: nn.Module) -> list[str]:
    """The value vectors (adapter names) that ``model`` holds, in insertion order."""
    return list(getattr(model, "peft_config", {}).keys())


def check_names(known: Sequence[str], names: Iterable[str]) -> None:
    """Raise ``KeyError`` naming every entry of ``names`` that is not one of ``known``."""
    unknown = [v for v in names if v not in known]
    if unknown:
        raise KeyError(f"preference names {unknown} have no value vector; trained: {list(known)}")


def set_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Make ``model`` compute W_0 + sum_v w_v delta W_v, exactly.

    Adapters with w_v != 0 are active with scale w_v * lora_alpha / r; the others are inactive
    (no compute). Any sign or magnitude is allowed. ``requires_grad`` flags are left as they were.

    Args:
        model: A model from :func:`add_value_vectors`.
        weights: Value name -> w_v. Values left out get w_v = 0.
    """
    known = value_names(model)
    check_names(known, weights)
    active = [v for v in known if float(weights.get(v, 0.0)) != 0.0]
    for _, layer in lora_layers(model):
        if list(layer.active_adapters) != active:  # switching is the costly part: only if needed
            flags = {id(p): p.requires_grad for p in layer.parameters()}
            layer.set_adapter(active)  # PEFT toggles requires_grad here; restore it below
            for p in layer.parameters():
                p.requires_grad_(flags[id(p)])
        for v in active:
            layer.set_scale(v, float(weights[v]))


def get_weights(model: nn.Module) -> dict[str, float]:
    """The preference vector ``model`` currently computes (inverse of :func:`set_weights`)."""
    layers = lora_layers(model)
    if not layers:
        return {}
    layer = layers[0][1]
    out = {}
    for v in value_names(model):
        if v in layer.active_adapters and v in layer.scaling:
            out[v] = layer.scaling[v] * layer.r[v] / layer.lora_alpha[v]
        else:
            out[v] = 0.0
    return out


@contextlib.contextmanager
def using_weights(model: nn.Module, weights: Mapping[str, float]) -> Iterator[nn.Module]:
    """Context manager: compute with ``weights``, then restore the previous combination."""
    previous = get_weights(model)
    set_weights(model, weights)
    try:
        yield model
    finally:
        set_weights(model, previous)


@contextlib.contextmanager
def using_row_weights(
    model: nn.Module, weights: Mapping[str, torch.Tensor], fuse: bool | None = None
) -> Iterator[nn.Module]:
    """Context manager: batch row n computes W_0 + sum_v weights[v][n] delta W_v.

    Many preference vectors in one forward (or one ``generate``): row n of a LoRA layer's
    output gets sum_v weights[v][n] * s_v * B_v A_v x. Fused (the default where it applies,
    :func:`can_fuse`): one forward hook per layer adds ``((x @ A^T) * c_n) @ B^T`` with the
    active values' factors stacked, A = [A_1; A_2; ...] and B = [B_1, B_2, ...], and c_n their
    per-row scales on the rank dimension, while the layer itself computes the base alone: two
    matrix products per layer instead of two per value. Otherwise each adapter's scale becomes
    a per-row column that broadcasts over the (rows, tokens, features) output of its layer.
    Both compute the same weights (to float rounding, tested); the fused path stacks the
    factors once on entry, so change no adapter weight inside. Every forward inside must have
    exactly N rows; the previous combination is restored after.

    Args:
        model: A model from :func:`add_value_vectors`.
        weights: Value name -> (N,) tensor of w_v per row. Values left out get w_v = 0.
        fuse: True: fused (raises where :func:`can_fuse` is False); False: per-adapter
            columns; None: fused where it applies.

    Raises:
        KeyError: A name has no value vector.
        ValueError: The tensors are not 1-D of one common length, or ``fuse=True`` where the
            layers cannot be fused.
    """
    known = value_names(model)
    check_names(known, weights)
    sizes = {tuple(t.shape) for t in weights.values()}
    if len(sizes) > 1 or any(len(size) != 1 for size in sizes):
        raise ValueError(f"row weights: expected (N,) tensors of one length, got shapes {sizes}")
    previous = get_weights(model)
    active = {v: t for v, t in weights.items() if bool((t != 0).any())}
    layers = [layer for _, layer in lora_layers(model)]
    fusable = all(can_fuse(layer, list(active)) for layer in layers)
    if fuse and not fusable:
        raise ValueError("row weights: these LoRA layers cannot be fused (see lora.can_fuse)")
    fuse = bool(active) and (fusable if fuse is None else fuse)  # all w = 0: the base alone
    handles = []
    try:
        if fuse:
            set_weights(model, {})  # every layer computes its base alone; the hooks add the rest
            handles = [_fused_hook(layer, active) for layer in layers]
        else:
            set_weights(model, dict.fromkeys(active, 1.0))  # unit scales, the right adapters on
            for layer in layers:
                for v, column in active.items():
                    unit = layer.scaling[v]
                    device = layer.lora_B[v].weight.device
                    layer.scaling[v] = column.to(device, torch.float32)[:, None, None] * unit
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            for v in active:
                layer.set_scale(v, 1.0)  # a plain float again
        set_weights(model, previous)


def can_fuse(layer: nn.Module, values: Sequence[str]) -> bool:
    """Whether :func:`using_row_weights` may fuse ``values``' adapters of one LoRA layer.

    True for a plain, unmerged PEFT ``Linear`` whose factors for ``values`` are ordinary linear
    maps of the layer's shapes (no DoRA or other variant, no LoRA bias) and whose dropout does
    nothing (identity, or the module in eval mode). False otherwise, e.g. for factors that
    FSDP or DeepSpeed wrap or shard: their weights are not whole outside their own forward.
    """
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return False
    for v in values:
        a, b = layer.lora_A[v], layer.lora_B[v]
        dropout = layer.lora_dropout[v]
        if (
            v in getattr(layer, "lora_variant", {})
            or getattr(layer, "lora_bias", {}).get(v, False)
            or type(a) is not nn.Linear
            or type(b) is not nn.Linear
            or a.weight.shape != (layer.r[v], layer.in_features)
            or b.weight.shape != (layer.out_features, layer.r[v])
            or not (isinstance(dropout, nn.Identity) or not dropout.training)
        ):
            return False
    return True


def _fused_hook(layer: nn.Module, columns: Mapping[str, torch.Tensor]):
    """Register the forward hook that adds the stacked adapters' per-row term to ``layer``."""
    stacked_a = torch.cat([layer.lora_A[v].weight for v in columns])  # (sum r, d_in)
    stacked_b = torch.cat([layer.lora_B[v].weight for v in columns], dim=1)  # (d_out, sum r)
    scales = []
    for v, column in columns.items():
        layer.set_scale(v, 1.0)
        unit = layer.scaling[v]  # lora_alpha / r (or / sqrt(r) with rsLoRA)
        row = column.to(stacked_a.device, torch.float32) * unit  # (N,)
        scales.append(row[:, None].expand(-1, layer.r[v]))
    rank_scale = torch.cat(scales, dim=1)[:, None, :]  # (N, 1, sum r): w_v * s_v per rank slot

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        low = (x.to(stacked_a.dtype) @ stacked_a.T) * rank_scale  # (N, T, sum r)
        return output + (low.to(stacked_b.dtype) @ stacked_b.T).to(output.dtype)

    return layer.register_forward_hook(hook, with_kwargs=True)


def stack_weights(
    weights: Sequence[Mapping[str, float]], rows_each: int = 1
) -> dict[str, torch.Tensor]:
    """Row weights for :func:`using_row_weights`: preference vector k on ``rows_each`` rows.

    Args:
        weights: C preference vectors (value name -> w_v; a name left out of one gets 0).
        rows_each: Consecutive rows per vector.

    Returns:
        Value name -> (C * rows_each,) weights, rows k * rows_each ... (k + 1) * rows_each - 1
        holding vector k.
    """
    names = list(dict.fromkeys(v for w in weights for v in w))
    return {
        v: torch.tensor([float(w.get(v, 0.0)) for w in weights]).repeat_interleave(rows_each)
        for v in names
    }


def preference_dict(values: Sequence[str], w: Sequence[float]) -> dict[str, float]:
    """Pair a preference vector with value names, checking its length."""
    w = [float(x) for x in w]
    if len(w) != len(values):
        raise ValueError(
            f"preference vector {w} has {len(w)} entries; expected {len(values)} "
            f"(one per value: {list(values)})"
        )
    return dict(zip(values, w, strict=True))


def adapter_parameters(model: nn.Module, value: str) -> list[nn.Parameter]:
    """The LoRA parameters of one value vector."""
    return [p for n, p in model.named_parameters() if _owner(n) == value]


def set_trainable(model: nn.Module, values: Sequence[str]) -> None:
    """Make exactly the given value vectors trainable; every other parameter is frozen.

    Call before building the optimizer (PEFT freezes inactive adapters otherwise, peft#631).
    """
    known = value_names(model)
    missing = [v for v in values if v not in known]
    if missing:
        raise KeyError(f"no value vector named {missing}; trained: {known}")
    for n, p in model.named_parameters():
        p.requires_grad_(_owner(n) in values)


def _owner(param_name: str) -> str | None:
    # "....lora_A.helpful.weight" -> "helpful"
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B"):
            return parts[i + 1]
    return None


def lora_factors(model: nn.Module, value: str) -> dict[str, LoraFactors]:
    """Module name -> the value's (A, B, s) at that module."""
    out = {}
    for name, layer in lora_layers(model):
        if value in layer.lora_A:
            out[name] = LoraFactors(
                A=layer.lora_A[value].weight,
                B=layer.lora_B[value].weight,
                scale=layer.lora_alpha[value] / layer.r[value],
            )
    if not out:
        raise KeyError(f"no value vector named {value!r}; trained: {value_names(model)}")
    return out


def delta_weights(model: nn.Module, value: str) -> dict[str, torch.Tensor]:
    """Module name -> delta W_v = s * B_v @ A_v, shape (d_out, d_in)."""
    return {name: f.delta_w() for name, f in lora_factors(model, value).items()}


def adapter_state_dict(model: nn.Module, value: str) -> dict[str, torch.Tensor]:
    """The value's adapter tensors in PEFT's file layout (``adapter_model.safetensors``)."""
    from peft import get_peft_model_state_dict

    return {
        k: t.detach().cpu().contiguous()
        for k, t in get_peft_model_state_dict(model, adapter_name=value).items()
    }


def adapter_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """A short key of the named adapters' tensors: 16 hex digits of their SHA-256.

    The sweep's score cache is keyed by it, so retrained value vectors are scored again.
    """
    import hashlib

    digest = hashlib.sha256()
    for v in names:
        for key, t in sorted(adapter_state_dict(model, v).items()):
            digest.update(key.encode())
            digest.update(t.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_adapter_state_dict(
    model: nn.Module, value: str, state: Mapping[str, torch.Tensor]
) -> None:
    """Load tensors written by :func:`adapter_state_dict` into the value's adapter."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, dict(state), adapter_name=value)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{value}." in k]
    if missing:
        raise KeyError(f"adapter {value!r}: tensors missing from the file: {missing[:3]}")


def save_value_vectors(model: nn.Module, folder: str | Path, values: Sequence[str]) -> list[Path]:
    """Save each value vector as a PEFT adapter folder ``folder/<value>/`` (atomic per value).

    Each folder loads with ``PeftModel.from_pretrained(base, folder/<value>)``.
    """
    from mva_lightning.io import atomic_dir

    folder = Path(folder)
    paths = []
    for value in values:
        with atomic_dir(folder / value) as tmp:
            # PEFT writes a non-default adapter into <dir>/<name>/.
            model.save_pretrained(tmp, selected_adapters=[value])
            nested = tmp / value
            if nested.is_dir():
                for item in nested.iterdir():
                    item.rename(tmp / item.name)
                nested.rmdir()
        paths.append(folder / value)
    return paths


def cosine_similarity(model: nn.Module, value_a: str, value_b: str) -> dict[str, float]:
    """Per-module cosine similarity between flattened delta W of two value vectors."""
    da, db = delta_weights(model, value_a), delta_weights(model, value_b)
    out = {}
    with torch.no_grad():
        for name in da:
            a, b = da[name].flatten().float(), db[name].flatten().float()
            denom = a.norm() * b.norm()
            out[name] = float((a @ b) / denom) if denom > 0 else 0.0
    return out


def concatenated_adapter(model: nn.Module, weights: Mapping[str, float]):
    """One standard LoRA adapter that computes W_0 + sum_v w_v delta W_v exactly.

    Per module, stack the value vectors' factors (no cross terms B_i A_j):
    A' = [A_1; ...; A_K] (sum r_v x d_in) and B' = [w_1 s_1 B_1, ..., w_K s_K B_K]
    (d_out x sum r_v), so that B' A' = sum_v w_v s_v B_v A_v. The adapter has r' = sum_v r_v and
    lora_alpha = r' (scale 1). Values left out of ``weights`` get w_v = 0 (kept, so that r' is the
    same for every w).

    Args:
        model: A model from :func:`add_value_vectors`.
        weights: Value name -> w_v, any sign or magnitude.

    Returns:
        ``(peft.LoraConfig, state_dict)``: the state dict in PEFT's file layout (keys
        ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, CPU tensors), loadable with
        ``PeftModel.from_pretrained(base, folder)`` once both are saved to ``folder``.

    Raises:
        KeyError: If ``weights`` names a value with no vector.
        ValueError: If the model has no value vectors, or they differ in target modules or
            use DoRA (not a plain low-rank update).
    """
    import math

    from peft import LoraConfig

    values = value_names(model)
    check_names(values, weights)
    if not values:
        raise ValueError("concatenated_adapter: the model holds no value vectors")
    configs = [model.peft_config[v] for v in values]
    if any(c.use_dora for c in configs):
        raise ValueError("concatenated_adapter: DoRA adapters are not a plain low-rank update")
    targets = {frozenset(c.target_modules) for c in configs}
    if len(targets) != 1:
        raise ValueError(f"value vectors adapt different modules: {sorted(map(sorted, targets))}")
    state: dict[str, torch.Tensor] = {}
    rank = None
    with torch.no_grad():
        for name, layer in lora_layers(model):
            a_rows, b_cols = [], []
            for v, c in zip(values, configs, strict=True):
                if v not in layer.lora_A:
                    raise ValueError(f"value vector {v!r} is missing at module {name}")
                r, alpha = layer.r[v], layer.lora_alpha[v]
                s = alpha / math.sqrt(r) if c.use_rslora else alpha / r
                a_rows.append(layer.lora_A[v].weight.float())  # (r_v, d_in)
                b_cols.append(float(weights.get(v, 0.0)) * s * layer.lora_B[v].weight.float())
            a, b = torch.cat(a_rows, 0), torch.cat(b_cols, 1)  # (r', d_in), (d_out, r')
            if rank is not None and a.shape[0] != rank:
                raise ValueError(f"module {name}: rank {a.shape[0]} differs from {rank}")
            rank = a.shape[0]
            state[f"{name}.lora_A.weight"] = a.cpu().contiguous()
            state[f"{name}.lora_B.weight"] = b.cpu().contiguous()
    base = configs[0]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale lora_alpha / r = 1: the weights live in B'
        lora_dropout=0.0,
        target_modules=sorted(base.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base.base_model_name_or_path,
        revision=base.revision,
    )
    return config, state


@contextlib.contextmanager
def capture_inputs(
    model: nn.Module, record: Callable[[str, torch.Tensor], None], enabled: bool = True
) -> Iterator[None]:
    """Call ``record(layer_name, h)`` with the hidden state h entering each LoRA layer.

    The one hook mechanism for what the value vectors see: the MI penalty's activation
    features (h kept, with its graph) and the diagnostics' projections A_v h (computed inside
    ``record``, h itself not kept). Hooks are removed on exit.

    Args:
        model: A model from :func:`add_value_vectors`.
        record: Called during every forward inside the context, once per LoRA layer, with the
            layer's qualified name and its input h of shape (rows, tokens, d_in).
        enabled: ``False`` registers nothing (a no-op context).
    """
    handles = []
    if enabled:
        for name, layer in lora_layers(model):

            def hook(_module, args, _name=name):
                record(_name, args[0])

            handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
