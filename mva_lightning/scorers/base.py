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


class ScorerUnavailable(RuntimeError):
    """A scorer cannot be loaded (no hub access, a missing package); the message says what to do."""


def check_inputs(prompts: Sequence[str], responses: Sequence[str], name: str) -> None:
    """Validate a scorer's input: as many prompts as responses, all strings."""
    if len(prompts) != len(responses):
        raise ScorerError(
            f"scorer {name!r} got {len(prompts)} prompts and {len(responses)} responses; "
            "expected one prompt per response"
        )
    for what, texts in (("prompt", prompts), ("response", responses)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ScorerError(
                    f"scorer {name!r}: {what} {i} is a {type(text).__name__}, expected a string"
                )


def score(scorer: Scorer, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Call any scorer and validate both sides of the contract (use it on third-party scorers).

    Raises:
        ScorerError: Mismatched inputs, or a wrong count / non-finite value in the output; the
            message names the scorer.
    """
    name = getattr(scorer, "name", None) or getattr(scorer, "__name__", type(scorer).__name__)
    check_inputs(prompts, responses, name)
    return check_scores(scorer(prompts, responses), len(responses), name)
