"""Pareto selection, hypervolume and the Pareto plot of scored candidates (docs/method.md §5).

Every objective here is MAXIMISED: a row of ``scores`` is one candidate preference vector (built
by :mod:`mva_lightning.sweep.candidates`), a column one value's score.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import moocore
import numpy as np

from mva_lightning.io import atomic_path


def _as_scores(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (candidates, objectives), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} must be finite; rows with NaN/inf: {_bad_rows(arr)}")
    return arr


def _bad_rows(arr: np.ndarray) -> list[int]:
    return np.flatnonzero(~np.isfinite(arr).all(axis=1)).tolist()


def pareto_mask(scores: np.ndarray) -> np.ndarray:
    """Non-dominated rows of ``scores``, every column maximised.

    Row a dominates row b when a >= b everywhere and a > b somewhere. Exact duplicates of a
    non-dominated point do not dominate each other, so every copy is kept
    (``moocore.is_nondominated(..., keep_weakly=True)``).

    Args:
        scores: ``(n, k)`` objective values, higher is better.

    Returns:
        ``(n,)`` boolean mask, True for rows on the Pareto front.

    Raises:
        ValueError: If ``scores`` is not 2-D or holds NaN/inf.
    """
    arr = _as_scores(scores)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(arr, maximise=True, keep_weakly=True), dtype=bool)


def hypervolume(scores: np.ndarray, reference: Sequence[float]) -> float:
    """Hypervolume dominated by ``scores`` and bounded below by ``reference`` (maximised).

    The volume of the union of boxes ``[reference, p]``; a point that is not strictly better
    than the reference in every objective adds nothing.

    Args:
        scores: ``(n, k)`` objective values, higher is better; ``n`` may be 0.
        reference: ``(k,)`` reference point, e.g. the base model's scores (w = 0).

    Returns:
        The hypervolume, 0.0 for an empty set.

    Raises:
        ValueError: If shapes disagree or any value is not finite.
    """
    arr = _as_scores(scores)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape[0] != arr.shape[1]:
        raise ValueError(
            f"reference has {ref.shape[0]} dimensions but scores have {arr.shape[1]} objectives"
        )
    if not np.isfinite(ref).all():
        raise ValueError(f"reference must be finite, got {ref.tolist()}")
    if arr.shape[0] == 0:
        return 0.0
    return float(moocore.hypervolume(arr, ref=ref, maximise=True))


# Front points labelled with their w at most: the rest stay unlabelled dots on the front.
MAX_LABELS = 12
# Other methods' fronts: tab20 without the blues (this run's front), the dark red (the base's
# square) and the greys (candidates): 15 distinct colours, so a comparison of every method
# never repeats one.
EXTRA_COLOURS = (2, 4, 8, 10, 12, 16, 18, 3, 5, 9, 11, 13, 17, 19, 7)  # tab20 indices


def plot_front(
    scores: np.ndarray,
    names: Sequence[str],
    on_front: np.ndarray,
    labels: Sequence[str] | None,
    path: str | os.PathLike,
    title: str | None = None,
    reference: Sequence[float] | None = None,
    extra_fronts: dict[str, np.ndarray] | None = None,
    intervals: np.ndarray | None = None,
    base: Sequence[float] | None = None,
    max_labels: int = MAX_LABELS,
) -> Path:
    """Draw candidates and their Pareto front to a PNG, written atomically.

    Two objectives: one scatter, all candidates grey, the front highlighted and joined by its
    attainment step line, front points annotated with ``labels``. Three or more: one panel per
    pair of objectives (K choose 2 panels; a K-D front need not look like a front in 2-D).

    Args:
        scores: ``(n, k)`` objective values, higher is better, ``k >= 2``.
        names: ``k`` objective names for the axes.
        on_front: ``(n,)`` boolean mask, usually :func:`pareto_mask` of ``scores``.
        labels: ``n`` point labels such as ``"w=(0.3,1.2)"``, drawn on front points; or None.
        path: Target ``.png`` file; parent folders are created.
        title: Figure title.
        reference: ``(k,)`` hypervolume reference point to mark.
        extra_fronts: Other methods' ``(m, k)`` scores by method name, drawn in other colours
            with a legend (baseline comparison).
        intervals: ``(n, k, 2)`` [low, high] per candidate and objective, drawn as error bars
            on the front points.
        base: ``(k,)`` scores of the base model (w = 0), drawn as its own point.
        max_labels: Label at most this many front points (:func:`labelled_points`); dozens of
            overlapping labels are unreadable, and each costs drawing time.

    Returns:
        The written path.

    Raises:
        ValueError: If shapes disagree.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = _as_scores(scores)
    n, k = arr.shape
    mask = np.asarray(on_front, dtype=bool).reshape(-1)
    if k < 2:
        raise ValueError(f"plot_front needs at least 2 objectives, got {k}")
    if len(names) != k:
        raise ValueError(f"got {len(names)} names for {k} objectives")
    if mask.shape[0] != n:
        raise ValueError(f"on_front has {mask.shape[0]} entries for {n} candidates")
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} candidates")
    ref = None if reference is None else np.asarray(reference, dtype=float).reshape(-1)
    if ref is not None and ref.shape[0] != k:
        raise ValueError(f"reference has {ref.shape[0]} dimensions but scores have {k} objectives")
    extras = {
        name: _as_scores(pts, f"extra_fronts[{name!r}]")
        for name, pts in (extra_fronts or {}).items()
    }
    for name, pts in extras.items():
        if pts.shape[1] != k:
            raise ValueError(f"extra_fronts[{name!r}] has {pts.shape[1]} objectives, expected {k}")

    ci = None if intervals is None else np.asarray(intervals, dtype=float)
    if ci is not None and ci.shape != (n, k, 2):
        raise ValueError(f"intervals must have shape ({n}, {k}, 2), got {ci.shape}")
    base_pt = None if base is None else np.asarray(base, dtype=float).reshape(-1)

    pairs = list(itertools.combinations(range(k), 2))
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    legend_out = len(extras) > 3  # many methods: the legend beside the axes, not over them
    fig = Figure(figsize=(5.5 * ncols + 2.5 * legend_out, 4.5 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    tab20 = matplotlib.colormaps["tab20"]
    colours = [matplotlib.colors.to_hex(tab20(i)) for i in EXTRA_COLOURS]
    for ax, (i, j) in zip(axes, pairs, strict=False):
        ax.scatter(arr[~mask, i], arr[~mask, j], s=14, c="0.7", label="candidates")
        ax.scatter(arr[mask, i], arr[mask, j], s=30, c="C0", zorder=3, label="Pareto front")
        if k == 2:
            _step_line(ax, arr[mask], "C0")
        if labels is not None:
            for r in labelled_points(arr, mask, max_labels):
                ax.annotate(
                    labels[r],
                    (arr[r, i], arr[r, j]),
                    xytext=(3, 3),
                    textcoords="offset points",
                    fontsize=7,
                )
        for c, (name, pts) in enumerate(extras.items()):
            colour = colours[c % len(colours)]
            ax.scatter(pts[:, i], pts[:, j], s=24, c=colour, marker="^", zorder=3, label=name)
            if k == 2 and len(pts):
                _step_line(ax, pts[pareto_mask(pts)], colour)
        if ci is not None and mask.any():
            front, lo, hi = arr[mask], ci[mask, :, 0], ci[mask, :, 1]
            ax.errorbar(
                front[:, i],
                front[:, j],
                # clipped: a constant score's interval is itself up to float rounding
                xerr=np.clip([front[:, i] - lo[:, i], hi[:, i] - front[:, i]], 0, None),
                yerr=np.clip([front[:, j] - lo[:, j], hi[:, j] - front[:, j]], 0, None),
                fmt="none",
                ecolor="C0",
                alpha=0.45,
                lw=0.9,
                zorder=2,
                label="95 % interval",
            )
        if base_pt is not None:
            ax.scatter(
                [base_pt[i]], [base_pt[j]], s=50, c="C3", marker="s", zorder=4, label="base (w = 0)"
            )
        if ref is not None:
            ax.scatter([ref[i]], [ref[j]], s=60, c="k", marker="x", zorder=4, label="reference")
        ax.set_xlabel(f"{names[i]} (higher is better)")
        ax.set_ylabel(f"{names[j]} (higher is better)")
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    if legend_out:
        axes[ncols - 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    else:
        axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def labelled_points(scores: np.ndarray, on_front: np.ndarray, max_labels: int) -> list[int]:
    """Rows of the front points to label: all of them, or ``max_labels`` spread along the front.

    The front is ordered by its first objective; the kept points are evenly spaced in that
    order and always include both ends (the best point of each extreme).

    Args:
        scores: ``(n, k)`` objective values.
        on_front: ``(n,)`` boolean mask of the front.
        max_labels: How many labels at most (``>= 0``).
    """
    rows = np.flatnonzero(np.asarray(on_front, dtype=bool))
    if len(rows) <= max_labels:
        return rows.tolist()
    if max_labels < 2:
        return rows[:max_labels].tolist()
    ordered = rows[np.argsort(np.asarray(scores)[rows, 0], kind="stable")]
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, max_labels)).astype(int))
    return ordered[picks].tolist()


def _step_line(ax, front: np.ndarray, colour: str) -> None:
    # Attainment boundary of a maximised 2-D front: sorted by x ascending (so y descending), the
    # best y reachable for x in (x_{i-1}, x_i] is y_i -> a "steps-pre" line.
    order = np.argsort(front[:, 0], kind="stable")
    ax.plot(front[order, 0], front[order, 1], drawstyle="steps-pre", c=colour, lw=1.2)
