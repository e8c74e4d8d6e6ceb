"""``train(cfg)``: the whole MVA run from a composed config; the entry point and tests call it.

One run is one ``Trainer.fit``: the module trains the value vectors stage by stage inside it
(:mod:`mva_lightning.training.stages`), :class:`~mva_lightning.training.export.SaveValueVectors`
writes them when training ends, then the diagnostics and extrapolation callbacks run once, at
the end of fit. The pieces come from :mod:`mva_lightning.assembly`. The run ends by writing and
printing its summary (:mod:`mva_lightning.report`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mva_lightning.assembly import ConfigError, build, check_config, load_value_splits
from mva_lightning.io import write_text
from mva_lightning.profiling import StageTimer, fit_timer
from mva_lightning.tracking import wandb_settings

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train every value vector in one ``Trainer.fit``, then diagnostics and the sweep.

    Args:
        cfg: The composed config (``mva_lightning/conf/config.yaml`` plus overrides).

    Returns:
        The final logged metrics and the callbacks' results (floats), also written to
        ``<run>/metrics.json``.
    """
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mva_lightning.io import write_json
    from mva_lightning.training.export import SaveValueVectors

    check_config(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _launch_rank() == 0:  # DDP relaunches this command per rank: one writer
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    os.environ.setdefault("WANDB_MODE", "offline")
    L.seed_everything(cfg.seed, workers=True)

    timer = StageTimer()
    with timer.stage("data"):
        splits = load_value_splits(cfg)
    with timer.stage("model"):
        backbone, module, datamodule = build(cfg, splits)
    loggers = [  # (partial: wandb's `config` keyword would clash with instantiate's)
        instantiate(node, _partial_=True)(**(wandb_settings(cfg) if _is_wandb(node) else {}))
        for node in (cfg.get("logger") or {}).values()
        if node
    ]
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    # extrapolation=none (or null) disables it; a method's candidate settings merged into a
    # disabled sweep leave a node without _target_ (conf/method/): disabled too
    if cfg.get("extrapolation") and "_target_" in cfg.extrapolation:
        callbacks.append(instantiate(cfg.extrapolation))
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last="link",
        save_top_k=1,
        every_n_train_steps=cfg.train.checkpoint_every_n_steps,
    )
    callbacks += [SaveValueVectors(run_dir / "adapters"), checkpoint, fit_timer(timer)]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        **module.trainer_limits(),  # the config's max_epochs / max_steps count per stage
    )
    try:
        # weights_only: a checkpoint from elsewhere is read as data, never run as code
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        for callback in callbacks:  # diagnostics and sweep hand back their own results
            if hasattr(callback, "metrics"):
                metrics.update(callback.metrics())
        if trainer.is_global_zero:
            write_json(run_dir / "metrics.json", metrics)
            write_json(run_dir / "timings.json", timer.rows)
    finally:
        _finish_wandb(loggers)
    if trainer.is_global_zero:  # the run's last words: where everything is, with intervals
        from mva_lightning.report import summary

        sweep_dir = (cfg.get("extrapolation") or {}).get("output_subdir") or "extrapolation"
        text = summary(run_dir, sweep_dir)
        write_text(run_dir / "summary.md", text)
        print("\n" + text, flush=True)
    return metrics


def _is_wandb(node) -> bool:
    return str(node.get("_target_", "")).endswith("WandbLogger")


def _launch_rank() -> int:
    """Global rank of this process before any Trainer exists (0 unless launched as a rank)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _finish_wandb(loggers: list) -> None:
    # One W&B run per Hydra job: without finish(), multirun jobs merge into one run.
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
