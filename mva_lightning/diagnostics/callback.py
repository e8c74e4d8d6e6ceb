"""``InterferenceDiagnostics``: cosine similarity and MI between value vectors after training.

No math here: :mod:`mva_lightning.diagnostics.interference` computes; this callback picks
held-out batches, writes ``diagnostics/interference.csv``, ``.json`` and ``cosine_heatmap.png``
to the run folder (atomically, rank zero) and logs the numbers to every logger and, with a
``WandbLogger``, a ``wandb.Table`` and a ``wandb.Image``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

from mva_lightning.diagnostics import interference
from mva_lightning.io import write_csv, write_json

log = logging.getLogger(__name__)


class InterferenceDiagnostics(L.Callback):
    """Interference between value vectors, computed once at the end of fit (all stages done).

    The results stay on the callback (:meth:`metrics`, :attr:`pairs`); ``train()`` collects
    them.

    The MI uses u = A_i h, v = A_j h with h the hidden states entering each adapted module
    when the base model (every adapter off) reads held-out batches; see
    :mod:`mva_lightning.diagnostics.interference`.

    Args:
        split: Held-out split to read (``val`` or ``test``); a value without pairs there falls
            back to the other held-out split, then to ``train``.
        max_batches: Batches per value fed through the base model (0: cosine only, no MI).
        max_tokens: Cap on tokens per module for the MI.
        mine_steps: Steps of each fresh MINE head (0: cosine only).
        mine_hidden: Width of the MINE head's hidden layers.
        per_module_mi: Also estimate the MI per module (one MINE head per module and pair).
        dirpath: Output folder (default: ``<trainer.default_root_dir>/diagnostics``).
        seed: Seeds subsampling and the MINE heads.
    """

    def __init__(
        self,
        split: str = "val",
        max_batches: int = 1,
        max_tokens: int = 4096,
        mine_steps: int = 300,
        mine_hidden: int = 32,
        per_module_mi: bool = False,
        dirpath: str | None = None,
        seed: int = 0,
    ) -> None:
        if split not in ("val", "test", "train"):
            raise ValueError(f"diagnostics.split: expected val, test or train, got {split!r}")
        if max_batches < 0 or mine_steps < 0:
            raise ValueError(
                f"diagnostics: max_batches and mine_steps must be >= 0, got {max_batches}, "
                f"{mine_steps}"
            )
        self.split, self.max_batches, self.max_tokens = split, max_batches, max_tokens
        self.mine_steps, self.mine_hidden = mine_steps, mine_hidden
        self.per_module_mi, self.dirpath, self.seed = per_module_mi, dirpath, seed
        self.pairs: list[interference.PairInterference] = []

    def metrics(self) -> dict[str, float]:
        """``diagnostics/*`` scalars of the last computation (empty before it)."""
        return interference.scalars(self.pairs) if self.pairs else {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not getattr(pl_module, "finished", True):
            return
        if len(pl_module.values) < 2:
            log.info("interference diagnostics skipped: a single value vector")
            return
        start = time.perf_counter()
        projections = None
        if self.max_batches > 0 and self.mine_steps > 0:
            batches = self._batches(trainer, pl_module)
            if batches:
                projections = interference.base_projections(
                    pl_module.policy, pl_module.values, batches, self.max_tokens, self.seed
                )
        self.pairs = interference.interference(
            pl_module.policy,
            pl_module.values,
            projections,
            mine_steps=self.mine_steps,
            mine_hidden=self.mine_hidden,
            per_module_mi=self.per_module_mi,
            seed=self.seed,
        )
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "diagnostics")
        write_csv(folder / "interference.csv", interference.table_rows(self.pairs))
        write_json(folder / "interference.json", interference.summary(self.pairs, pl_module.values))
        png = interference.plot_heatmap(self.pairs, pl_module.values, folder / "cosine_heatmap.png")
        scalars = interference.scalars(self.pairs)
        self._log(trainer, scalars, png)
        log.info(
            "interference diagnostics in %.1fs: %s",
            time.perf_counter() - start,
            {k: round(v, 4) for k, v in scalars.items()},
        )

    def _batches(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            log.warning("interference diagnostics: no datamodule, MI skipped")
            return []
        order = [self.split, *[s for s in ("val", "test", "train") if s != self.split]]
        batches = []
        for value in pl_module.values:
            split = next((s for s in order if getattr(dm.splits[value], s)), None)
            if split is None:
                continue
            for i, batch in enumerate(dm.loader(value, split)):
                if i >= self.max_batches:
                    break
                batches.append(
                    {k: batch[k].to(pl_module.device) for k in ("input_ids", "attention_mask")}
                )
        return batches

    def _log(self, trainer: L.Trainer, scalars: dict[str, float], png: Path) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.log(wandb_payload(self.pairs, png))
            logger.save()


def wandb_payload(pairs: list[interference.PairInterference], png: Path) -> dict:
    """``{"diagnostics/interference": wandb.Table, "diagnostics/cosine_heatmap": wandb.Image}``."""
    import wandb

    rows = interference.table_rows(pairs)
    columns = list(rows[0])
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
    return {"diagnostics/interference": table, "diagnostics/cosine_heatmap": wandb.Image(str(png))}
