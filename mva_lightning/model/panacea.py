"""Panacea (Zhong et al., NeurIPS 2024, arXiv 2402.02030): one SVD-LoRA model for every w.

Each adapted ``nn.Linear`` (the LoRA config's ``target_modules``) is replaced by a
:class:`PanaceaLinear`: W_0 x + U diag(s(w)) V^T x with U (d_out x (r + K)), V (d_in x (r + K))
learnable and the singular values

    s(w) = [s_shared (r learnable values), lambda * w_1, ..., lambda * w_K],

``lambda`` a learnable per-layer scale and w the **preference input** (K values, one per value),
set on every layer at once by :func:`set_preference`. ``None`` turns the adapter off: the base
model pi_0, the DPO reference. Nothing is scaled per value: the preference enters as singular
values (docs/method.md, "Panacea").

Init: U and V have N(0, 1/d) entries (columns of unit norm in expectation), s_shared = 0 and
lambda = ``lambda_init`` (0 by default). With s_shared = 0 and w = 0 the layer is the base layer
exactly; with lambda = 0 as well it is the base for every w, so training starts at
policy = reference (DPO loss ln 2) and the first gradients reach s_shared and lambda (as LoRA's
B = 0 does).

Training samples w ~ Dirichlet(1, ..., 1) per batch from a generator keyed by (seed, step)
(:func:`sample_preference`: a resumed run draws the same w) and minimises the aggregated DPO
loss (:func:`aggregate`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIG_FILE = "panacea_config.json"
WEIGHTS_FILE = "panacea_model.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PARAMS = ("panacea_U", "panacea_V", "panacea_s", "panacea_lambda")
AGGREGATIONS = ("linear", "tchebycheff")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class PanaceaConfig:
    """What builds a Panacea model on a base (saved as ``panacea_config.json``).

    Attributes:
        values: Value names: the K entries of the preference input, in order.
        r: Rank of the shared (learned) singular values.
        target_modules: Names of the adapted ``nn.Linear`` modules.
        lambda_init: Initial per-layer preference scale.
        init_seed: Seed of the U, V init.
        base_model_name_or_path: The base model (for the model card), if known.
    """

    values: list[str]
    r: int = 8
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    lambda_init: float = 0.0
    init_seed: int = 0
    base_model_name_or_path: str | None = None

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``<folder>/panacea_config.json``."""
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PanaceaConfig:
        """Read ``<folder>/panacea_config.json``."""
        return cls(**json.loads((Path(folder) / CONFIG_FILE).read_text()))


