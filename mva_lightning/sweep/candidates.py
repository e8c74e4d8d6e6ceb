"""Candidate preference vectors of the sweep (docs/method.md §5), and the rounding of a weight.

A candidate is a preference vector ``w = (w_1, ..., w_K)``; the merged model is
``theta(w) = theta_0 + sum_i w_i * delta_i``. Candidates come from the paper's grid ``S^K``
(extrapolation when ``S`` goes beyond 1 or below 0), from the probability simplex (the SOUP
baseline), or from an explicit list. Every weight passes through :func:`round_weight` once, so
that a candidate, its cache file and its checkpoint folder (:func:`manifest.w_label`) agree.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

MODES = ("grid", "simplex", "explicit")
CANDIDATE_KEYS = ("mode", "values", "start", "stop", "step", "vectors", "include_zero")
DECIMALS = 10  # rounding that removes float noise such as 0.30000000000000004


def round_weight(x: float) -> float:
    """One weight without accumulation noise: rounded to ``DECIMALS`` places, never -0.0.

    ``+ 0.0`` turns -0.0 into 0.0, so that labels and deduplication agree.
    """
    return round(float(x), DECIMALS) + 0.0


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
    s = [round_weight(v) for v in values]
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
    return [tuple(round_weight(c / n) for c in comp) for comp in _compositions(n, num_values)]


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
        w = tuple(round_weight(x) for x in vec)
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


def candidate_set(candidates: Mapping | Sequence, num_values: int) -> list[tuple[float, ...]]:
    """Candidates from a config mapping or an explicit list of vectors.

    Args:
        candidates: ``extrapolation.candidates``: a mapping of :data:`CANDIDATE_KEYS` (``mode``
            and the settings of :func:`build_candidates`; None entries take the defaults), or
            a list of preference vectors.
        num_values: K, the number of weights per vector.

    Returns:
        The candidates, see :func:`build_candidates`.

    Raises:
        ValueError: Unknown keys or bad settings, prefixed with ``extrapolation.candidates``.
    """
    try:
        if isinstance(candidates, Mapping):
            unknown = sorted(set(candidates) - set(CANDIDATE_KEYS))
            if unknown:
                raise ValueError(f"unknown keys {unknown}; expected some of {list(CANDIDATE_KEYS)}")
            spec = {k: v for k, v in candidates.items() if v is not None}
            mode = spec.pop("mode", "grid")
            return build_candidates(mode, num_values, **spec)
        return build_candidates("explicit", num_values, vectors=list(candidates))
    except ValueError as err:
        raise ValueError(f"extrapolation.candidates: {err}") from None
