"""``python -m mva_lightning [overrides]``: a thin Hydra entry point over :func:`train`.

A bad input (config value, data file, scorer that cannot load) is reported as one line,
``error: <message>``, with exit status 1; ``HYDRA_FULL_ERROR=1`` shows the whole traceback
(:mod:`mva_lightning.errors`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mva_lightning.errors import user_errors
from mva_lightning.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Compose the config, train, and return the Pareto hypervolume (for sweepers) if any."""
    with user_errors():  # inside the task function: Hydra would print a traceback
        metrics = train(cfg)
    return metrics.get("pareto/hypervolume")


if __name__ == "__main__":
    main()