class PanaceaLinear(nn.Module):
    """y = W_0 x + U diag(s(w)) V^T x, s(w) = [s_shared, lambda * w] (module docstring).

    Args:
        base_layer: The frozen ``nn.Linear`` (W_0, bias).
        r: Shared rank.
        k: Number of values (preference entries).
        lambda_init: Initial lambda.
        generator: Generator of the U, V init.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        k: int,
        lambda_init: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        d_out, d_in = base_layer.weight.shape
        self.base_layer = base_layer
        self.r, self.k = r, k
        u = torch.randn(d_out, r + k, generator=generator) / math.sqrt(d_out)
        v = torch.randn(d_in, r + k, generator=generator) / math.sqrt(d_in)
        device = base_layer.weight.device
        self.panacea_U = nn.Parameter(u.to(device))  # (d_out, r + K)
        self.panacea_V = nn.Parameter(v.to(device))  # (d_in, r + K)
        self.panacea_s = nn.Parameter(torch.zeros(r, device=device))  # (r,)
        self.panacea_lambda = nn.Parameter(torch.tensor(float(lambda_init), device=device))
        self.preference: torch.Tensor | None = None  # (K,) or None: the adapter is off

    def singular_values(self, preference: torch.Tensor) -> torch.Tensor:
        """s(w) = [s_shared, lambda * w], shape (r + K,)."""
        w = preference.to(self.panacea_s.device, self.panacea_s.dtype)
        return torch.cat([self.panacea_s, self.panacea_lambda * w])

    def delta_weight(self, preference: torch.Tensor) -> torch.Tensor:
        """Delta W = U diag(s(w)) V^T, shape (d_out, d_in)."""
        return (self.panacea_U * self.singular_values(preference)) @ self.panacea_V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., d_out)
        if self.preference is None:
            return out
        h = x.to(self.panacea_V.dtype) @ self.panacea_V  # (..., r + K)
        h = h * self.singular_values(self.preference)
        return out + (h @ self.panacea_U.T).to(out.dtype)


def add_panacea(
    model: nn.Module,
    values: Sequence[str],
    r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    lambda_init: float = 0.0,
    init_seed: int = 0,
    disable_dropout: bool = True,
    **_lora: object,
) -> nn.Module:
    """Freeze ``model`` and replace its target ``nn.Linear`` modules by Panacea layers, in place.

    Args:
        model: A ``transformers`` causal LM.
        values: Value names (K preference entries).
        r: Shared rank (``model.lora.r``).
        target_modules: Module names to adapt (``model.lora.target_modules``).
        lambda_init: Initial lambda (0: the base model for every w at step 0).
        init_seed: Seed of the U, V init (one generator, layers in module order).
        disable_dropout: Zero the base model's dropout (policy at w = None == reference).
        **_lora: Other ``model.lora`` keys (``lora_alpha``, ``lora_dropout``), unused.

    Returns:
        ``model``, its preference off (the base model); only the Panacea parameters train.
    """
    if not values or len(set(values)) != len(values):
        raise ValueError(f"add_panacea: expected distinct value names, got {list(values)}")
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    generator = torch.Generator().manual_seed(int(init_seed))
    targets = set(target_modules)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise ValueError(f"add_panacea: no nn.Linear named {sorted(targets)} in the model")
    for name, linear in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        layer = PanaceaLinear(linear, r, len(values), lambda_init, generator)
        setattr(parent, name.rsplit(".", 1)[-1], layer)
    model.panacea_config = PanaceaConfig(
        values=list(values),
        r=r,
        target_modules=sorted(targets),
        lambda_init=float(lambda_init),
        init_seed=int(init_seed),
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None),
    )
    set_trainable(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put every target module's base ``nn.Linear`` back (the base model), in place."""
    for name, layer in panacea_layers(model):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], layer.base_layer)
    model.panacea_config = None
    return model


def panacea_layers(model: nn.Module) -> list[tuple[str, PanaceaLinear]]:
    """Every Panacea layer of ``model``, with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PanaceaLinear)]


def is_panacea(model: nn.Module) -> bool:
    """Whether ``model`` was made by :func:`add_panacea`."""
    return getattr(model, "panacea_config", None) is not None


def preference_names(model: nn.Module) -> list[str]:
    """The values of the preference input (empty for a model that is not Panacea)."""
    config = getattr(model, "panacea_config", None)
    return list(config.values) if config is not None else []


def set_preference(model: nn.Module, w: Sequence[float] | torch.Tensor | None) -> None:
    """Feed preference w (K values) to every Panacea layer; None: adapter off (the base).

    Raises:
        ValueError: w has not one entry per value.
    """
    layers = panacea_layers(model)
    if w is not None:
        w = torch.as_tensor(w, dtype=torch.float32).detach().flatten()  # (K,)
        names = preference_names(model)
        if w.numel() != len(names):
            raise ValueError(
                f"preference {w.tolist()} has {w.numel()} entries; expected {len(names)} "
                f"(one per value: {names})"
            )
    for _, layer in layers:
        layer.preference = None if w is None else w.to(layer.panacea_s.device)


def get_preference(model: nn.Module) -> list[float] | None:
    """The preference ``model`` computes now (None: adapter off)."""
    layers = panacea_layers(model)
    if not layers or layers[0][1].preference is None:
        return None
    return [float(x) for x in layers[0][1].preference]


@contextlib.contextmanager
def using_preference(
    model: nn.Module, w: Sequence[float] | torch.Tensor | None
) -> Iterator[nn.Module]:
    """Context manager: compute with preference w (None: the base), then restore."""
    layers = panacea_layers(model)
    previous = [layer.preference for _, layer in layers]
    set_preference(model, w)
    try:
        yield model
    finally:
        for (_, layer), p in zip(layers, previous, strict=True):
            layer.preference = p


def base_model(model: nn.Module) -> contextlib.AbstractContextManager:
    """The base model pi_0 inside the context: Panacea's adapter off; a no-op for other models."""
    return using_preference(model, None) if is_panacea(model) else contextlib.nullcontext(model)


