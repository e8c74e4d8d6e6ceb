"""The extrapolation sweep (docs/method.md §5): score preference vectors, keep the Pareto set.

:func:`extrapolate` scores every candidate w (:mod:`mva_lightning.sweep.candidates`; always the
base, w = 0, too: the default hypervolume reference) with an objective from
:mod:`mva_lightning.sweep.objectives`. The adapters stay loaded (no reload, no merge): the
objective scores ``candidates_per_forward`` preference vectors at a time in one batched
forward, each row with its own weights (:func:`lora.using_row_weights`). Each candidate's scores
are cached as soon as they exist, keyed by w and a fingerprint of the objective's settings, its
data and the value vectors, so an interrupted sweep resumes where it stopped and gives the same
front. Then: Pareto mask and hypervolume (moocore, via :mod:`mva_lightning.sweep.pareto`), one
PEFT adapter folder per saved w, the manifest and ``pareto.png``
(:mod:`mva_lightning.sweep.manifest` has the layout). Every write is atomic.

Over several processes (a :class:`Shard` per rank), rank r scores the candidates r, r + N, ...
of each list it scores (:func:`shard_of`), caches them in ``scores/<key>/rank<r>/`` and every
rank gathers every score (:func:`merge_shards`); rank zero alone selects, computes intervals and
writes. A resumed sweep reads the cache of every rank, whatever the number of processes.

Rerun over a finished run (same folder, scored candidates skipped): :mod:`mva_lightning.sweep.cli`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from mva_lightning.io import fingerprint
from mva_lightning.model import lora, panacea
from mva_lightning.model.precision import autocast_setting, device_type
from mva_lightning.sweep import bootstrap as bootstrap_mod
from mva_lightning.sweep import pareto
from mva_lightning.sweep.bootstrap import Bootstrap
from mva_lightning.sweep.candidates import candidate_set
from mva_lightning.sweep.manifest import (
    ExtrapolationResult,
    read_scores,
    save_checkpoints,
    w_label,
    write_manifest,
    write_scores,
)
from mva_lightning.sweep.objectives import Objective, Scores
from mva_lightning.sweep.samples import SAMPLES, SampleSettings, write_samples

log = logging.getLogger(__name__)

SAVE_MODES = ("front", "all")
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Shard:
    """This process's part of a sweep spread over ``world_size`` processes.

    Attributes:
        rank: This process's global rank.
        world_size: How many processes sweep together (1: this one alone).
        gather: Every rank's object, in rank order, from each rank's own (an all-gather that
            every rank calls as often as the others, e.g. ``torch.distributed.all_gather_object``);
            None when ``world_size`` is 1.
    """

    rank: int = 0
    world_size: int = 1
    gather: Callable[[Any], list[Any]] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Shard: rank {self.rank} outside 0..{self.world_size - 1}")
        if self.world_size > 1 and self.gather is None:
            raise ValueError("Shard: several processes need a gather")

    @property
    def is_zero(self) -> bool:
        """Whether this process writes (rank zero)."""
        return self.rank == 0

    def cache(self, folder: Path) -> Path:
        """Where this rank caches scores: ``folder`` alone, else ``folder/rank<r>``."""
        return folder if self.world_size == 1 else folder / f"rank{self.rank}"


def shard_of(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items rank ``rank`` of ``world_size`` handles: ``rank``, ``rank + world_size``, ..."""
    return list(items[rank::world_size])


def merge_shards(parts: Sequence[Mapping[K, T]], order: Sequence[K]) -> dict[K, T]:
    """Every rank's results (key -> result, one mapping per rank) as one mapping in ``order``.

    Raises:
        RuntimeError: A key of ``order`` that no rank has.
    """
    merged: dict[K, T] = {}
    for part in parts:
        merged.update(part)
    missing = [k for k in order if k not in merged]
    if missing:
        raise RuntimeError(f"extrapolation: no rank returned {missing}")
    return {k: merged[k] for k in order}


def cache_folders(folder: Path) -> list[Path]:
    """Every folder a sweep may have cached scores in: ``folder`` and its ``rank<r>`` folders."""
    return [folder, *sorted(p for p in folder.glob("rank*") if p.is_dir())]


def _reference(reference_point: str | Sequence[float], values: Sequence[str]) -> list[float] | None:
    if isinstance(reference_point, str):
        if reference_point != "base":
            raise ValueError(
                f"extrapolation.reference_point: expected 'base' or a list of {len(values)} "
                f"numbers, got {reference_point!r}"
            )
        return None
    ref = [float(x) for x in reference_point]
    if len(ref) != len(values) or not all(math.isfinite(x) for x in ref):
        raise ValueError(
            f"extrapolation.reference_point {list(reference_point)} must have {len(values)} "
            f"finite entries (one per value: {list(values)})"
        )
    return ref


