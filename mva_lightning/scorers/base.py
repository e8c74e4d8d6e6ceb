"""The scorer interface: (prompt, response) batches -> one float per pair, higher is better."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Scorer(Protocol):
    """Scores responses for one value. Higher is better (costs are negated by the scorer).

    Prompts are the raw transcripts ("\\n\\nHuman: ...\\n\\nAssistant:"); responses are the
    generated continuations only. A scorer sees each prompt once.
    """

    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class ScorerError(ValueError):
    """A scorer broke its contract (wrong count, NaN); the message names the scorer."""


def check_scores(scores: Sequence[float], expected: int, name: str) -> list[float]:
    """Validate a scorer's output: one finite float per pair, else a clear error."""
    scores = [float(s) for s in scores]
    if len(scores) != expected:
        raise ScorerError(f"scorer {name!r} returned {len(scores)} scores for {expected} responses")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ScorerError(f"scorer {name!r} returned non-finite scores at rows {bad[:5]}")
    return scores
