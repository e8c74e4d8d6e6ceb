"""Bootstrap intervals over the prompts or pairs behind every score (docs/method.md §5).

A candidate's score for value v is a mean over items: held-out pairs (implicit reward) or
prompts (generation). One resample draws n_v items with replacement; every candidate and the
base are rescored on the same draw, so intervals of differences are paired. Where the values
share their items (one prompt set scored by every value's scorer), one draw serves them all.

Everything is seeded (:class:`Bootstrap`): the same scores give the same intervals.

Shapes: C candidates (row 0 the base, w = 0), K values, B resamples, n_v items of value v.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mva_lightning.sweep import pareto


@dataclass(frozen=True)
class Bootstrap:
    """Settings of the percentile bootstrap.

    Attributes:
        resamples: Number of resamples B (0: no intervals).
        level: Coverage of the intervals (0.95: the 2.5 % and 97.5 % quantiles).
        seed: Seeds the draws.
    """

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.resamples, int) and self.resamples >= 0):
            raise ValueError(
                f"extrapolation.bootstrap.resamples: expected an integer >= 0, got "
                f"{self.resamples!r}"
            )
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"extrapolation.bootstrap.level must be in (0, 1), got {self.level}")

    def counts(self, sizes: Mapping[str, int], shared: bool) -> dict[str, np.ndarray]:
        """Per value, how often each item is drawn in each resample: (B, n_v) integers.

        Args:
            sizes: Value -> n_v.
            shared: The values score the same items (one draw for all of them).
        """
        rng = np.random.default_rng(self.seed)
        if shared:
            ns = set(sizes.values())
            if len(ns) != 1:
                raise ValueError(f"shared items need one count for every value, got {sizes}")
            draw = _multiplicities(rng, ns.pop(), self.resamples)
            return dict.fromkeys(sizes, draw)
        return {v: _multiplicities(rng, n, self.resamples) for v, n in sizes.items()}

    def interval(self, samples: np.ndarray) -> list[float]:
        """[low, high]: the percentile interval of resampled statistics, (B,) or (..., B).

        NaN resamples (a rate whose resample drew no item that counts) are left out.
        """
        tail = (1.0 - self.level) / 2.0
        lo, hi = np.nanquantile(np.asarray(samples, dtype=float), [tail, 1.0 - tail], axis=-1)
        return [float(lo), float(hi)] if np.ndim(lo) == 0 else np.stack([lo, hi], -1).tolist()


def _multiplicities(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    # n draws with replacement from n items = a multinomial count per item: (B, n)
    if n < 1:
        raise ValueError("a bootstrap needs at least one item")
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def resampled_means(items: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(C, n) per-item scores, (B, n) counts -> (C, B) means of each resample."""
    items = np.asarray(items, dtype=float)
    return items @ counts.T / items.shape[1]


def resampled_rates(items: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(C, n) per-item values with NaN where an item does not count, (B, n) counts -> (C, B)
    means over the counted items of each resample (NaN when a resample draws none)."""
    items = np.asarray(items, dtype=float)
    counted = ~np.isnan(items)
    total = np.where(counted, items, 0.0) @ counts.T
    drawn = counted.astype(float) @ counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(drawn > 0, total / np.maximum(drawn, 1), np.nan)


def resampled_scores(
    items: Mapping[str, np.ndarray], counts: Mapping[str, np.ndarray], values: Sequence[str]
) -> np.ndarray:
    """(B, C, K) scores of every candidate in every resample (value order ``values``)."""
    return np.stack([resampled_means(items[v], counts[v]).T for v in values], axis=-1)


def hypervolumes(
    scores: np.ndarray, candidates: Sequence[int], reference: Sequence[float] | None = None
) -> np.ndarray:
    """(B,) hypervolume of the front of ``candidates`` in each resample.

    Args:
        scores: (B, C, K) from :func:`resampled_scores`.
        candidates: Rows of the candidates whose front counts.
        reference: A fixed reference point; None: the base (row 0) of the same resample.
    """
    rows = list(candidates)
    out = np.empty(scores.shape[0])
    for b, table in enumerate(scores):
        points = table[rows]
        ref = table[0] if reference is None else np.asarray(reference, dtype=float)
        out[b] = pareto.hypervolume(points[pareto.pareto_mask(points)], ref)
    return out