def check(
    policy: nn.Module,
    datamodule,
    values: Sequence[str],
    candidates: Mapping | Sequence,
    objective: Objective,
    reference_point: str | Sequence[float] = "base",
    save: str = "front",
    report_split: str | None = None,
    adapters: Sequence[str] | None = None,
) -> tuple[list[tuple[float, ...]], list[float] | None, Objective | None]:
    """Every check of :func:`extrapolate`, cheap and before any work.

    Returns:
        ``(candidates, reference point or None for the base, report objective or None)``.
    """
    values = list(values)
    if not values:
        raise ValueError("extrapolation: no values to extrapolate")
    names = list(adapters or values)  # what w weights: one adapter per value unless shared
    trained = panacea.preference_names(policy) or lora.value_names(policy)  # Panacea: its w
    missing = [v for v in names if v not in trained]
    if missing:
        raise ValueError(f"extrapolation: values {missing} have no trained vector; have {trained}")
    weights = candidate_set(candidates, len(names))
    ref = _reference(reference_point, values)
    if save not in SAVE_MODES:
        raise ValueError(f"extrapolation.save: expected one of {SAVE_MODES}, got {save!r}")
    if datamodule is not None:
        objective.validate(datamodule, values)
    report = objective.for_split(report_split) if report_split else None
    if report is not None and datamodule is not None:
        report.validate(datamodule, values)
    return weights, ref, report


