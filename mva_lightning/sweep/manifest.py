"""What a sweep writes: the manifest, the score cache and one adapter folder per saved w.

Layout under the sweep's folder (``<run>/extrapolation`` by default), every write atomic::

    pareto.json / pareto.csv      the manifest (:class:`ExtrapolationResult`), one row per w
    scores/<fingerprint>/<w>.json one candidate's scores, written as soon as they exist
    checkpoints/<w>/              a PEFT adapter folder (the exact concatenated adapter) plus
                                  preference.json

``<w>`` is :func:`w_label`; ``<fingerprint>`` keys the objective's settings, its data and the
value vectors, so that a rerun reads back what it has already scored.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mva_lightning.io import write_csv, write_json
from mva_lightning.sweep.candidates import round_weight

if TYPE_CHECKING:
    from torch import nn

    from mva_lightning.sweep.objectives import Scores

MANIFEST = "pareto.json"


def w_label(w: Sequence[float]) -> str:
    """Folder / file name of a preference vector: ``w_0.1_1.5``, ``w_-0.25_2.0``."""
    return "w_" + "_".join(repr(round_weight(x)) for x in w)


@dataclass
class ExtrapolationResult:
    """Scores of every candidate, its Pareto front and where the front was saved.

    Attributes:
        values: Value names (objective columns ``{v}`` and weights ``w/{v}``).
        weights: Candidate preference vectors, in sweep order.
        scores: Per candidate, objective column -> score (maximised).
        on_front: Per candidate, whether it is non-dominated on the ``{v}`` columns.
        checkpoints: Per candidate, its adapter folder relative to the run dir, or None.
        report: Per candidate, ``{split}/{column}`` scores on the report split (front only).
        base_scores: The base model's (w = 0) scores.
        reference_point: Hypervolume reference, one entry per value.
        hypervolume: Hypervolume of the front w.r.t. ``reference_point``.
        fingerprint: Key of the score cache (objective settings, data, value vectors).
        report_split: The split of the ``report`` columns, or None.
        objective: The objective's settings.
        scored: Candidates scored in this call (the base included).
        skipped: Candidates whose scores were read back from disk.
        seconds: Wall time of the scoring loop (one-time preparation included).
        adapters: Adapters the weights apply to (columns ``w/{a}``); None: the values.
        intervals: Per candidate, ``{v}/ci`` = [low, high] (the bootstrap interval of its
            ``{v}`` score) and ``{v}/n`` (pairs or prompts behind it); empty without intervals.
        hypervolume_ci: Bootstrap interval of the hypervolume (None without intervals).
        bootstrap: The bootstrap's settings (resamples, level, seed), or None.
        improvement: Per value, the front point with the best selection score against the base
            on the report split: both scores, their paired difference and its interval, and
            ``significant`` (the interval excludes 0).
        behaviour: Per indicator of the objective (e.g. ``refusal``), one record per front point
            on the report split, the base first: its rate with interval and ``n``, and the paired
            difference from the base with its interval and ``significant``.
    """

    values: list[str]
    weights: list[tuple[float, ...]]
    scores: list[dict[str, float]]
    on_front: list[bool]
    checkpoints: list[str | None]
    report: list[dict[str, float]]
    base_scores: dict[str, float]
    reference_point: list[float]
    hypervolume: float
    fingerprint: str
    report_split: str | None = None
    objective: dict[str, Any] = field(default_factory=dict)
    scored: int = 0
    skipped: int = 0
    seconds: float = 0.0
    adapters: list[str] | None = None
    intervals: list[dict[str, Any]] = field(default_factory=list)
    hypervolume_ci: list[float] | None = None
    bootstrap: dict[str, Any] | None = None
    improvement: dict[str, dict[str, Any]] | None = None
    behaviour: dict[str, list[dict[str, Any]]] | None = None

    @property
    def front_size(self) -> int:
        return int(sum(self.on_front))

    @property
    def candidates_per_s(self) -> float | None:
        """Candidates scored per second in this call (None when every one was cached)."""
        return self.scored / self.seconds if self.scored and self.seconds > 0 else None

    def rows(self) -> list[dict[str, Any]]:
        """Manifest rows: ``w/{v}``, score columns, report columns, on_front, checkpoint."""
        rows = []
        for i, w in enumerate(self.weights):
            names = self.adapters or self.values
            row: dict[str, Any] = {f"w/{v}": x for v, x in zip(names, w, strict=True)}
            row.update(self.scores[i])
            if self.intervals:
                row.update(self.intervals[i])
            row.update(self.report[i])
            row["on_front"] = self.on_front[i]
            row["checkpoint"] = self.checkpoints[i] or ""
            rows.append(row)
        return rows

    def metrics(self) -> dict[str, float]:
        """``pareto/*`` metrics for loggers and ``train()``'s return value."""
        out = {
            "pareto/hypervolume": self.hypervolume,
            "pareto/front_size": float(self.front_size),
            "pareto/num_candidates": float(len(self.weights)),
        }
        if self.candidates_per_s is not None:
            out["pareto/candidates_per_s"] = self.candidates_per_s
        if self.hypervolume_ci is not None:
            out["pareto/hypervolume_low"], out["pareto/hypervolume_high"] = self.hypervolume_ci
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``pareto.json`` content: the summary and the manifest rows."""
        out = {k: v for k, v in asdict(self).items() if k not in _PER_ROW}
        out.update(front_size=self.front_size, candidates_per_s=self.candidates_per_s)
        out["rows"] = self.rows()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExtrapolationResult:
        """Rebuild a result from :meth:`to_json` output (e.g. a ``pareto.json`` read back)."""
        values, split = list(data["values"]), data.get("report_split")
        names = data.get("adapters") or values
        prefix = f"{split}/" if split else None
        weights, scores, report, on_front, checkpoints, intervals = [], [], [], [], [], []
        for row in data["rows"]:
            weights.append(tuple(float(row[f"w/{v}"]) for v in names))
            cols = {k: x for k, x in row.items() if not k.startswith("w/")}
            on_front.append(bool(cols.pop("on_front")))
            checkpoints.append(cols.pop("checkpoint") or None)
            report.append({k: x for k, x in cols.items() if prefix and k.startswith(prefix)})
            rest = {k: x for k, x in cols.items() if k not in report[-1]}
            intervals.append({k: x for k, x in rest.items() if _is_interval(k)})
            scores.append({k: x for k, x in rest.items() if not _is_interval(k)})
        summary = {k: data[k] for k in _SUMMARY}
        optional = {k: data.get(k) for k in _OPTIONAL}  # absent from manifests before intervals
        return cls(
            weights=weights,
            scores=scores,
            on_front=on_front,
            checkpoints=checkpoints,
            report=report,
            adapters=data.get("adapters"),
            intervals=intervals if any(intervals) else [],
            **summary,
            **optional,
        )


_PER_ROW = ("weights", "scores", "on_front", "checkpoints", "report", "intervals")
_OPTIONAL = ("hypervolume_ci", "bootstrap", "improvement", "behaviour")


def _is_interval(column: str) -> bool:
    return column.endswith(("/ci", "/n"))


_SUMMARY = (
    "values",
    "base_scores",
    "reference_point",
    "hypervolume",
    "fingerprint",
    "report_split",
    "objective",
    "scored",
    "skipped",
    "seconds",
)


def write_manifest(out_dir: str | os.PathLike, result: ExtrapolationResult) -> None:
    """``pareto.json`` (:meth:`ExtrapolationResult.to_json`) and ``pareto.csv`` (the rows)."""
    write_json(Path(out_dir) / MANIFEST, result.to_json())
    write_csv(Path(out_dir) / "pareto.csv", result.rows())


def read_manifest(path: str | os.PathLike) -> ExtrapolationResult:
    """The result a sweep saved: ``path`` is its ``pareto.json`` or the folder holding it.

    Raises:
        FileNotFoundError: No manifest there.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep manifest ({MANIFEST}) here")
    return ExtrapolationResult.from_json(json.loads(path.read_text()))


def read_scores(cache: Path, w: Sequence[float], values: Sequence[str]) -> Scores | None:
    """The cached scores of ``w`` in the cache folder ``cache``, or None to score it.

    An entry without per-item scores (written before the sweep had intervals) is scored again.
    """
    from mva_lightning.sweep.objectives import Scores

    path = cache / f"{w_label(w)}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so this is foreign; score again
    if data.get("values") != list(values) or tuple(data.get("w", ())) != tuple(w):
        return None
    if "per_item" not in data:
        return None
    return Scores({k: float(v) for k, v in data["scores"].items()}, data["per_item"])


def write_scores(
    cache: Path, w: Sequence[float], values: Sequence[str], scores: Mapping[str, float]
) -> None:
    """Cache the scores of ``w`` and their per-item scores (read back by :func:`read_scores`)."""
    per_item = getattr(scores, "per_item", {})
    write_json(
        cache / f"{w_label(w)}.json",
        {"w": list(w), "values": values, "scores": dict(scores), "per_item": per_item},
    )


def save_checkpoints(
    policy: nn.Module,
    names: Sequence[str],
    weights: Sequence[tuple[float, ...]],
    by_w: Mapping[tuple[float, ...], dict[str, float]],
    mask: Sequence[bool],
    keep: Sequence[bool],
    out_dir: Path,
    run_dir: Path,
    fingerprint: str,
    report: Mapping[tuple[float, ...], Mapping[str, Any]] | None = None,
    adapter_at: Callable[[tuple[float, ...]], tuple[Any, Mapping]] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> list[str | None]:
    """One adapter folder per kept w (``out_dir/checkpoints/<w>/``), stale folders removed.

    Each folder is a PEFT adapter with ``preference.json`` (w and scores) and a model card
    (``README.md``: base model, values, w, scores, how to load it with plain PEFT).

    Args:
        policy: The PEFT model holding the adapters ``names``.
        names: The adapters w weights, in order.
        weights: Every candidate.
        by_w: Each candidate's scores.
        mask: Per candidate, on the front.
        keep: Per candidate, write its folder.
        out_dir: The sweep's folder.
        run_dir: The returned paths are relative to it.
        fingerprint: The score cache's key, recorded in ``preference.json``.
        report: Per w, its columns on the report split (``test/...``), for the model card.
        adapter_at: w -> (LoRA config, tensors) of the model at w; None: the value vectors
            scaled by w and concatenated (:func:`lora.concatenated_adapter`).
        extra_meta: More entries for ``preference.json`` (e.g. the method).
        extra_files: Writes more files into each folder (called with it, before it appears).

    Returns:
        Per candidate, its folder relative to ``run_dir``, or None when not kept.
    """
    from mva_lightning.loading import write_adapter
    from mva_lightning.model import lora

    folder = out_dir / "checkpoints"
    paths: list[str | None] = []
    wanted = set()
    for w, on_front, k in zip(weights, mask, keep, strict=True):
        if not k:
            paths.append(None)
            continue
        target = folder / w_label(w)
        if adapter_at is None:
            config, state = lora.concatenated_adapter(policy, lora.preference_dict(names, w))
        else:
            config, state = adapter_at(w)
        meta = {
            "w": list(w),
            "values": list(names),
            "preference": dict(zip(names, w, strict=True)),
            "scores": by_w[w],
            "on_front": bool(on_front),
            "fingerprint": fingerprint,
            **(extra_meta or {}),
        }
        card = model_card(config, meta, (report or {}).get(w, {}))
        write_adapter(
            config,
            state,
            target,
            extra_json={"preference.json": meta},
            extra_text={"README.md": card},
            extra_files=extra_files,
        )
        wanted.add(target.name)
        paths.append(os.path.relpath(target, run_dir))
    if folder.is_dir():  # a rerun may have moved the front: drop our stale folders
        for old in folder.iterdir():
            if old.name not in wanted and (old / "preference.json").is_file():
                shutil.rmtree(old, ignore_errors=True)
    return paths


def model_card(config, meta: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """A Hugging Face model card for one front checkpoint (its ``README.md``)."""
    base = getattr(config, "base_model_name_or_path", None) or "the run's base model"
    w = ", ".join(f"{v} = {x:g}" for v, x in meta["preference"].items())
    rows = []
    columns = {**meta["scores"], **report}
    for column, score in columns.items():
        if isinstance(score, float) and not column.endswith("/std"):
            ci = columns.get(f"{column}/ci")
            rows.append(
                f"| {column} | {score:.4g} |" + (f" [{ci[0]:.4g}, {ci[1]:.4g}] |" if ci else " - |")
            )
    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {base}",
            "tags: [mva_lightning, lora, multi-value-alignment, dpo]",
            "---",
            "",
            f"# {w_label(meta['w'])}: one point of a multi-value Pareto set",
            "",
            f"A LoRA adapter made by mva_lightning: the base model plus the weighted sum of the "
            f"value vectors ({w}), merged into one adapter of rank r x {len(meta['values'])}. "
            f"{'On' if meta['on_front'] else 'Not on'} the Pareto front of its sweep.",
            "",
            "| score | value | 95% CI |",
            "|---|---|---|",
            *rows,
            "",
            "Scores are means over held-out prompts or pairs (selection split unprefixed, report "
            "split prefixed); higher is better.",
            "",
            "## Load it",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            "```",
            "",
        ]
    )


def read_per_item(path: str | os.PathLike) -> tuple[list[Scores | None], Scores | None]:
    """The cached per-item scores behind a saved sweep: per manifest row, and the base's.

    Args:
        path: The sweep's folder (or its ``pareto.json``).

    Returns:
        ``(rows, base)``; an entry is None where the cache holds no per-item scores (a sweep
        from before intervals, or a deleted cache).
    """
    result = read_manifest(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    cache = folder / "scores" / result.fingerprint
    names = result.adapters or result.values
    rows = [read_scores(cache, w, result.values) for w in result.weights]
    return rows, read_scores(cache, (0.0,) * len(names), result.values)
