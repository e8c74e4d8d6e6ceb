"""Run assembly: from a composed config to splits, policy, data module and LightningModule.

Both entry points use it: ``train(cfg)`` (:mod:`mva_lightning.train`) and the sweep command
(:mod:`mva_lightning.sweep.cli`, over a finished run's saved config). Below this module nothing
takes a DictConfig: objects come from ``_target_`` nodes and plain values are passed on.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
    from mva_lightning.training.mi_penalty import is_enabled

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
    if is_enabled(mi.get("estimator"), alpha) and len(cfg.value) < 2:
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
        if node.get("max_train_pairs"):  # after the split: the held-out pairs stay whole
            splits[name].train[node.max_train_pairs :] = []
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

    from mva_lightning.training.methods import load_frozen, method_inputs
    from mva_lightning.training.mi_penalty import is_enabled
    from mva_lightning.training.module import MVAModule

    values = list(cfg.value.keys())
    method = method_inputs(values, **OmegaConf.to_container(cfg.get("method") or {}, resolve=True))
    names = [*method.adapter_names, *method.frozen]  # MVA: one adapter per value
    backbone, policy = build_policy(cfg, names)  # Panacea: names are its preference's values
    load_frozen(policy, method.frozen)
    if cfg.train.get("compile", False):
        compile_decoder(backbone.model)
    reference = None
    if cfg.train.separate_reference:
        reference = instantiate(cfg.model.loader).model
    datamodule = build_datamodule(cfg, splits, backbone.tokenizer)
    # the one test of "no penalty" (mi=none: no estimator; or alpha 0), before instantiating
    estimator = (
        instantiate(cfg.mi.estimator) if is_enabled(cfg.mi.estimator, cfg.mi.alpha) else None
    )
    module = MVAModule(
        policy,
        values,
        optimizer=instantiate(cfg.optimizer),
        beta=cfg.train.beta,
        alpha=cfg.mi.alpha,
        mi=estimator,
        schedule=cfg.train.schedule,
        epochs_per_stage=cfg.trainer.max_epochs,
        steps_per_stage=cfg.trainer.get("max_steps", -1),
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
        **({"preference_seed": cfg.seed} if method.panacea is not None else {}),
    )
    return backbone, module, datamodule


def build_policy(cfg: DictConfig, adapters: list[str]):
    """The base model of ``model.loader`` with one LoRA adapter per name (``model.lora``).

    A Panacea run (``method.preference_input``) gets its SVD-LoRA layers instead, on the same
    ``model.lora`` target modules and rank, with one preference entry per name (its values).

    Returns:
        ``(backbone, policy)``: the base's Backbone (model and tokenizer) and the PEFT model
        (Panacea: the base model with its target modules replaced).
    """
    from hydra.utils import instantiate

    from mva_lightning.model import lora, panacea

    backbone = instantiate(cfg.model.loader)
    lora_kw = OmegaConf.to_container(cfg.model.lora, resolve=True)
    method = cfg.get("method") or {}
    if method.get("preference_input", False):
        lambda_init = method.get("lambda_init", 0.0)
        return backbone, panacea.add_panacea(
            backbone.model, adapters, lambda_init=lambda_init, **lora_kw
        )
    return backbone, lora.add_value_vectors(backbone.model, adapters, **lora_kw)


def build_datamodule(cfg: DictConfig, splits: dict[str, Any], tokenizer):
    """The :class:`PreferenceDataModule` over the splits, with ``data.loader`` settings."""
    from mva_lightning.data.datamodule import PreferenceDataModule

    loader = OmegaConf.to_container(cfg.data.loader, resolve=True)
    return PreferenceDataModule(splits, tokenizer, **loader)


def compile_decoder(model) -> None:
    """``torch.compile`` the decoder stack in place (dynamic shapes: batches vary in length).

    An option for GPUs (``train.compile=true``). On this project's 2-core CPU it compiled for
    about 70 s and then ran the tiny model's step at the eager speed, so it is off by default.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise ConfigError("train.compile=true: the model has no decoder stack to compile")
    decoder.compile(dynamic=True)
