"""The extrapolation callback: once training is finished, sweep preference vectors (no math here).

All the work is :func:`mva_lightning.sweep.sweep.extrapolate`; this class only decides when it
runs (once, at the end of fit, when every stage is trained, on every rank: each scores its share
of the candidates, rank zero writes), where it writes (``<default_root_dir>/<output_subdir>``)
and where the results go (the trainer's loggers: W&B table / image / summary;
:meth:`ExtrapolationCallback.metrics` for ``train()``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from mva_lightning.model.precision import autocast, device_type
from mva_lightning.sweep.manifest import ExtrapolationResult
from mva_lightning.sweep.objectives import Objective
from mva_lightning.sweep.samples import SAMPLES
from mva_lightning.sweep.sweep import Shard, check, extrapolate


class ExtrapolationCallback(L.Callback):
    """Build the Pareto set of preference vectors once the value vectors are trained.

    Under a multi-process strategy (world size N > 1) the sweep is sharded: rank r scores the
    candidates r, r + N, ... (the base, w = 0, is candidate 0; each rank computes its own
    reference log-probs), caching them in ``scores/<key>/rank<r>/``; every rank gathers every
    score (per-item scores included), and rank zero alone selects the front, computes the
    hypervolume and intervals and writes the manifest and checkpoints, as one process would.

    Args:
        candidates: ``mode`` (grid | simplex | explicit), ``values`` / ``start`` / ``stop`` /
            ``step``, ``vectors``, ``include_zero``: see :func:`candidates.build_candidates`.
        objective: What to maximise per value (:mod:`mva_lightning.sweep.objectives`).
        reference_point: ``"base"`` (scores of w = 0) or one number per value.
        save: Checkpoints for the ``"front"`` or ``"all"`` candidates.
        report_split: Also score the front on this split (``"test"``), or None.
        output_subdir: Folder under the run dir.
        progress: Show tqdm bars.
        bootstrap: Interval settings (``resamples``, ``level``, ``seed``; see
            :class:`~mva_lightning.sweep.bootstrap.Bootstrap`); None: the defaults.
        samples: Greedy answers of the base and each front point to held-out prompts
            (``num_prompts``, ``max_new_tokens``, ``split``; see
            :class:`~mva_lightning.sweep.samples.SampleSettings`), in ``samples.jsonl`` and a
            W&B table.
    """

    def __init__(
        self,
        candidates: Mapping[str, Any] | Sequence[Sequence[float]],
        objective: Objective,
        reference_point: str | Sequence[float] = "base",
        save: str = "front",
        report_split: str | None = "test",
        output_subdir: str = "extrapolation",
        progress: bool = True,
        bootstrap: Mapping[str, Any] | None = None,
        samples: Mapping[str, Any] | None = None,
    ) -> None:
        from mva_lightning.sweep.bootstrap import Bootstrap
        from mva_lightning.sweep.samples import SampleSettings

        self.bootstrap = Bootstrap(**(bootstrap or {}))  # bad settings fail here, before fit
        self.samples = SampleSettings(**(samples or {}))
        self.candidates, self.objective = candidates, objective
        self.reference_point, self.save, self.report_split = reference_point, save, report_split
        self.output_subdir, self.progress = output_subdir, progress
        self.result: ExtrapolationResult | None = None

    def out_dir(self, run_dir: str | os.PathLike) -> Path:
        """Where the sweep writes: ``<run_dir>/<output_subdir>``."""
        return Path(run_dir) / self.output_subdir

    def metrics(self) -> dict[str, float]:
        """The last sweep's ``pareto/*`` metrics (:meth:`ExtrapolationResult.metrics`), or {}."""
        return self.result.metrics() if self.result is not None else {}

    def run(
        self,
        policy,
        datamodule,
        values: Sequence[str],
        run_dir,
        adapters=None,
        shard: Shard | None = None,
    ) -> ExtrapolationResult | None:
        """The sweep over a trained policy, written to ``<run_dir>/<output_subdir>``.

        ``adapters``: what the candidates weight when it is not one adapter per value (a
        baseline's shared adapter); the scores stay per value. ``shard``: this process's part
        of a sweep over several (:class:`~mva_lightning.sweep.sweep.Shard`); the result is
        None on a rank other than zero.
        """
        self.result = extrapolate(
            policy,
            datamodule,
            values,
            self.candidates,
            self.objective,
            self.out_dir(run_dir),
            reference_point=self.reference_point,
            save=self.save,
            report_split=self.report_split,
            run_dir=run_dir,
            progress=self.progress,
            adapters=adapters,
            bootstrap=self.bootstrap,
            samples=self.samples,
            shard=shard,
        )
        return self.result

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Bad settings fail before training, not after it.
        check(
            pl_module.policy,
            trainer.datamodule,
            pl_module.values,
            self.candidates,
            self.objective,
            self.reference_point,
            self.save,
            self.report_split,
            _adapters(pl_module),
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once: every stage trained (a fit that stopped early did not finish), on every rank.
        shard = _shard(trainer)
        if shard is None or not getattr(pl_module, "finished", True):
            return
        with autocast(trainer.precision, device_type(pl_module.policy)):  # run precision
            result = self.run(
                pl_module.policy,
                trainer.datamodule,
                pl_module.values,
                trainer.default_root_dir,
                _adapters(pl_module),
                shard,
            )
        if result is not None:  # rank zero
            self._log(trainer, result)

    def _log(self, trainer: L.Trainer, result: ExtrapolationResult) -> None:
        from lightning.pytorch.loggers import WandbLogger

        metrics = result.metrics()
        plot = self.out_dir(trainer.default_root_dir) / "pareto.png"
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                rows = result.rows()
                columns = list(dict.fromkeys(k for row in rows for k in row))
                data = [[row.get(c) for c in columns] for row in rows]
                logger.log_table("pareto/table", columns=columns, data=data)
                if plot.is_file():
                    logger.log_image("pareto/plot", images=[str(plot)])
                samples = self.out_dir(trainer.default_root_dir) / SAMPLES
                if samples.is_file():  # what each front point says, for a person to read
                    records = [json.loads(line) for line in samples.read_text().splitlines()]
                    data = [[str(r["w"]), r["prompt"], r["response"]] for r in records]
                    logger.log_table(
                        "pareto/samples", columns=["w", "prompt", "response"], data=data
                    )
                logger.experiment.summary.update(metrics)
            logger.save()


def _shard(trainer: L.Trainer) -> Shard | None:
    # This rank's part of the sweep: all of it in one process (none on a lone non-zero rank).
    world_size = getattr(trainer, "world_size", 1)
    if world_size <= 1:
        return Shard() if trainer.is_global_zero else None
    return Shard(trainer.global_rank, world_size, _all_gather_objects)


def _all_gather_objects(obj: Any) -> list[Any]:
    # Every rank's (picklable) object, in rank order; gloo and nccl alike.
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _adapters(pl_module: L.LightningModule) -> list[str] | None:
    # The adapters a candidate w weights: None when they are the values (MVA, SOUP).
    names = list(getattr(pl_module, "adapter_names", pl_module.values))
    return names if names != list(pl_module.values) else None
