"""Write the value vectors as soon as training ends (before diagnostics and the sweep)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from mva_lightning.model import lora

log = logging.getLogger(__name__)


class SaveValueVectors(L.Callback):
    """At the end of training, one PEFT adapter folder per trained adapter (rank zero).

    ``<dirpath>/<adapter>/adapter_config.json`` and ``adapter_model.safetensors``, each folder
    written atomically. Runs in ``on_train_end``, which Lightning calls before any callback's
    ``on_fit_end``: a run that fails during its diagnostics or sweep keeps its value vectors.

    Args:
        dirpath: The run's ``adapters/`` folder.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(pl_module, "finished", True):
            log.warning("training stopped before its last stage: value vectors not exported")
            return
        if trainer.is_global_zero:
            lora.save_value_vectors(pl_module.policy, self.dirpath, pl_module.adapter_names)
