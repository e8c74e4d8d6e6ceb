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


class BreakOnRank(L.Callback):
    """A fault on one process only: from global step ``step`` on, process ``rank``'s training
    loss (``what="loss"``: a LoRA weight turns NaN) or MI estimate (``what="mi"``: reported
    non-finite) diverges."""

    def __init__(self, rank: int, step: int, what: str = "loss"):
        self.rank, self.step, self.what, self.done = rank, step, what, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.done or trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        self.done = True
        if self.what == "loss":
            import torch

            trainable = [p for n, p in pl_module.policy.named_parameters() if p.requires_grad]
            with torch.no_grad():
                trainable[0].fill_(float("nan"))
            return
        penalty = pl_module.mi_penalty
        real = penalty.forward

        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            out.skipped.append(("helpful", "harmless"))
            return out

        penalty.forward = forward
