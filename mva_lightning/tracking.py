"""What a W&B run records besides the metrics: the resolved config, a group and tags.

Every W&B run gets the whole resolved config (lr, model, data, seed, sweep settings: not only
the module's hyperparameters), a group (the multirun sweep it belongs to, so that the jobs of
one ``-m`` sweep sit together; a single run is grouped by its setting) and tags (method,
setting, model). Values the config sets explicitly (``logger.wandb.group``, ``.tags``) win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _hydra_runtime() -> tuple[dict[str, Any], str | None]:
    """The config-group choices of this Hydra job, and its multirun folder (None: single run
    or no Hydra app, e.g. a config composed in a test or a notebook)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except (ImportError, ValueError):
        return {}, None
    choices = {k: v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra/")}
    multirun = str(hydra.mode) == "RunMode.MULTIRUN"
    return choices, str(hydra.sweep.dir) if multirun else None


def wandb_settings(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments for ``WandbLogger``: ``config``, ``group`` and ``tags``.

    Args:
        cfg: The composed config of the run.
    """
    choices, sweep_dir = _hydra_runtime()
    setting = choices.get("experiment") or "default"
    method = OmegaConf.select(cfg, "method.name", default="mva")
    model = choices.get("model") or OmegaConf.select(cfg, "model.loader._target_", default="")
    node = OmegaConf.select(cfg, "logger.wandb") or {}
    group = node.get("group") or (
        f"{setting}/{Path(sweep_dir).parent.name}_{Path(sweep_dir).name}" if sweep_dir else setting
    )
    tags = list(node.get("tags") or [f"method:{method}", f"setting:{setting}", f"model:{model}"])
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "group": group,
        "tags": tags,
    }
