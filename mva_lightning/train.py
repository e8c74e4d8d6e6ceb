"""``train(cfg)``: the whole MVA run from a composed config; the entry point and tests call it.

Below this function nothing takes a DictConfig: objects come from ``_target_`` nodes and plain
values are passed on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mva_lightning.io import write_text
from mva_lightning.profiling import StageTimer

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is missing or malformed; the message names the key."""


def check_config(cfg: DictConfig) -> None:
    """Fail fast, naming every required (``???``) key left unset and malformed values."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config keys are unset (???): {', '.join(missing)}")
    if "value" not in cfg or not cfg.value:
        raise ConfigError("no values selected: set value=[helpful,harmless,...]")
    for name, node in cfg.value.items():
        if not isinstance(node, DictConfig) or "source" not in node:
            raise ConfigError(f"value.{name}: expected a mapping with a 'source' entry")
    _check_mi(cfg)


def _check_mi(cfg: DictConfig) -> None:
    """The MI penalty's settings: alpha >= 0, known features and sigma, two values to compare."""
    from mva_lightning.mi.base import FEATURES

    mi = cfg.get("mi")
    if mi is None:
        return
    alpha = mi.get("alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0:
        raise ConfigError(f"mi.alpha must be a number >= 0, got {alpha!r}")
    est = mi.get("estimator") or {}
    features = est.get("features")
    if features is not None and features not in FEATURES:
        raise ConfigError(f"mi.estimator.features: expected one of {FEATURES}, got {features!r}")
    sigma = est.get("sigma")
    if sigma is not None and sigma != "median":
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
            raise ConfigError(
                f"mi.estimator.sigma: expected a number > 0 or 'median', got {sigma!r}"
            )
    if alpha > 0 and not str(est.get("_target_", "")).endswith("NoMI") and len(cfg.value) < 2:
        raise ConfigError(
            f"mi.alpha > 0 needs at least two values (the penalty is between value vectors), "
            f"but only value={list(cfg.value)} is configured: use mi=none or mi.alpha=0"
        )


def load_value_splits(cfg: DictConfig) -> dict[str, Any]:
    """Read every value's pairs and split them (before any model is loaded)."""
    from hydra.utils import instantiate

    from mva_lightning.data.sources import DataError, split_pairs

    splits = {}
    for name, node in cfg.value.items():
        read = instantiate(node.source, _partial_=True)  # called here: errors stay unwrapped
        try:
            pairs = read()
        except DataError as err:
            raise DataError(f"value.{name}.source: {err}") from None
        if node.get("max_pairs"):
            pairs = pairs[: node.max_pairs]
        split = cfg.data.split
        splits[name] = split_pairs(
            pairs, split.test, split.val, split.seed, split.get("by_prompt", False)
        )
        log.info(
            "value %s: %d train / %d val / %d test pairs",
            name,
            len(splits[name].train),
            len(splits[name].val),
            len(splits[name].test),
        )
    return splits


def build(cfg: DictConfig, splits: dict[str, Any]):
    """Model, value vectors, data module and LightningModule from the config."""
    from hydra.utils import instantiate

    from mva_lightning.data.datamodule import PreferenceDataModule
    from mva_lightning.model import lora
    from mva_lightning.training.methods import load_frozen, method_inputs
    from mva_lightning.training.module import MVAModule

    values = list(cfg.value.keys())
    method = method_inputs(values, **OmegaConf.to_container(cfg.get("method") or {}, resolve=True))
    backbone = instantiate(cfg.model.loader)
    names = [*method.adapter_names, *method.frozen]  # MVA: one adapter per value
    policy = lora.add_value_vectors(backbone.model, names, **cfg.model.lora)
    load_frozen(policy, method.frozen)
    if cfg.train.get("compile", False):
        compile_decoder(backbone.model)
    reference = None
    if cfg.train.separate_reference:
        reference = instantiate(cfg.model.loader).model
    datamodule = PreferenceDataModule(
        splits, backbone.tokenizer, **OmegaConf.to_container(cfg.data.loader, resolve=True)
    )
    estimator = instantiate(cfg.mi.estimator) if cfg.mi.alpha > 0 else None
    module = MVAModule(
        policy,
        values,
        optimizer=instantiate(cfg.optimizer),
        beta=cfg.train.beta,
        alpha=cfg.mi.alpha,
        mi=estimator,
        schedule=cfg.train.schedule,
        mi_optimizer=instantiate(cfg.mi.optimizer) if cfg.mi.get("optimizer") else None,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        reference_model=reference,
        precompute_reference=cfg.train.precompute_reference,
        head_on_response_only=cfg.train.head_on_response_only,
        share_prompt=cfg.train.get("share_prompt", "auto"),
        label_smoothing=cfg.train.label_smoothing,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        gradient_clip_val=cfg.train.gradient_clip_val,
        mi_max_samples=cfg.mi.max_samples,
        **method.module_kwargs(),
    )
    return backbone, module, datamodule


def compile_decoder(model) -> None:
    """``torch.compile`` the decoder stack in place (dynamic shapes: batches vary in length).

    An option for GPUs (``train.compile=true``). On this project's 2-core CPU it compiled for
    about 70 s and then ran the tiny model's step at the eager speed, so it is off by default.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise ConfigError("train.compile=true: the model has no decoder stack to compile")
    decoder.compile(dynamic=True)


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
