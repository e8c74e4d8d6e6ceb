"""Callbacks used by tests through config (``+callbacks.NAME._target_=helpers.X``)."""

import lightning as L


class CrashAt(L.Callback):
    """Raise at the start of a given epoch (counted within its stage) of a given stage: a killed
    run, for resume tests."""

    def __init__(self, stage: int, epoch: int):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        in_stage = trainer.current_epoch - pl_module.stage_start_epoch
        if pl_module.stage == self.stage and in_stage == self.epoch:
            raise RuntimeError("simulated crash")
