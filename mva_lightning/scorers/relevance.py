"""Helpfulness as relevance: MiniLM cosine between the last human turn and the response.

``score = cos(e(last human turn), e(response)) - short_penalty * max(0, 1 - words / min_words)``

How weak it is: it rewards answers that are about the question, not answers that are right or
useful; repeating the question verbatim scores near 1, and a refusal that restates the topic
scores as well as a real answer. The length term only stops empty or one-word answers from
winning; it does not reward length beyond ``min_words``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mva_lightning.scorers.base import check_inputs, check_scores
from mva_lightning.scorers.embeddings import embed
from mva_lightning.scorers.text import last_human_turn, word_count


class Relevance:
    """Cosine similarity of MiniLM embeddings of question and answer, minus a short-answer penalty.

    Empty response (no words): the cosine is taken as 0 (nothing to relate), so it scores
    ``-short_penalty``, the floor of the length term.

    Args:
        name: Scorer name.
        min_words: Answers with fewer words are penalised linearly (0 words: the full penalty).
        short_penalty: Penalty for an answer of no words.
        batch_size: Encoder batch size.
    """

    def __init__(
        self,
        name: str = "relevance",
        min_words: int = 5,
        short_penalty: float = 1.0,
        batch_size: int = 64,
    ) -> None:
        if min_words < 1:
            raise ValueError(f"Relevance: min_words should be at least 1, got {min_words}")
        self.name = name
        self.min_words = int(min_words)
        self.short_penalty = float(short_penalty)
        self.batch_size = int(batch_size)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Relevance of each response to the last human turn of its prompt."""
        check_inputs(prompts, responses, self.name)
        words = torch.tensor([word_count(r) for r in responses], dtype=torch.float32)  # (N,)
        keep = [i for i, n in enumerate(words.tolist()) if n > 0]
        cos = torch.zeros(len(responses))  # (N,)
        if keep:
            questions = embed([last_human_turn(prompts[i]) for i in keep], self.batch_size)
            answers = embed([responses[i] for i in keep], self.batch_size)  # (M, 384) unit rows
            cos[keep] = (questions * answers).sum(-1)
        shortfall = (1 - words / self.min_words).clamp(min=0)  # (N,) in [0, 1]
        scores = cos - self.short_penalty * shortfall
        return check_scores(scores.tolist(), len(responses), self.name)