def extrapolate(
    policy: nn.Module,
    datamodule,
    values: Sequence[str],
    candidates: Mapping | Sequence,
    objective: Objective,
    out_dir: str | os.PathLike,
    reference_point: str | Sequence[float] = "base",
    save: str = "front",
    report_split: str | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    adapters: Sequence[str] | None = None,
    bootstrap: Bootstrap | Mapping | None = None,
    samples: SampleSettings | Mapping | None = None,
    shard: Shard | None = None,
) -> ExtrapolationResult | None:
    """Score candidates, select the Pareto front, save its checkpoints and the manifest.

    Args:
        policy: The PEFT model holding every value vector (:func:`lora.add_value_vectors`).
        datamodule: The :class:`PreferenceDataModule` with the held-out data.
        values: Value names, in the order of the preference vectors.
        candidates: Config mapping or explicit list, see :func:`candidate_set`.
        objective: What to maximise per value (:mod:`mva_lightning.sweep.objectives`).
        out_dir: Output folder (``<run>/extrapolation``).
        reference_point: ``"base"`` (the scores of w = 0) or one number per value.
        save: Write checkpoints for the ``"front"`` or for ``"all"`` candidates.
        report_split: Also score the front on this split (e.g. ``"test"``); None: do not.
        run_dir: Checkpoint paths in the manifest are relative to it (default: out_dir's parent).
        progress: Show tqdm bars.
        adapters: The adapters w weights, when they are not the values themselves (a
            baseline's one shared adapter: candidates ``[[1.0]]``); scores stay per value.
        samples: Greedy answers of the base and every front point to a few held-out prompts,
            written to ``samples.jsonl`` (:class:`SampleSettings` or its fields; None: the
            defaults; ``num_prompts=0``: none).
        bootstrap: Interval settings (:class:`Bootstrap` or its fields; None: the defaults).
            Every score gets an interval over the pairs or prompts behind it, and the
            hypervolume one from the same resamples (candidates and base rescored together).
        shard: This process's part of a sweep over several processes (every one calls this
            function with the same arguments); None: this process alone.

    Returns:
        The :class:`ExtrapolationResult` (also in ``out_dir/pareto.json``); None on a rank
        other than zero of several (it scores and caches its part, and writes nothing else).

    Raises:
        ValueError / KeyError: On bad input, before any work (see :func:`check`).
    """
    values = list(values)
    shard = shard or Shard()
    boot = bootstrap if isinstance(bootstrap, Bootstrap) else Bootstrap(**(bootstrap or {}))
    reading = samples if isinstance(samples, SampleSettings) else SampleSettings(**(samples or {}))
    weights, ref, report_objective = check(
        policy,
        datamodule,
        values,
        candidates,
        objective,
        reference_point,
        save,
        report_split,
        adapters,
    )
    names = list(adapters or values)
    out_dir = Path(out_dir)
    run_dir = Path(run_dir) if run_dir is not None else out_dir.parent
    is_panacea = panacea.is_panacea(policy)  # w is its preference input, not adapter weights
    adapter_hash = (
        panacea.fingerprint(policy) if is_panacea else lora.adapter_fingerprint(policy, names)
    )
    zero = (0.0,) * len(names)

    start = time.perf_counter()
    todo = [zero, *(w for w in weights if w != zero)]
    by_w, cache_key, scored, skipped = _score_all(
        policy, datamodule, values, objective, todo, out_dir, adapter_hash, progress, names, shard
    )
    seconds = time.perf_counter() - start
    matrix = np.array([[by_w[w][v] for v in values] for w in weights])  # (n, K)
    mask = pareto.pareto_mask(matrix)
    front = [zero, *(w for w, m in zip(weights, mask, strict=True) if m and w != zero)]
    got: dict[tuple[float, ...], Scores] = {}
    if report_objective is not None:
        # The base (w = 0) is scored on the report split too: the honest comparison there.
        got, _, _, _ = _score_all(
            policy,
            datamodule,
            values,
            report_objective,
            front,
            out_dir,
            adapter_hash,
            progress,
            names,
            shard,
        )
    if not shard.is_zero:  # every score gathered; rank zero alone selects and writes
        return None
    base = by_w[zero]
    ref = ref if ref is not None else [base[v] for v in values]
    hv = pareto.hypervolume(matrix[mask], ref)
    fixed_ref = None if reference_point == "base" else ref
    rows = [zero, *weights]  # row 0: the base
    res = _resample(by_w, rows, values, boot, objective.shared_items)
    intervals: list[dict] = []
    hv_ci = None
    if res is not None:
        per_row = _intervals(res, values, boot, by_w, rows)
        more, _ = _indicator_intervals(by_w, rows, values, boot)
        for cols, ind in zip(per_row, more, strict=True):
            cols.update(ind)
        base = {**base, **per_row[0]}
        intervals = per_row[1:]
        hv_ci = boot.interval(bootstrap_mod.hypervolumes(res, range(1, len(rows)), fixed_ref))

    report: list[dict[str, float]] = [{} for _ in weights]
    improvement = None
    behaviour: dict[str, list[dict]] = {}
    if report_objective is not None:
        split = report_objective.split
        res_report = _resample(got, front, values, boot, report_objective.shared_items)
        extra = {w: {} for w in front}
        if res_report is not None:
            per_row = _intervals(res_report, values, boot, got, front)
            more, behaviour = _indicator_intervals(got, front, values, boot)
            for w, cols, ind in zip(front, per_row, more, strict=True):
                extra[w] = {**cols, **ind}
            improvement = _improvement(res_report, front, values, by_w, got, boot)
        base = {**base, **{f"{split}/{k}": s for k, s in {**got[zero], **extra[zero]}.items()}}
        for i, w in enumerate(weights):
            if w in got:
                report[i] = {f"{split}/{k}": s for k, s in {**got[w], **extra[w]}.items()}

    keep = [bool(m) for m in mask] if save == "front" else [True] * len(weights)
    checkpoints = (panacea.save_checkpoints if is_panacea else save_checkpoints)(
        policy,
        names,
        weights,
        by_w,
        mask,
        keep,
        out_dir,
        run_dir,
        cache_key,
        {w: r for w, r in zip(weights, report, strict=True) if r},
    )
    result = ExtrapolationResult(
        values=values,
        weights=list(weights),
        scores=[by_w[w] for w in weights],
        on_front=[bool(m) for m in mask],
        checkpoints=checkpoints,
        report=report,
        base_scores=base,
        reference_point=list(ref),
        hypervolume=hv,
        fingerprint=cache_key,
        report_split=report_objective.split if report_objective is not None else None,
        objective=objective.settings(),
        scored=scored,
        skipped=skipped,
        seconds=seconds,
        adapters=names if names != values else None,
        intervals=intervals,
        hypervolume_ci=hv_ci,
        bootstrap=asdict(boot) if res is not None else None,
        improvement=improvement,
        behaviour=behaviour or None,
    )
    write_manifest(out_dir, result)
    if reading.num_prompts and datamodule is not None:  # what each front point says
        write = panacea.write_samples if is_panacea else write_samples
        write(policy, datamodule, values, names, front, reading, out_dir / SAMPLES)
    if len(values) >= 2:
        hv_text = f"HV={hv:.4g}" + (f" [{hv_ci[0]:.3g}, {hv_ci[1]:.3g}]" if hv_ci else "")
        pareto.plot_front(
            matrix,
            values,
            mask,
            [w_label(w)[2:].replace("_", ",") for w in weights],
            out_dir / "pareto.png",
            title=f"{type(objective).__name__} on {objective.split}: {hv_text}",
            reference=ref,
            intervals=np.array([[c[f"{v}/ci"] for v in values] for c in intervals])
            if intervals
            else None,
            base=[base[v] for v in values],
        )
    log.info(
        "extrapolation: %d candidates (%d scored, %d cached), front %d, hypervolume %.4g",
        len(weights),
        scored,
        skipped,
        result.front_size,
        hv,
    )
    return result


