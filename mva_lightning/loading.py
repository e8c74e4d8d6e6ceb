"""Load a finished run for any preference vector w, and export a merged model for serving.

A run folder holds the resolved ``config.yaml`` and one PEFT adapter folder per trained adapter
(:func:`run_adapters`): ``adapters/<value>/`` for each value (MVA, SOUP and the ablations), or
the one ``adapters/<shared>/`` of a shared-adapter baseline (``method.shared_adapter``, e.g.
``adapters/policy/`` for DPO, DPO-LW, DPO-SeqT and MODPO). :func:`load_policy` rebuilds the base
model from the config, loads the adapters and applies w exactly with :func:`lora.set_weights`
(on the grid or not, any sign or magnitude; ``lora.set_weights`` switches to another w in place).
:func:`export_merged` writes a plain full-weight model for one w (the concatenated adapter of
:func:`lora.concatenated_adapter` merged with ``merge_and_unload``).

A Panacea run (``method.preference_input``) saves its one SVD-LoRA model to
``adapters/panacea/`` (:mod:`mva_lightning.model.panacea`); :func:`load_policy` feeds w to it as
the preference input (:func:`panacea.set_preference`) instead of scaling adapters.

A run that has no adapters yet (stopped before training finished) is named as such, with the
``python -m mva_lightning ... ckpt_path=<run>/checkpoints/last.ckpt`` command that resumes it
(:func:`resume_command`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
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
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Save a LoRA config and tensors as a standard PEFT adapter folder, atomically.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (plus one JSON
    file per ``extra_json`` entry, file name -> object, one text file per ``extra_text``
    entry, e.g. a model card ``README.md``, and whatever ``extra_files(folder)`` writes) and
    loads with ``PeftModel.from_pretrained(base, folder)``. It appears whole or not at all.
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
        if extra_files is not None:
            extra_files(tmp)
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


def shared_adapter(cfg) -> str | None:
    """The one adapter every value of the run trained (``method.shared_adapter``), or None."""
    method = cfg.get("method") or {}
    return method.get("shared_adapter") or None


def is_panacea(cfg) -> bool:
    """Whether the run is Panacea's (``method.preference_input``: w is an input of one model)."""
    return bool((cfg.get("method") or {}).get("preference_input", False))


def run_adapters(cfg) -> list[str]:
    """The adapters a run trains and saves under ``adapters/``, in order.

    One per value, named after it (MVA, SOUP, ...), or the one shared adapter of a baseline
    (``method.shared_adapter``: DPO, DPO-LW, DPO-SeqT, MODPO). MODPO's frozen margin adapters are
    not part of the run (they are read from ``method.margin_from`` during training only).
    Panacea: the values, the entries of its preference input (its one model is in
    ``adapters/panacea/``).
    """
    shared = shared_adapter(cfg)
    return [shared] if shared else run_values(cfg)


