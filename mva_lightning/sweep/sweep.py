"""The extrapolation sweep (docs/method.md §5): score preference vectors, keep the Pareto set, save it.

:func:`extrapolate` scores every candidate w (and always the base, w = 0, the default
hypervolume reference) with an objective from :mod:`mva_lightning.sweep.objectives`. The adapters
stay loaded (no reload, no merge): the objective scores ``candidates_per_forward`` preference
vectors at a time in one batched forward, each row with its own weights
(:func:`lora.using_row_weights`). Each candidate's scores are written to
``<out>/scores/<fingerprint>/<w>.json`` as soon as they exist, keyed by w and a fingerprint of
the objective's settings, its data and the value vectors, so an interrupted sweep resumes where
it stopped and gives the same front. Then: Pareto mask and hypervolume (moocore, via
:mod:`mva_lightning.sweep.pareto`), one PEFT adapter folder per saved w
(``<out>/checkpoints/w_<...>/``: the exact concatenated adapter plus ``preference.json``), the
manifest ``pareto.json`` / ``pareto.csv`` and ``pareto.png``. Every write is atomic.

Standalone rerun over a finished run (same folder, scored candidates skipped)::

    python -m mva_lightning.sweep.sweep run_dir=outputs/DATE/TIME [extrapolation=wide]
        [extrapolation.save=all] [device=cuda]
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from mva_lightning.io import write_csv, write_json
from mva_lightning.model import lora
from mva_lightning.sweep import pareto
from mva_lightning.sweep.objectives import Objective, _hash

log = logging.getLogger(__name__)

CANDIDATE_KEYS = ("mode", "values", "start", "stop", "step", "vectors", "include_zero")
SAVE_MODES = ("front", "all")


def w_label(w: Sequence[float]) -> str:
    """Folder / file name of a preference vector: ``w_0.1_1.5``, ``w_-0.25_2.0``."""
    return "w_" + "_".join(repr(round(float(x), 10) + 0.0) for x in w)


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
        weights, scores, report, on_front, checkpoints = [], [], [], [], []
        for row in data["rows"]:
            weights.append(tuple(float(row[f"w/{v}"]) for v in names))
            cols = {k: x for k, x in row.items() if not k.startswith("w/")}
            on_front.append(bool(cols.pop("on_front")))
            checkpoints.append(cols.pop("checkpoint") or None)
            report.append({k: x for k, x in cols.items() if prefix and k.startswith(prefix)})
            scores.append({k: x for k, x in cols.items() if k not in report[-1]})
        summary = {k: data[k] for k in _SUMMARY}
        return cls(
            weights=weights,
            scores=scores,
            on_front=on_front,
            checkpoints=checkpoints,
            report=report,
            adapters=data.get("adapters"),
            **summary,
        )


_PER_ROW = ("weights", "scores", "on_front", "checkpoints", "report")
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


def candidate_set(candidates: Mapping | Sequence, num_values: int) -> list[tuple[float, ...]]:
    """Candidates from a config mapping (``mode``, grid/simplex settings, ``vectors``,
    ``include_zero``; see :func:`pareto.build_candidates`) or an explicit list of vectors."""
    try:
        if isinstance(candidates, Mapping):
            unknown = sorted(set(candidates) - set(CANDIDATE_KEYS))
            if unknown:
                raise ValueError(f"unknown keys {unknown}; expected some of {list(CANDIDATE_KEYS)}")
            spec = {k: v for k, v in candidates.items() if v is not None}
            mode = spec.pop("mode", "grid")
            return pareto.build_candidates(mode, num_values, **spec)
        return pareto.build_candidates("explicit", num_values, vectors=list(candidates))
    except ValueError as err:
        raise ValueError(f"extrapolation.candidates: {err}") from None


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
    trained = lora.value_names(policy)
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
) -> ExtrapolationResult:
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

    Returns:
        The :class:`ExtrapolationResult` (also in ``out_dir/pareto.json``).

    Raises:
        ValueError / KeyError: On bad input, before any work (see :func:`check`).
    """
    values = list(values)
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
    adapter_hash = _adapter_hash(policy, names)
    zero = (0.0,) * len(names)

    start = time.perf_counter()
    todo = [zero, *(w for w in weights if w != zero)]
    by_w, fingerprint, scored, skipped = _score_all(
        policy, datamodule, values, objective, todo, out_dir, adapter_hash, progress, names
    )
    seconds = time.perf_counter() - start
    matrix = np.array([[by_w[w][v] for v in values] for w in weights])  # (n, K)
    mask = pareto.pareto_mask(matrix)
    base = by_w[zero]
    ref = ref if ref is not None else [base[v] for v in values]
    hv = pareto.hypervolume(matrix[mask], ref)

    report: list[dict[str, float]] = [{} for _ in weights]
    if report_objective is not None:
        # The base (w = 0) is scored on the report split too: the honest comparison there.
        front = [zero, *(w for w, m in zip(weights, mask, strict=True) if m and w != zero)]
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
        )
        split = report_objective.split
        base = {**base, **{f"{split}/{k}": s for k, s in got[zero].items()}}
        for i, w in enumerate(weights):
            if w in got:
                report[i] = {f"{split}/{k}": s for k, s in got[w].items()}

    keep = [bool(m) for m in mask] if save == "front" else [True] * len(weights)
    checkpoints = _save_checkpoints(
        policy, names, weights, by_w, mask, keep, out_dir, run_dir, fingerprint
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
        fingerprint=fingerprint,
        report_split=report_objective.split if report_objective is not None else None,
        objective=objective.settings(),
        scored=scored,
        skipped=skipped,
        seconds=seconds,
        adapters=names if names != values else None,
    )
    write_json(out_dir / "pareto.json", result.to_json())
    write_csv(out_dir / "pareto.csv", result.rows())
    if len(values) >= 2:
        pareto.plot_front(
            matrix,
            values,
            mask,
            [w_label(w)[2:].replace("_", ",") for w in weights],
            out_dir / "pareto.png",
            title=f"{type(objective).__name__} on {objective.split}: HV={hv:.4g}",
            reference=ref,
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


def _score_all(policy, datamodule, values, objective, todo, out_dir, adapters, progress, names):
    """Scores of every w in ``todo`` (weights of the adapters ``names``), read from the cache
    or computed (and cached) now."""
    from tqdm.auto import tqdm

    fingerprint = _hash(
        {
            "objective": objective.settings(),
            "data": objective.data_fingerprint(datamodule, values),
            "values": values,
            "adapters": adapters,
        }
    )
    cache = out_dir / "scores" / fingerprint
    out: dict[tuple[float, ...], dict[str, float]] = {}
    scored = skipped = 0
    desc = f"extrapolation [{objective.split}]"
    chunk = objective.candidates_per_forward
    with torch.no_grad(), lora.using_weights(policy, lora.get_weights(policy)):
        pending = []
        for w in todo:
            cached = _read_cached(cache / f"{w_label(w)}.json", w, values)
            if cached is None:
                pending.append(w)
            else:
                out[w] = cached
                skipped += 1
        if pending:
            objective.prepare(policy, datamodule, values)
        with tqdm(total=len(todo), initial=skipped, desc=desc, disable=not progress) as bar:
            for start in range(0, len(pending), chunk):  # a batch of candidates per forward
                group = pending[start : start + chunk]
                prefs = [lora.preference_dict(names, w) for w in group]
                results = objective.score_many(policy, datamodule, values, prefs)
                for w, result in zip(group, results, strict=True):
                    scores = {k: float(s) for k, s in result.items()}
                    missing = [v for v in values if v not in scores]
                    bad = [k for k, s in scores.items() if not math.isfinite(s)]
                    if missing or bad:
                        raise ValueError(
                            f"{type(objective).__name__} at w={w}: missing columns {missing}, "
                            f"non-finite {bad}"
                        )
                    write_json(
                        cache / f"{w_label(w)}.json",
                        {"w": list(w), "values": values, "scores": scores},
                    )
                    out[w] = scores
                    scored += 1
                bar.update(len(group))
    out = {w: out[w] for w in todo}
    return out, fingerprint, scored, skipped


def _read_cached(path: Path, w, values) -> dict[str, float] | None:
    import json

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so this is foreign; score again
    if data.get("values") != values or tuple(data.get("w", ())) != tuple(w):
        return None
    return {k: float(v) for k, v in data["scores"].items()}


def _save_checkpoints(policy, values, weights, by_w, mask, keep, out_dir, run_dir, fingerprint):
    from mva_lightning.loading import write_adapter

    folder = out_dir / "checkpoints"
    paths: list[str | None] = []
    wanted = set()
    for w, on_front, k in zip(weights, mask, keep, strict=True):
        if not k:
            paths.append(None)
            continue
        target = folder / w_label(w)
        config, state = lora.concatenated_adapter(policy, lora.preference_dict(values, w))
        meta = {
            "w": list(w),
            "values": values,
            "preference": dict(zip(values, w, strict=True)),
            "scores": by_w[w],
            "on_front": bool(on_front),
            "fingerprint": fingerprint,
        }
        write_adapter(config, state, target, extra_json={"preference.json": meta})
        wanted.add(target.name)
        paths.append(os.path.relpath(target, run_dir))
    if folder.is_dir():  # a rerun may have moved the front: drop our stale folders
        for old in folder.iterdir():
            if old.name not in wanted and (old / "preference.json").is_file():
                shutil.rmtree(old, ignore_errors=True)
    return paths


def _adapter_hash(policy: nn.Module, values: Sequence[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for v in values:
        for key, t in sorted(lora.adapter_state_dict(policy, v).items()):
            digest.update(key.encode())
            digest.update(t.float().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- command line
def _conf_dir() -> Path:
    # the repository's conf/ (the package is installed editable from the repository)
    return Path(__file__).resolve().parents[1] / "conf"


def _group_config(group: str, name: str):
    # conf/<group>/<name>.yaml composed by Hydra (its defaults list applied), unresolved:
    # interpolations such as ${train.beta} then resolve against the run's saved config.
    from hydra import compose, initialize_config_dir

    path = _conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"{group}={name}: no such config; choose from {names}")
    with initialize_config_dir(config_dir=str(_conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={name}"])
    return OmegaConf.select(cfg, group.replace("/", "."))


def _apply_overrides(cfg, overrides: Sequence[str]):
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        if key in ("extrapolation", "extrapolation/objective"):  # config groups
            OmegaConf.update(cfg, key.replace("/", "."), _group_config(key, value), merge=False)
        else:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    return cfg


def main(argv: Sequence[str] | None = None) -> ExtrapolationResult:
    """``python -m mva_lightning.sweep.sweep run_dir=DIR [overrides]``: rerun the sweep.

    Loads the run's ``config.yaml`` and value vectors, applies the overrides (``key=value``
    dot-list; ``extrapolation=NAME`` and ``extrapolation/objective=NAME`` switch to the config
    group files under ``conf/``; ``device=`` picks the torch device) and writes into
    ``<run_dir>/<output_subdir>``. A run trained with ``extrapolation=none`` gets ``grid``.
    """
    from hydra.utils import instantiate

    from mva_lightning.assembly import load_value_splits
    from mva_lightning.data.datamodule import PreferenceDataModule
    from mva_lightning.loading import build_policy, run_config, run_values

    args = list(sys.argv[1:] if argv is None else argv)
    run_dirs = [a.partition("=")[2] for a in args if a.startswith("run_dir=")]
    devices = [a.partition("=")[2] for a in args if a.startswith("device=")]
    rest = [a for a in args if not a.startswith(("run_dir=", "device="))]
    if len(run_dirs) != 1 or not run_dirs[0]:
        raise SystemExit("usage: python -m mva_lightning.sweep.sweep run_dir=DIR [key=value ...]")
    run_dir = Path(run_dirs[0])
    cfg = run_config(run_dir)
    if not cfg.get("extrapolation"):
        cfg = _apply_overrides(cfg, ["extrapolation=grid"])
    cfg = _apply_overrides(cfg, rest)
    if not cfg.get("extrapolation"):
        raise SystemExit("extrapolation is disabled by the overrides: nothing to do")
    callback = instantiate(cfg.extrapolation)
    values = run_values(cfg)
    splits = load_value_splits(cfg)
    policy, backbone = build_policy(cfg, run_dir)
    policy.to(devices[0] if devices else "cpu")
    loader = OmegaConf.to_container(cfg.data.loader, resolve=True)
    datamodule = PreferenceDataModule(splits, backbone.tokenizer, **loader)
    result = callback.run(policy, datamodule, values, run_dir)
    metrics = result.metrics()
    print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print(
        f"{result.scored} scored, {result.skipped} cached; manifest in {callback.out_dir(run_dir)}"
    )
    return result


if __name__ == "__main__":
    main()