def set_trainable(model: nn.Module) -> None:
    """Make exactly the Panacea parameters trainable."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in PARAMS)


# ----------------------------------------------------------------------------- training
def sample_preference(seed: int, step: int, k: int) -> torch.Tensor:
    """w ~ Dirichlet(1, ..., 1), shape (K,), drawn from a generator keyed by (seed, step).

    Pure: the same (seed, step) gives the same w, so a resumed run draws what the uninterrupted
    one drew. Normalised Exp(1) draws are Dirichlet(1, ..., 1).
    """
    key = int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0])
    generator = torch.Generator().manual_seed(key & (2**63 - 1))
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    e = -torch.log1p(-u)  # (K,) Exp(1)
    return (e / e.sum()).float()


def aggregate(
    losses: torch.Tensor,
    w: torch.Tensor,
    mode: str = "linear",
    ideal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Panacea's aggregated loss of per-value DPO losses.

    linear: sum_v w_v L_v; tchebycheff: max_v w_v (L_v - z_v), z = ``ideal`` (None: 0).

    Args:
        losses: (K,) per-value losses.
        w: (K,) preference.
        mode: ``linear`` or ``tchebycheff``.
        ideal: (K,) z for Tchebycheff.
    """
    w = w.to(losses.device, losses.dtype)
    if mode == "linear":
        return (w * losses).sum()
    if mode == "tchebycheff":
        z = torch.zeros_like(losses) if ideal is None else ideal.to(losses)
        return (w * (losses - z)).max()
    raise ValueError(f"method.aggregation: expected one of {AGGREGATIONS}, got {mode!r}")


# ----------------------------------------------------------------------------- files
def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Panacea tensors (``<module>.panacea_U`` ...), detached CPU copies."""
    return {
        f"{name}.{p}": getattr(layer, p).detach().cpu().contiguous()
        for name, layer in panacea_layers(model)
        for p in PARAMS
    }


def load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load tensors of :func:`state_dict` into ``model``'s Panacea layers.

    Raises:
        KeyError: A tensor is missing from ``state``.
    """
    expected = state_dict(model).keys()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"Panacea adapter: tensors missing from the file: {missing[:3]}")
    with torch.no_grad():
        for name, layer in panacea_layers(model):
            for p in PARAMS:
                getattr(layer, p).copy_(state[f"{name}.{p}"])


def save(model: nn.Module, folder: str | Path, extra_json: Mapping | None = None) -> Path:
    """Write the adapter (``panacea_model.safetensors`` + ``panacea_config.json``), atomically.

    Raises:
        FloatingPointError: A Panacea tensor holds a NaN or inf (nothing is written).
    """
    from safetensors.torch import save_file

    from mva_lightning.io import atomic_dir

    state = state_dict(model)
    bad = [k for k, t in state.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"Panacea adapter: non-finite weights in {bad[0]}; not saved")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.panacea_config.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return folder


def load(model: nn.Module, folder: str | Path) -> None:
    """Load an adapter folder written by :func:`save` into a model from :func:`add_panacea`."""
    from safetensors.torch import load_file

    load_state_dict(model, load_file(str(Path(folder) / WEIGHTS_FILE)))