def build_policy(cfg, run_dir: str | os.PathLike):
    """Base model from ``cfg.model.loader`` with the run's adapters loaded (w = 0).

    The adapters are :func:`run_adapters`: one value vector per value, or the shared adapter.

    Returns:
        ``(policy, backbone)``: the PEFT model (eval mode, frozen) and the base's Backbone.

    Raises:
        FileNotFoundError: An adapter file is missing; where the run has a checkpoint, the
            message names the ``ckpt_path=`` command that resumes it (:func:`resume_command`).
    """
    from safetensors.torch import load_file

    from mva_lightning.assembly import build_policy as build_model
    from mva_lightning.model import lora

    names = run_adapters(cfg)
    root = Path(run_dir) / "adapters"
    if is_panacea(cfg):
        return _build_panacea(cfg, run_dir, names)
    folders = {a: root / a / "adapter_model.safetensors" for a in names}
    missing = [str(p) for p in folders.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(_missing_message(cfg, run_dir, names, missing))
    backbone, policy = build_model(cfg, names)
    for a, path in folders.items():
        lora.load_adapter_state_dict(policy, a, load_file(str(path)))
    policy.eval()
    return policy, backbone


def _build_panacea(cfg, run_dir, values: list[str]):
    # build_policy for Panacea: its SVD-LoRA layers, loaded from adapters/panacea/ (adapter off)
    from mva_lightning.assembly import build_policy as build_model
    from mva_lightning.model import panacea
    from mva_lightning.training.module import PANACEA_ADAPTER

    folder = Path(run_dir) / "adapters" / PANACEA_ADAPTER
    if not (folder / panacea.WEIGHTS_FILE).is_file():
        missing = [str(folder / panacea.WEIGHTS_FILE)]
        raise FileNotFoundError(_missing_message(cfg, run_dir, [PANACEA_ADAPTER], missing))
    backbone, policy = build_model(cfg, values)
    panacea.load(policy, folder)
    policy.eval()
    return policy, backbone


def _missing_message(cfg, run_dir, names: list[str], missing: list[str]) -> str:
    run = Path(run_dir)
    values = run_values(cfg)
    trained = (
        f"one shared adapter {names[0]!r} for every value {values}"
        if names != values
        else f"one value vector per value {values}"
    )
    if not (run / "adapters").is_dir():
        head = (
            f"{run / 'adapters'}: no value vectors yet (the run did not finish training; "
            f"value vectors not found: {missing}; it trains {trained})"
        )
    else:
        head = (
            f"value vectors not found: {missing}; the run trains {trained} and saves them to "
            f"{run / 'adapters'}/<adapter>/ when training finishes"
        )
    checkpoint = last_checkpoint(run)
    if checkpoint is None:
        return f"{head}; no checkpoint to resume from in {run / 'checkpoints'}"
    return f"{head}; resume it with: {resume_command(run, checkpoint)}"


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``<run_dir>/checkpoints/last.ckpt`` if present, else the newest ``*.ckpt`` there, or None."""
    folder = Path(run_dir) / "checkpoints"
    last = folder / "last.ckpt"
    if last.is_file():
        return last
    found = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


_RESUME_DROP = ("ckpt_path=", "+ckpt_path=", "hydra.run.dir=", "paths.output_dir=")


def resume_command(run_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> str:
    """The command that resumes an interrupted run from ``checkpoint`` into the same folder.

    A run of ``python -m mva_lightning`` over the package's configs (its Hydra record
    ``<run_dir>/.hydra/overrides.yaml``): its own overrides, ``hydra.run.dir=<run_dir>`` and
    ``ckpt_path=<checkpoint>``. Otherwise (a run started from Python, ``train(cfg)``, or one
    already resumed this way): the run's saved, resolved ``config.yaml`` as the primary config
    (``--config-path <run_dir> --config-name config``), so the resumed run has exactly the
    settings the run had.
    """
    run = Path(os.path.abspath(run_dir))  # absolute; last.ckpt stays a name, not its target
    args: list[str] = ["python", "-m", "mva_lightning"]
    overrides = _command_overrides(run)
    if overrides is not None:
        args += [o for o in overrides if not o.startswith(_RESUME_DROP)]
    else:
        args += ["--config-path", str(run), "--config-name", "config"]
    args += [f"hydra.run.dir={_hydra_value(run)}", f"ckpt_path={_hydra_value(checkpoint)}"]
    return shlex.join(args)


def _command_overrides(run: Path) -> list[str] | None:
    # The overrides of the command that made the run, where it composed the package's configs
    # (None: no record, an unreadable one, or a run composed from its own saved config.yaml).
    from omegaconf import OmegaConf

    record = run / ".hydra"
    if not (record / "overrides.yaml").is_file():
        return None
    try:
        overrides = [str(o) for o in OmegaConf.load(record / "overrides.yaml")]
        if (record / "hydra.yaml").is_file():
            sources = OmegaConf.load(record / "hydra.yaml").hydra.runtime.config_sources
            for source in sources:
                own = source.schema == "file" and Path(source.path).resolve() == run.resolve()
                if source.provider == "main" and own:
                    return None
    except Exception:  # a damaged record: the saved config.yaml says it all
        return None
    return overrides


def _hydra_value(path: str | os.PathLike) -> str:
    # An absolute path as a Hydra override value: quoted where Hydra's grammar needs it (a
    # checkpoint named epoch=0-step=10.ckpt holds '=')
    text = os.path.abspath(path)
    if re.fullmatch(r"[\w./:+-]+", text, re.ASCII):
        return text
    return "'" + text.replace("'", "\\'") + "'"


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


def run_weights(cfg, preference: Preference) -> dict[str, float]:
    """Adapter name -> weight for a run's ``preference`` (see :func:`load_policy`).

    One adapter per value: :func:`preference_weights` over the values. A shared adapter (one
    model for every value): None -> 1.0 (the model as trained), ``[w]`` or ``{shared: w}`` -> w.

    Raises:
        ValueError: A list of the wrong length (for a shared-adapter run: anything but one
            entry; the message names the run's adapter and values).
        KeyError: A mapping naming an adapter the run did not train.
        TypeError: A string.
    """
    names, values = run_adapters(cfg), run_values(cfg)
    if names == values:
        return preference_weights(values, preference)
    shared = names[0]
    method = (cfg.get("method") or {}).get("name") or "this"
    what = (
        f"the {method} run trained one shared adapter {shared!r} (adapters/{shared}/) for every "
        f"value {values}, one model, not one vector per value: its preference is one weight, "
        f"None (1.0, the model as trained), [w] or {{{shared!r}: w}}"
    )
    if preference is None:
        return {shared: 1.0}
    if isinstance(preference, str):
        raise TypeError(f"preference must be a list of floats or a mapping, got {preference!r}")
    if isinstance(preference, Mapping):
        unknown = [k for k in preference if k != shared]
        if unknown:
            raise KeyError(f"preference names {unknown} have no adapter; {what}")
        return {shared: float(preference.get(shared, 0.0))}
    w = [float(x) for x in preference]
    if len(w) != 1:
        raise ValueError(f"preference vector {w} has {len(w)} entries; expected 1: {what}")
    return {shared: w[0]}


def load_policy(run_dir: str | os.PathLike, preference: Preference = None):
    """The model of a finished run for preference vector w, ready to use.

    Args:
        run_dir: The run folder (``config.yaml`` and ``adapters/``, see :func:`run_adapters`).
        preference: For a run with one value vector per value (MVA, SOUP, the ablations): w as a
            list in the run's value order, a mapping value -> w_v (values left out get 0), or
            None for w = (1, ..., 1). Any real numbers: extrapolation (w_v > 1) and negative
            weights are exact too. For a shared-adapter run (DPO, DPO-LW, DPO-SeqT, MODPO: one
            adapter, ``method.shared_adapter``, trained by every value) the run is one model and
            w is the one weight of its adapter: None or ``[1.0]`` is the model as trained (what
            the run's sweep scored, candidate ``[[1.0]]``), ``[w]`` or ``{"policy": w}`` scales
            it (0: the base model). A per-value list is refused (its length is not 1).
            Panacea: w, as for MVA, fed as the preference input (``panacea.set_preference``
            switches it in place; w = 0 keeps the shared singular values, ``None`` given to
            ``set_preference`` is the base).

    Returns:
        ``(model, tokenizer)``: the PEFT model computing W_0 + sum_a w_a delta W_a over the run's
        adapters, in eval mode; call ``lora.set_weights(model, {...})`` to switch w without
        reloading.

    Raises:
        FileNotFoundError: No config or adapter files in ``run_dir`` (a run that did not finish:
            the message names the ``ckpt_path=`` command that resumes it).
        ValueError: A preference list of the wrong length.
        KeyError: A preference naming an unknown value or adapter.
    """
    from mva_lightning.model import lora

    cfg = run_config(run_dir)
    weights = run_weights(cfg, preference)  # checked before the model loads
    policy, backbone = build_policy(cfg, run_dir)
    if is_panacea(cfg):  # w is the preference input of the one model
        from mva_lightning.model import panacea

        panacea.set_preference(policy, list(weights.values()))
    else:
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
        preference: w, as for :func:`load_policy` (one weight for a shared-adapter run).
        out_dir: Target folder (replaced whole if it exists).

    Returns:
        ``out_dir``.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    from mva_lightning.model import lora

    cfg = run_config(run_dir)
    weights = run_weights(cfg, preference)
    policy, backbone = build_policy(cfg, run_dir)
    if is_panacea(cfg):  # the exact LoRA adapter of the model at w
        from mva_lightning.model import panacea

        config, state = panacea.peft_adapter(policy, list(weights.values()))
        base = panacea.unload(policy)
    else:
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
