"""Per-value scorers: (prompt, response) batches -> one float per pair, higher is better.

=====================  =====================================================================
``HFRewardModel``      Hugging Face reward models (Ray2333 GPT-2-large, humor, beaver-7b)
``Harmlessness``       1 - profanity probability, + a bonus for refusing sensitive prompts
``Relevance``          MiniLM cosine of question and answer, - a short-answer penalty
``Sentiment``          VADER compound sentiment (tone)
``BradleyTerry``       a reward head on frozen MiniLM embeddings, trained on a value's pairs
=====================  =====================================================================

Scorer-labelled data (pairs ranked or re-ordered by a scorer) lives in
:mod:`mva_lightning.labelling`. Heavy libraries load on first use, so importing this package or
building a scorer from a config is cheap.
"""

from mva_lightning.scorers.base import (
    Scorer,
    ScorerError,
    ScorerUnavailable,
    check_inputs,
    check_scores,
    score,
)
from mva_lightning.scorers.bradley_terry import BradleyTerry
from mva_lightning.scorers.hf_reward import HFRewardModel
from mva_lightning.scorers.profanity import Harmlessness
from mva_lightning.scorers.relevance import Relevance
from mva_lightning.scorers.sentiment import Sentiment

__all__ = [
    "BradleyTerry",
    "HFRewardModel",
    "Harmlessness",
    "Relevance",
    "Scorer",
    "ScorerError",
    "ScorerUnavailable",
    "Sentiment",
    "check_inputs",
    "check_scores",
    "score",
]
