"""``python -m mva_lightning.sweep run_dir=DIR [...]``: rerun the Pareto sweep over a finished run.

A Hydra application over ``conf/sweep.yaml`` (the command forms are listed there). The base is
the run's saved ``config.yaml``; what the command line composes under ``extrapolation`` changes
its sweep settings by one rule (:func:`sweep_settings`):

- nothing: the run's own settings (``conf/extrapolation/grid.yaml`` if it trained without a sweep);
- a node with a ``_target_`` (``extrapolation=NAME``, with any ``extrapolation.KEY=V``) replaces
  the run's, and its interpolations (``${train.beta}``, ``${value.helpful.scorer}``) resolve
  against the run's config;
- a node without one (``+extrapolation.save=all``) is merged onto the run's settings, key by key
  (where it holds a node with a ``_target_``, that node replaces the run's).

The sweep writes into ``<run_dir>/<output_subdir>`` (same folder as training: scored candidates
are read back); Hydra itself writes nothing (no ``outputs/`` folder, ``.hydra/`` or log file; logs
go to stdout), so the command runs from any directory. :func:`rerun` is the same as plain Python.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mva_lightning.errors import user_errors
from mva_lightning.model.precision import autocast
from mva_lightning.sweep.manifest import MANIFEST, ExtrapolationResult

if TYPE_CHECKING:
    from mva_lightning.sweep.callback import ExtrapolationCallback

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULT = "grid"  # the sweep of a run that trained without one
USAGE = (
    "usage: python -m mva_lightning.sweep run_dir=DIR [extrapolation=NAME] "
    "[extrapolation.KEY=VALUE | +extrapolation.KEY=VALUE ...] [device=cuda]"
)


def sweep_settings(own: Mapping | None, chosen: Mapping | None) -> dict[str, Any]:
    """The ``extrapolation`` node to run, interpolations unresolved.

    Args:
        own: The run's saved ``extrapolation`` node (None: it trained without a sweep; a node
            without ``_target_``, a method's candidates, goes onto the default ``grid``).
        chosen: What the command line composed under ``extrapolation``, or None.

    Returns:
        ``chosen`` if it has a ``_target_``; else ``chosen`` merged onto the run's settings.
    """
    chosen = _plain(chosen)
    if chosen is not None and "_target_" in chosen:
        return chosen
    base = _plain(own) or {}
    if "_target_" not in base:
        base = _merge(default_extrapolation(), base)
    return _merge(base, chosen or {})


def _plain(node: Mapping | None) -> dict[str, Any] | None:
    if node is None:
        return None
    node = node if isinstance(node, DictConfig) else OmegaConf.create(dict(node))
    return OmegaConf.to_container(node, resolve=False)


def _merge(base: Any, patch: Any) -> Any:
    # patch onto base, key by key; a mapping with a _target_ (another class) replaces whole
    if not isinstance(patch, dict) or not isinstance(base, dict) or "_target_" in patch:
        return patch
    return {**base, **{k: _merge(base.get(k), v) for k, v in patch.items()}}


def default_extrapolation() -> dict[str, Any]:
    """``conf/extrapolation/grid.yaml`` composed (its objective included), unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"extrapolation={DEFAULT}"]
    if GlobalHydra.instance().is_initialized():  # inside the Hydra app: the same configs
        node = compose(config_name="sweep", overrides=overrides).extrapolation
    else:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            node = compose(config_name="sweep", overrides=overrides).extrapolation
    return OmegaConf.to_container(node, resolve=False)


def sweep_config(run_dir: str | os.PathLike, extrapolation: Mapping | None = None) -> DictConfig:
    """The run's saved config with the sweep settings to run (:func:`sweep_settings`).

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder with a ``config.yaml``.
    """
    from mva_lightning.loading import run_config

    if not Path(run_dir).is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no such run folder; expected a finished training run's output folder "
            "(config.yaml, adapters/<value>/ or a baseline's adapters/<shared adapter>/)"
        )
    cfg = run_config(run_dir)
    settings = sweep_settings(cfg.get("extrapolation"), extrapolation)
    OmegaConf.update(cfg, "extrapolation", settings, merge=False)
    return cfg


def run_sweep(
    cfg: DictConfig, run_dir: str | os.PathLike, device: str = "cpu"
) -> ExtrapolationCallback:
    """Load the run's value vectors and data as ``cfg`` says and sweep into ``run_dir``.

    A shared-adapter run (``method.shared_adapter``: DPO, DPO-LW, DPO-SeqT, MODPO) loads its one
    adapter and the candidates weight it, scores per value, as its callback did in training.

    Returns:
        The :class:`ExtrapolationCallback` that ran: its ``result``, and its ``out_dir`` (where
        the manifest is).
    """
    from hydra.utils import instantiate

    from mva_lightning.assembly import build_datamodule, load_value_splits
    from mva_lightning.loading import build_policy, run_adapters, run_values

    callback = instantiate(cfg.extrapolation)  # bad settings fail before the model loads
    values = run_values(cfg)
    # what the candidates weight, as the callback did in training: a shared adapter or None
    names = run_adapters(cfg)
    adapters = names if names != values else None
    splits = load_value_splits(cfg)
    policy, backbone = build_policy(cfg, run_dir)
    policy.to(device)
    datamodule = build_datamodule(cfg, splits, backbone.tokenizer)
    precision = OmegaConf.select(cfg, "trainer.precision", default=None)  # the run's own
    with autocast(precision, device.split(":")[0]):
        callback.run(policy, datamodule, values, run_dir, adapters)
    return callback


def rerun(
    run_dir: str | os.PathLike, extrapolation: Mapping | None = None, device: str = "cpu"
) -> ExtrapolationResult:
    """Rerun the sweep of a finished run (what the command does, as a function).

    Args:
        run_dir: The run folder (``config.yaml``, ``adapters/<value>/`` or a shared-adapter
            baseline's ``adapters/<shared>/``).
        extrapolation: Sweep settings, as the command line composes them (see
            :func:`sweep_settings`): None for the run's own, a full node (with ``_target_``)
            to replace them, or a partial one (e.g. ``{"save": "all"}``) to patch them.
        device: Torch device of the model.

    Returns:
        The sweep's result, also in ``<run_dir>/<output_subdir>/pareto.json``.

    Raises:
        FileNotFoundError: No run folder, ``config.yaml`` or value vectors (a run that did not
            finish training: the message names the ``ckpt_path=`` command that resumes it).
        ValueError: Bad sweep settings (before the model loads).
    """
    return run_sweep(sweep_config(run_dir, extrapolation), run_dir, device).result


@hydra.main(version_base="1.3", config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> float:
    """Rerun the sweep, print its metrics and where the manifest is; return the hypervolume."""
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise SystemExit(USAGE)
    with user_errors(ValueError):  # the user's input: one line (HYDRA_FULL_ERROR=1: traceback)
        run = sweep_config(cfg.run_dir, cfg.get("extrapolation"))
        callback = run_sweep(run, cfg.run_dir, cfg.device)
    result = callback.result
    print(" ".join(f"{k}={v:.4g}" for k, v in result.metrics().items()))
    print(
        f"{len(result.weights)} candidates ({result.scored} scored, {result.skipped} cached), "
        f"front {result.front_size}; manifest: {callback.out_dir(cfg.run_dir) / MANIFEST}"
    )
    return result.hypervolume