def _resample(by_w, rows, values, boot: Bootstrap, shared: bool):
    """(B, C, K) resampled scores of ``rows`` (row 0: the base), or None without intervals
    (no resamples, or an objective that gives no per-item scores)."""
    have = all(v in getattr(by_w[w], "per_item", {}) for w in rows for v in values)
    if boot.resamples == 0 or not have:
        return None
    items = {v: np.array([by_w[w].per_item[v] for w in rows]) for v in values}  # (C, n_v)
    counts = boot.counts({v: items[v].shape[1] for v in values}, shared)
    return bootstrap_mod.resampled_scores(items, counts, values)


def _intervals(res, values, boot: Bootstrap, by_w, rows) -> list[dict]:
    """Per row, ``{v}/ci`` and ``{v}/n`` columns."""
    ci = boot.interval(np.moveaxis(res, 0, -1))  # (C, K, 2)
    n = {v: len(by_w[rows[0]].per_item[v]) for v in values}
    return [
        {k: x for j, v in enumerate(values) for k, x in ((f"{v}/ci", ci[i][j]), (f"{v}/n", n[v]))}
        for i in range(len(rows))
    ]


def _indicator_intervals(by_w, rows, values, boot: Bootstrap) -> tuple[list[dict], dict]:
    """Intervals of every indicator (a column with per-item values that is not a value, NaN
    where an item does not count), on the same resamples of the shared items as the values.

    Returns:
        Per row, ``{name}/ci`` and ``{name}/n``; and per indicator, a record per row (row 0
        the base): ``w``, ``rate``, ``ci``, ``n`` and the paired ``difference`` from the base
        with its ``difference_ci`` and ``significant`` (the interval excludes 0).
    """
    first = by_w[rows[0]].per_item
    names = [k for k in first if k not in values and all(k in by_w[w].per_item for w in rows)]
    cols: list[dict] = [{} for _ in rows]
    table: dict[str, list[dict]] = {}
    for name in names:
        items = np.array([by_w[w].per_item[name] for w in rows])  # (C, n), NaN: not counted
        counts = boot.counts({name: items.shape[1]}, shared=True)[name]
        rates = bootstrap_mod.resampled_rates(items, counts)  # (C, B)
        ci, diff_ci = boot.interval(rates), boot.interval(rates - rates[:1])
        n = int((~np.isnan(items[0])).sum())
        table[name] = []
        for i, w in enumerate(rows):
            cols[i].update({f"{name}/ci": ci[i], f"{name}/n": n})
            rate = by_w[w][name]
            table[name].append(
                {
                    "w": list(w),
                    "rate": rate,
                    "ci": ci[i],
                    "n": n,
                    "difference": rate - by_w[rows[0]][name],
                    "difference_ci": diff_ci[i],
                    "significant": bool(diff_ci[i][0] > 0 or diff_ci[i][1] < 0),
                }
            )
    return cols, table


def _improvement(res, front, values, selection, report, boot: Bootstrap) -> dict:
    """Per value: the front point with the best selection score vs the base on the report split.

    The difference is paired (both rescored on the same resampled items); ``significant`` when
    its interval excludes 0.
    """
    out = {}
    if len(front) < 2:  # only the base: nothing to compare
        return out
    for k, v in enumerate(values):
        best = max(range(1, len(front)), key=lambda i: selection[front[i]][v])
        diff = res[:, best, k] - res[:, 0, k]  # (B,)
        ci = boot.interval(diff)
        out[v] = {
            "w": list(front[best]),
            "base": report[front[0]][v],
            "best": report[front[best]][v],
            "difference": report[front[best]][v] - report[front[0]][v],
            "ci": ci,
            "significant": bool(ci[0] > 0 or ci[1] < 0),
        }
    return out


