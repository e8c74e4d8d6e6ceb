"""Load a finished run for any preference vector w, and export a merged model for serving.

A run folder holds the resolved ``config.yaml`` and one PEFT adapter folder per value
(``adapters/<value>/``). :func:`load_policy` rebuilds the base model from the config, loads every
value vector and applies w exactly with :func:`lora.set_weights` (on the grid or not, any sign
or magnitude; ``lora.set_weights`` switches to another w in place). :func:`export_merged` writes
a plain full-weight model for one w (the concatenated adapter of :func:`lora.concatenated_adapter`
merged with ``merge_and_unload``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mva_lightning.io import atomic_dir

Preference = Sequence[float] | Mapping[str, float] | None


def write_adapter(
    config,
    state: Mapping,
    folder: str | os.PathLike,
    extra_json: Mapping[str, Any] | None = None,
    extra_text: Mapping[str, str] | None = None,
) -> Path:
    """Save a LoRA config and tensors as a standard PEFT adapter folder, atomically.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (plus one JSON
    file per ``extra_json`` entry, file name -> object, and one text file per ``extra_text``
    entry, e.g. a model card ``README.md``) and loads with
    ``PeftModel.from_pretrained(base, folder)``. It appears whole or not at all.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        config.save_pretrained(tmp)
        save_file(dict(state), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        for name, text in (extra_text or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return folder


def run_config(run_dir: str | os.PathLike):
    """The resolved config a run saved (``<run_dir>/config.yaml``)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no config.yaml; is {run_dir} an mva_lightning run folder?"
        )
    return OmegaConf.load(path)


def run_values(cfg) -> list[str]:
    """Value names of a run, in training order."""
    return list(cfg.value.keys())


def build_policy(cfg, run_dir: str | os.PathLike):
    """Base model from ``cfg.model.loader`` with the run's value vectors loaded (w = 0).

    Returns:
        ``(policy, backbone)``: the PEFT model (eval mode, frozen) and the base's Backbone.
    """
    from safetensors.torch import load_file

    from mva_lightning.assembly import build_policy as build_model
    from mva_lightning.model import lora

    values = run_values(cfg)
    folders = {v: Path(run_dir) / "adapters" / v / "adapter_model.safetensors" for v in values}
    missing = [str(p) for p in folders.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"value vectors not found: {missing}; the run trains {values} and saves them to "
            "<run_dir>/adapters/<value>/ when training finishes"
        )
    backbone, policy = build_model(cfg, values)
    for v, path in folders.items():
        lora.load_adapter_state_dict(policy, v, load_file(str(path)))
    policy.eval()
    return policy, backbone


def preference_weights(values: Sequence[str], preference: Preference) -> dict[str, float]:
    """Value name -> w_v from a list (one entry per value), a mapping, or None (all 1.0).

    Raises:
        ValueError: A list of the wrong length.
        KeyError: A mapping naming a value the run did not train.
    """
    if preference is None:
        return dict.fromkeys(values, 1.0)
    from mva_lightning.model.lora import check_names, preference_dict

    if isinstance(preference, Mapping):
        check_names(values, preference)
        return {v: float(preference.get(v, 0.0)) for v in values}
    if isinstance(preference, str):
        raise TypeError(f"preference must be a list of floats or a mapping, got {preference!r}")
    return preference_dict(values, list(preference))


def load_policy(run_dir: str | os.PathLike, preference: Preference = None):
    """The model of a finished run for preference vector w, ready to use.

    Args:
        run_dir: The run folder (``config.yaml`` and ``adapters/<value>/``).
        preference: w as a list in the run's value order, a mapping value -> w_v (values left
            out get 0), or None for w = (1, ..., 1). Any real numbers: extrapolation (w_v > 1)
            and negative weights are exact too.

    Returns:
        ``(model, tokenizer)``: the PEFT model computing W_0 + sum_v w_v delta W_v, in eval
        mode; call ``lora.set_weights(model, {...})`` to switch w without reloading.

    Raises:
        FileNotFoundError: No config or adapter files in ``run_dir``.
        ValueError: A preference list of the wrong length.
        KeyError: A preference naming an unknown value.
    """
    from mva_lightning.model import lora

    cfg = run_config(run_dir)
    weights = preference_weights(run_values(cfg), preference)  # checked before the model loads
    policy, backbone = build_policy(cfg, run_dir)
    lora.set_weights(policy, weights)
    return policy, backbone.tokenizer


def export_merged(
    run_dir: str | os.PathLike, preference: Preference, out_dir: str | os.PathLike
) -> Path:
    """Write a full-weight model for one w (``save_pretrained`` + tokenizer), atomically.

    The concatenated adapter of w (:func:`lora.concatenated_adapter`) is merged into the base
    with ``merge_and_unload``; ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the result
    without PEFT.

    Args:
        run_dir: The run folder.
        preference: w, as for :func:`load_policy`.
        out_dir: Target folder (replaced whole if it exists).

    Returns:
        ``out_dir``.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    from mva_lightning.model import lora

    cfg = run_config(run_dir)
    weights = preference_weights(run_values(cfg), preference)
    policy, backbone = build_policy(cfg, run_dir)
    config, state = lora.concatenated_adapter(policy, weights)
    base = policy.unload()  # the base model with the LoRA layers taken out, nothing merged
    merged_peft = get_peft_model(base, config)
    set_peft_model_state_dict(merged_peft, state)
    merged = merged_peft.merge_and_unload()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        backbone.tokenizer.save_pretrained(tmp)
    return out_dir
