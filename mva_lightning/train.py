"""``train(cfg)``: the whole MVA run from a composed config; the entry point and tests call it.

Below this function nothing takes a DictConfig: objects come from ``_target_`` nodes and plain
values are passed on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mva_lightning.assembly import ConfigError, build, check_config, load_value_splits
from mva_lightning.io import write_text
from mva_lightning.profiling import StageTimer

log = logging.getLogger(__name__)


def resume_stage(ckpt_path: str | None) -> int:
    """The stage a checkpoint was saved in (0 without a checkpoint)."""
    if not ckpt_path:
        return 0
    import torch

    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    meta = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("mva")
    if meta is None:
        raise ConfigError(f"ckpt_path={ckpt_path}: not an mva_lightning checkpoint")
    return int(meta["stage"])


def train(cfg: DictConfig) -> dict[str, float]:
    """Train the value vectors stage by stage, then run the post-training callbacks.

    Args:
        cfg: The composed config (``conf/config.yaml`` plus overrides).

    Returns:
        The final logged metrics (floats), also written to ``<run>/metrics.json``.
    """
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mva_lightning.io import write_json
    from mva_lightning.model import lora

    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _launch_rank() == 0:  # DDP relaunches this command per rank: one writer
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    os.environ.setdefault("WANDB_MODE", "offline")
    L.seed_everything(cfg.seed, workers=True)

    timer = StageTimer()
    with timer.stage("data"):
        splits = load_value_splits(cfg)
    start = resume_stage(cfg.get("ckpt_path"))
    with timer.stage("model"):
        backbone, module, datamodule = build(cfg, splits)
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    metrics: dict[str, float] = {}
    try:
        for stage in range(start, len(module.stages)):
            module.begin_stage(stage)
            datamodule.active_values = module.stage_values
            tag = f"stage{stage}-{'+'.join(module.stage_values)}"
            callbacks = [
                instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node
            ]
            # extrapolation=none (or null) disables it; a method's candidate settings merged
            # into a disabled sweep leave a node without _target_ (conf/method/): disabled too
            if cfg.get("extrapolation") and "_target_" in cfg.extrapolation:
                callbacks.append(instantiate(cfg.extrapolation))
            callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir / "checkpoints" / tag,
                    save_last="link",
                    save_top_k=1,
                    every_n_train_steps=cfg.train.checkpoint_every_n_steps,
                )
            )
            trainer = instantiate(
                cfg.trainer,
                callbacks=callbacks,
                logger=loggers or False,
                default_root_dir=str(run_dir),
            )
            ckpt = cfg.get("ckpt_path") if stage == start else None
            with timer.stage(f"train {tag}"):
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        if module.trainer.is_global_zero:
            lora.save_value_vectors(module.policy, run_dir / "adapters", module.adapter_names)
            write_json(run_dir / "metrics.json", metrics)
            write_json(run_dir / "timings.json", timer.rows)
    finally:
        _finish_wandb(loggers)
    return metrics


def _launch_rank() -> int:
    """Global rank of this process before any Trainer exists (0 unless launched as a rank)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _finish_wandb(loggers: list) -> None:
    # One W&B run per Hydra job: without finish(), multirun jobs merge into one run.
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
