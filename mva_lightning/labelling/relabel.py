"""Scorer-labelled values: order each pair's two responses by a reward scorer.

For a value no dataset labels (humor in HH-RLHF), the pair of responses to a prompt is kept, and
the scorer decides which one is chosen: ``chosen = argmax score``, kept only where
``|score gap| > margin`` (docs/method.md §6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from mva_lightning.data.sources import DataError, PreferencePair
from mva_lightning.scorers.base import Scorer, score

log = logging.getLogger(__name__)


def relabel_pairs(
    pairs: Sequence[PreferencePair],
    scorer: Scorer,
    margin: float = 0.0,
    chunk_size: int = 256,
) -> list[PreferencePair]:
    """Re-order each pair by ``scorer`` and drop pairs it cannot tell apart.

    Per pair, ``gap = score(chosen) - score(rejected)``: ``gap > margin`` keeps the pair as it is,
    ``gap < -margin`` flips it (the old rejected becomes chosen), ``|gap| <= margin`` drops it.

    Args:
        pairs: Pairs whose original labels are ignored (only prompt and responses matter).
        scorer: Scores (prompt, response) batches, higher is better.
        margin: Smallest score gap that counts as a preference (>= 0).
        chunk_size: Pairs per scorer call (each call scores ``2 * chunk_size`` responses).

    Returns:
        The kept pairs, in input order, ``chosen`` being the higher-scored response.

    Raises:
        DataError: ``margin`` is negative, or no pair has a gap above ``margin``.
        ScorerError: The scorer returns NaN or the wrong number of scores.
    """
    if margin < 0:
        raise DataError(f"relabel_pairs: margin should be >= 0, got {margin}")
    name = getattr(scorer, "name", None) or getattr(scorer, "__name__", type(scorer).__name__)
    out: list[PreferencePair] = []
    kept = flipped = dropped = 0
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        prompts = [p.prompt for p in chunk]
        responses = [p.chosen for p in chunk] + [p.rejected for p in chunk]
        scores = score(scorer, prompts + prompts, responses)  # (2C,): chosen, then rejected
        for pair, s_c, s_r in zip(chunk, scores[: len(chunk)], scores[len(chunk) :], strict=True):
            gap = s_c - s_r
            if gap > margin:
                kept += 1
                out.append(pair)
            elif gap < -margin:
                flipped += 1
                out.append(PreferencePair(pair.prompt, chosen=pair.rejected, rejected=pair.chosen))
            else:
                dropped += 1
        log.info("relabel by %s: %d / %d pairs scored", name, start + len(chunk), len(pairs))
    log.info(
        "relabel by %s (margin %g): %d pairs kept as labelled, %d flipped, %d dropped of %d",
        name,
        margin,
        kept,
        flipped,
        dropped,
        len(pairs),
    )
    if not out:
        raise DataError(
            f"relabel by scorer {name!r}: no pair out of {len(pairs)} has a score gap above "
            f"margin={margin}; lower the margin or check the scorer"
        )
    return out


def relabelled(
    source: Callable[[], Sequence[PreferencePair]] | Sequence[PreferencePair],
    scorer: Scorer,
    margin: float = 0.0,
    chunk_size: int = 256,
) -> list[PreferencePair]:
    """A value source whose pairs are re-ordered by a scorer (see :func:`relabel_pairs`).

    Use it in a value config with the inner source as a partial::

        source:
          _target_: mva_lightning.labelling.relabel.relabelled
          source: {_target_: mva_lightning.data.sources.hh_rlhf, _partial_: true, ...}
          scorer: {_target_: mva_lightning.scorers.hf_reward.HFRewardModel, ...}
          margin: 0.1

    Args:
        source: A callable returning pairs (e.g. a ``functools.partial`` of a source), or the
            pairs themselves.
        scorer: The scorer that decides chosen vs rejected.
        margin: Smallest score gap kept.
        chunk_size: Pairs per scorer call.
    """
    pairs = source() if callable(source) else source
    return relabel_pairs(list(pairs), scorer, margin=margin, chunk_size=chunk_size)
