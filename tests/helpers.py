"""Callbacks used by tests through config (``+callbacks.NAME._target_=helpers.X``)."""

import lightning as L


class CrashAt(L.Callback):
    """Raise at the start of a given epoch of a given stage: a killed run, for resume tests."""

    def __init__(self, stage: int, epoch: int):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.stage == self.stage and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")