def fingerprint(model: nn.Module) -> str:
    """16 hex digits of the SHA-256 of the Panacea tensors (the sweep's score-cache key)."""
    import hashlib

    digest = hashlib.sha256()
    for key, t in sorted(state_dict(model).items()):
        digest.update(key.encode())
        digest.update(t.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def peft_adapter(model: nn.Module, w: Sequence[float]):
    """One plain LoRA adapter that computes the Panacea model at preference w, exactly.

    Per layer, A = V^T (r' x d_in) and B = U diag(s(w)) (d_out x r'), r' = r + K, scale 1.

    Returns:
        ``(peft.LoraConfig, state_dict)`` in PEFT's file layout, as
        :func:`mva_lightning.model.lora.concatenated_adapter` returns.
    """
    from peft import LoraConfig

    config = model.panacea_config
    pref = torch.as_tensor([float(x) for x in w])
    state = {}
    with torch.no_grad():
        for name, layer in panacea_layers(model):
            b = layer.panacea_U * layer.singular_values(pref)  # (d_out, r + K)
            key = f"{PEFT_PREFIX}{name}"  # PEFT's file layout wraps the model twice
            state[f"{key}.lora_A.weight"] = layer.panacea_V.T.float().cpu().contiguous()
            state[f"{key}.lora_B.weight"] = b.float().cpu().contiguous()
    rank = config.r + len(config.values)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=config.base_model_name_or_path,
    )
    return lora_config, state


# ----------------------------------------------------------------------------- the sweep
def candidate_preference(w: Sequence[float]) -> list[float] | None:
    """The preference input of sweep candidate w: the candidate w = 0 is the base (None), as
    for every method (the sweep's reference point); any other w is fed as it is."""
    return [float(x) for x in w] if any(w) else None


def score_candidates(objective, policy: nn.Module, datamodule, values, group) -> list:
    """``objective.score_many`` for Panacea: each candidate w fed as the preference input in
    turn (no per-adapter weights: the objective sees the policy as it is)."""
    out = []
    for w in group:
        with using_preference(policy, candidate_preference(w)):
            out.extend(objective.score_many(policy, datamodule, values, [{}]))
    return out


def save_checkpoints(
    policy: nn.Module,
    names: Sequence[str],
    weights: Sequence[tuple[float, ...]],
    by_w: Mapping,
    mask: Sequence[bool],
    keep: Sequence[bool],
    out_dir: Path,
    run_dir: Path,
    fingerprint: str,
    report: Mapping | None = None,
) -> list[str | None]:
    """:func:`mva_lightning.sweep.manifest.save_checkpoints` for Panacea (same arguments).

    Each kept w gets ``out_dir/checkpoints/<w>/``: the one Panacea adapter
    (``panacea_model.safetensors``: U, V, s_shared, lambda; ``panacea_config.json``) and
    ``preference.json`` (w, scores); plus, for plain PEFT, the exact LoRA adapter of the model
    at w (:func:`peft_adapter`: ``adapter_config.json``, ``adapter_model.safetensors``) and a
    model card.
    """
    from safetensors.torch import save_file

    from mva_lightning.sweep import manifest

    panacea_state = state_dict(policy)

    def panacea_files(folder: Path) -> None:
        policy.panacea_config.save_pretrained(folder)
        save_file(panacea_state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    return manifest.save_checkpoints(
        policy,
        names,
        weights,
        by_w,
        mask,
        keep,
        out_dir,
        run_dir,
        fingerprint,
        report,
        adapter_at=lambda w: peft_adapter(policy, w),
        extra_meta={"method": "panacea"},
        extra_files=panacea_files,
    )


def write_samples(
    policy: nn.Module, datamodule, values, names, points, settings, path
) -> list[dict]:
    """:func:`mva_lightning.sweep.samples.write_samples` for Panacea (same arguments): each
    point generates with its preference input (w = 0: the base)."""
    from mva_lightning.model.generation import generate
    from mva_lightning.sweep import samples

    def respond(prompts: list[str], points: Sequence[tuple[float, ...]]) -> list[str]:
        responses: list[str] = []
        for w in points:
            with using_preference(policy, candidate_preference(w)):
                responses += generate(
                    policy,
                    datamodule.tokenizer,
                    prompts,
                    max_new_tokens=settings.max_new_tokens,
                    batch_size=len(prompts),
                    chat_template=datamodule.chat_template,
                    max_prompt_length=datamodule.max_prompt_length,
                )
        return responses

    return samples.write_samples(
        policy, datamodule, values, names, points, settings, path, respond=respond
    )
