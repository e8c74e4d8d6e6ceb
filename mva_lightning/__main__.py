"""``python -m mva_lightning [overrides]``: a thin Hydra entry point over :func:`train`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mva_lightning.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Compose the config, train, and return the Pareto hypervolume (for sweepers) if any."""
    metrics = train(cfg)
    return metrics.get("pareto/hypervolume")


if __name__ == "__main__":
    main()
