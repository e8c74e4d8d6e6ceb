"""Tone: VADER sentiment of the response (a positivity value).

VADER is a lexicon of word valences with rules for negation, intensifiers and punctuation; it
was built for social-media text. How weak it is: it reads words, not meaning, so a cheerful
"Sure! Great question!" before harmful advice scores high, and sarcasm reads as positive.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from mva_lightning.scorers.base import ScorerUnavailable, check_inputs, check_scores


@functools.cache
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ScorerUnavailable(
            f"scorer sentiment needs the PyPI package vadersentiment ({err}): "
            "pip install vadersentiment==3.3.2"
        ) from err
    return SentimentIntensityAnalyzer()


class Sentiment:
    """VADER compound score of the response, in ``[-1, 1]`` (higher = more positive).

    The prompt is ignored. Empty response: VADER's compound of "" is ``0.0`` (neutral).

    Args:
        name: Scorer name.
    """

    def __init__(self, name: str = "sentiment") -> None:
        self.name = name

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """VADER compound of each response."""
        check_inputs(prompts, responses, self.name)
        analyzer = _analyzer()
        scores = [analyzer.polarity_scores(r)["compound"] if r.strip() else 0.0 for r in responses]
        return check_scores(scores, len(responses), self.name)