def _score_all(
    policy, datamodule, values, objective, todo, out_dir, adapters, progress, names, shard: Shard
):
    """Scores of every w in ``todo`` (weights of the adapters ``names``), read from the cache
    or computed (and cached) now; over several processes each rank scores its share
    (:func:`shard_of`) and gets every rank's scores.

    Returns:
        ``(w -> scores, in todo order; cache key; scored; read from the cache)``, the counts
        summed over the ranks.

    Raises:
        RuntimeError: On every rank, when scoring failed on another one (which raises its own
            error): no rank is left waiting for the others.
    """
    cache_key = fingerprint(
        {
            "objective": objective.settings(),
            "data": objective.data_fingerprint(datamodule, values),
            "values": values,
            "adapters": adapters,
            # mixed-precision scores differ by rounding; fp32 runs keep their earlier keys
            **({"autocast": amp} if (amp := autocast_setting(device_type(policy))) else {}),
        }
    )
    folder = out_dir / "scores" / cache_key
    mine = shard_of(todo, shard.rank, shard.world_size)
    show = progress and shard.is_zero  # one bar, not one per process
    parts = _on_every_rank(
        shard,
        lambda: _score_part(
            policy, datamodule, values, objective, mine, folder, shard, show, names
        ),
    )
    out = merge_shards([p[0] for p in parts], todo)
    return out, cache_key, sum(p[1] for p in parts), sum(p[2] for p in parts)


def _on_every_rank(shard: Shard, compute: Callable[[], T]) -> list[T]:
    """``compute()`` here, and every rank's result in rank order (just this one's alone).

    Raises:
        Exception: ``compute``'s own error on the rank where it failed, and RuntimeError on every
            other: each rank gathers once whether it failed or not, so none waits forever.
    """
    if shard.world_size == 1:
        return [compute()]
    failure: Exception | None = None
    try:
        part: T | str = compute()
    except Exception as error:  # re-raised below, once every rank has gathered
        failure, part = error, f"{type(error).__name__}: {error}"
    parts = shard.gather(part)
    if failure is not None:
        raise failure
    failed = [f"rank {r}: {p}" for r, p in enumerate(parts) if isinstance(p, str)]
    if failed:
        raise RuntimeError(f"extrapolation stopped: another process failed ({'; '.join(failed)})")
    return parts


def _score_part(policy, datamodule, values, objective, todo, folder, shard, progress, names):
    """Scores of every w in ``todo``: read from any rank's cache under ``folder``, or computed
    and cached in this rank's (:meth:`Shard.cache`).

    Returns:
        ``(w -> scores, in todo order; scored; read from the cache)``.
    """
    from tqdm.auto import tqdm

    cache = shard.cache(folder)
    readable = [cache, *(f for f in cache_folders(folder) if f != cache)]  # own cache first
    out: dict[tuple[float, ...], Scores] = {}
    scored = skipped = 0
    desc = f"extrapolation [{objective.split}]"
    with torch.no_grad(), lora.using_weights(policy, lora.get_weights(policy)):
        pending = []
        for w in todo:
            cached = next(
                (s for f in readable if (s := read_scores(f, w, values)) is not None), None
            )
            if cached is None:
                pending.append(w)
            else:
                out[w] = cached
                skipped += 1
        if pending:
            with panacea.base_model(policy):  # Panacea's reference: its adapter off
                objective.prepare(policy, datamodule, values)
        chunk = objective.candidates_per_forward  # after prepare: "auto" sizes from its batches
        with tqdm(total=len(todo), initial=skipped, desc=desc, disable=not progress) as bar:
            for start in range(0, len(pending), chunk):  # a batch of candidates per forward
                group = pending[start : start + chunk]
                if panacea.is_panacea(policy):  # each w fed as the preference input
                    results = panacea.score_candidates(objective, policy, datamodule, values, group)
                else:
                    prefs = [lora.preference_dict(names, w) for w in group]
                    results = objective.score_many(policy, datamodule, values, prefs)
                for w, result in zip(group, results, strict=True):
                    scores = Scores(
                        {k: float(s) for k, s in result.items()}, getattr(result, "per_item", {})
                    )
                    missing = [v for v in values if v not in scores]
                    bad = [k for k, s in scores.items() if not math.isfinite(s)]
                    if missing or bad:
                        raise ValueError(
                            f"{type(objective).__name__} at w={w}: missing columns {missing}, "
                            f"non-finite {bad}"
                        )
                    write_scores(cache, w, values, scores)
                    out[w] = scores
                    scored += 1
                bar.update(len(group))
    return {w: out[w] for w in todo}, scored, skipped
