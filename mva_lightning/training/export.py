"""Write the value vectors as soon as training ends (before diagnostics and the sweep)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from mva_lightning.model import lora

log = logging.getLogger(__name__)


class SaveValueVectors(L.Callback):
    """At the end of training, one PEFT adapter folder per trained adapter (rank zero).

    ``<dirpath>/<adapter>/adapter_config.json`` and ``adapter_model.safetensors``, each folder
    written atomically, and only when every adapter's weights are finite (a NaN or inf raises
    ``FloatingPointError`` naming the adapter, before any folder is written). Runs in
    ``on_train_end``, which Lightning calls before any callback's ``on_fit_end``: a run that
    fails during its diagnostics or sweep keeps its value vectors.

    A fit resumed (``ckpt_path=``) from a checkpoint taken after training finished, from a run
    stopped before it wrote them, trains nothing and Lightning skips ``on_train_end``: the
    vectors are written in ``on_fit_start`` then (the module's state is restored by that time,
    before the sweep), or in ``on_fit_end`` where the strategy restores it later.

    Args:
        dirpath: The run's ``adapters/`` folder.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self._saved = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved = False
        if getattr(pl_module, "finished", False):  # restored from a finished training
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(pl_module, "finished", True):
            log.warning("training stopped before its last stage: value vectors not exported")
            return
        self._save(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._saved and getattr(pl_module, "finished", False):
            self._save(trainer, pl_module)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved = True
        if trainer.is_global_zero:
            check_finite(pl_module.policy, pl_module.adapter_names, self.dirpath)
            lora.save_value_vectors(pl_module.policy, self.dirpath, pl_module.adapter_names)


def check_finite(policy, adapters, dirpath: str | Path = "adapters") -> None:
    """Raise ``FloatingPointError`` naming the first adapter holding a NaN or inf weight (none
    is written then: every adapter is checked before the first is saved)."""
    for adapter in adapters:
        for name, param in policy.named_parameters():
            if lora._owner(name) != adapter:
                continue
            finite = torch.isfinite(param.detach())
            if not bool(finite.all()):
                raise FloatingPointError(
                    f"value vector {adapter!r} has {int((~finite).sum())} non-finite "
                    f"weights (e.g. in {name}): not exported to {Path(dirpath) / adapter}; "
                    "training diverged, lower optimizer.lr"
                )
