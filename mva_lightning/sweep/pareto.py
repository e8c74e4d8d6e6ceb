"""Candidate preference vectors, Pareto selection, hypervolume and the Pareto plot (docs/method.md §5).

A candidate is a preference vector ``w = (w_1, ..., w_K)``; the merged model is
``theta(w) = theta_0 + sum_i w_i * delta_i``. Candidates come from the paper's grid ``S^K``
(extrapolation when ``S`` goes beyond 1 or below 0), from the probability simplex (the SOUP
baseline), or from an explicit list. Every objective here is MAXIMISED.
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

MODES = ("grid", "simplex", "explicit")
_DECIMALS = 10  # rounding that removes float noise such as 0.30000000000000004


def _clean(x: float) -> float:
    # round away accumulation noise; "+ 0.0" turns -0.0 into 0.0 so labels and dedupe agree
    return round(float(x), _DECIMALS) + 0.0


def _check_num_values(num_values: int) -> None:
    if num_values < 1:
        raise ValueError(f"num_values must be >= 1, got {num_values}")


def grid_candidates(
    num_values: int,
    values: Sequence[float] | None = None,
    start: float = 0.1,
    stop: float = 1.0,
    step: float = 0.1,
) -> list[tuple[float, ...]]:
    """The paper's grid ``S^K`` of preference vectors.

    Args:
        num_values: K, the number of value vectors.
        values: The set S itself; overrides ``start``/``stop``/``step``. May hold negative
            entries or entries above 1 (extrapolation).
        start: First element of S when ``values`` is None.
        stop: Last element of S (inclusive) when ``values`` is None.
        step: Spacing of S when ``values`` is None; must be positive.

    Returns:
        ``len(S) ** K`` tuples in ``itertools.product`` order, e.g. for K = 2 and the default S
        ``(0.1, 0.1), (0.1, 0.2), ..., (1.0, 1.0)``. Empty when S is empty (stop < start).

    Raises:
        ValueError: If ``num_values < 1``, ``step <= 0`` or a value is not finite.
    """
    _check_num_values(num_values)
    if values is None:
        if not step > 0:
            raise ValueError(f"step must be positive, got {step}")
        # inclusive count, tolerant of float error: (1.0 - 0.1) / 0.1 = 8.999999999999998
        n = math.floor((stop - start) / step + 1e-9) + 1
        values = [start + i * step for i in range(max(n, 0))]
    s = [_clean(v) for v in values]
    if not all(math.isfinite(v) for v in s):
        raise ValueError(f"grid values must be finite, got {list(values)}")
    return list(itertools.product(s, repeat=num_values))


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    # all non-negative integer tuples of length `parts` summing to `total`, lexicographic order
    if parts == 1:
        return [(total,)]
    return [(i, *rest) for i in range(total + 1) for rest in _compositions(total - i, parts - 1)]


def simplex_candidates(num_values: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """All convex weights on the ``step`` lattice: ``w_i >= 0``, ``sum_i w_i = 1`` (SOUP).

    Args:
        num_values: K, the number of value vectors.
        step: Lattice spacing; ``1 / step`` must be a whole number.

    Returns:
        ``C(1/step + K - 1, K - 1)`` tuples in lexicographic order, starting with
        ``(0, ..., 0, 1)`` and ending with ``(1, 0, ..., 0)``; 11 for K = 2 and 66 for K = 3 at
        step 0.1.

    Raises:
        ValueError: If ``num_values < 1`` or ``1 / step`` is not a positive whole number.
    """
    _check_num_values(num_values)
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    n = round(1.0 / step)
    if n < 1 or abs(n * step - 1.0) > 1e-9:
        raise ValueError(f"simplex step must divide 1 into whole parts, got {step}")
    return [tuple(_clean(c / n) for c in comp) for comp in _compositions(n, num_values)]


def explicit_candidates(
    vectors: Sequence[Sequence[float]], num_values: int
) -> list[tuple[float, ...]]:
    """Validate an explicit list of preference vectors.

    Args:
        vectors: Preference vectors, each of length ``num_values``.
        num_values: K, the number of value vectors.

    Returns:
        The vectors as tuples of floats, in the given order.

    Raises:
        ValueError: If a vector has the wrong length or a non-finite entry.
    """
    _check_num_values(num_values)
    out = []
    for i, vec in enumerate(vectors):
        w = tuple(_clean(x) for x in vec)
        if len(w) != num_values:
            raise ValueError(
                f"preference vector {i} {tuple(vec)} has length {len(w)}, "
                f"expected {num_values} (one weight per value)"
            )
        if not all(math.isfinite(x) for x in w):
            raise ValueError(f"preference vector {i} {tuple(vec)} has a non-finite entry")
        out.append(w)
    return out


def build_candidates(
    mode: str,
    num_values: int,
    *,
    values: Sequence[float] | None = None,
    start: float = 0.1,
    stop: float = 1.0,
    step: float = 0.1,
    vectors: Sequence[Sequence[float]] | None = None,
    include_zero: bool = False,
) -> list[tuple[float, ...]]:
    """The candidate set for one run, as configured.

    Args:
        mode: ``"grid"`` (``values`` or ``start``/``stop``/``step``), ``"simplex"`` (``step``)
            or ``"explicit"`` (``vectors``).
        num_values: K, the number of value vectors.
        values: Grid set S, see :func:`grid_candidates`.
        start: Grid start, see :func:`grid_candidates`.
        stop: Grid stop (inclusive), see :func:`grid_candidates`.
        step: Grid or simplex spacing.
        vectors: Explicit vectors, required for ``mode="explicit"``.
        include_zero: Put the all-zero vector (the base model, the hypervolume reference) first.

    Returns:
        Unique candidates in first-seen order; with ``include_zero`` the zero vector comes first
        and a zero already in the set is not repeated.

    Raises:
        ValueError: On an unknown mode, a wrong-length vector, or when the mode yields no
            candidate (checked before the zero vector is added: the base alone is no search).
    """
    if mode == "grid":
        cands = grid_candidates(num_values, values, start=start, stop=stop, step=step)
        detail = f"values={values!r}, start={start}, stop={stop}, step={step}"
    elif mode == "simplex":
        cands = simplex_candidates(num_values, step=step)
        detail = f"step={step}"
    elif mode == "explicit":
        if vectors is None:
            raise ValueError("mode 'explicit' needs `vectors`, got None")
        cands = explicit_candidates(vectors, num_values)
        detail = f"vectors={vectors!r}"
    else:
        raise ValueError(f"unknown candidate mode {mode!r}; expected one of {', '.join(MODES)}")
    if not cands:
        raise ValueError(
            f"candidate set is empty: mode={mode!r}, num_values={num_values}, {detail}"
        )
    if include_zero:
        cands = [(0.0,) * num_values, *cands]
    return list(dict.fromkeys(cands))  # dedupe, order kept


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


def plot_front(
    scores: np.ndarray,
    names: Sequence[str],
    on_front: np.ndarray,
    labels: Sequence[str] | None,
    path: str | os.PathLike,
    title: str | None = None,
    reference: Sequence[float] | None = None,
    extra_fronts: dict[str, np.ndarray] | None = None,
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

    Returns:
        The written path.

    Raises:
        ValueError: If shapes disagree.
    """
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

    pairs = list(itertools.combinations(range(k), 2))
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 4.5 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = [f"C{i}" for i in range(1, 10)]
    for ax, (i, j) in zip(axes, pairs, strict=False):
        ax.scatter(arr[~mask, i], arr[~mask, j], s=14, c="0.7", label="candidates")
        ax.scatter(arr[mask, i], arr[mask, j], s=30, c="C0", zorder=3, label="Pareto front")
        if k == 2:
            _step_line(ax, arr[mask], "C0")
        if labels is not None:
            for r in np.flatnonzero(mask):
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
        if ref is not None:
            ax.scatter([ref[i]], [ref[j]], s=60, c="k", marker="x", zorder=4, label="reference")
        ax.set_xlabel(f"{names[i]} (higher is better)")
        ax.set_ylabel(f"{names[j]} (higher is better)")
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _step_line(ax, front: np.ndarray, colour: str) -> None:
    # Attainment boundary of a maximised 2-D front: sorted by x ascending (so y descending), the
    # best y reachable for x in (x_{i-1}, x_i] is y_i -> a "steps-pre" line.
    order = np.argsort(front[:, 0], kind="stable")
    ax.plot(front[order, 0], front[order, 1], drawstyle="steps-pre", c=colour, lw=1.2)
