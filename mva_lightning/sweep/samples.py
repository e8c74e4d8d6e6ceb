"""What each front point says: greedy answers to a few held-out prompts, for a person to read.

After the front is known, the base (w = 0) and every front point answer the first
``num_prompts`` held-out prompts (deduplicated across values; or, from a prompt file, its rows of
the split, taking each category in turn) in one batched ``generate`` (each
prompt block with its own preference vector); the answers go to ``<sweep>/samples.jsonl``, one
record per (w, prompt), written atomically, and to a W&B table by the callback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mva_lightning.io import write_text

SAMPLES = "samples.jsonl"


@dataclass(frozen=True)
class SampleSettings:
    """How many held-out prompts each front point answers, and how long.

    Attributes:
        num_prompts: Prompts per point (0: write no samples).
        max_new_tokens: Answer length, in tokens (greedy decoding).
        split: The held-out split the prompts come from.
        prompts_file: A prompt file (:mod:`mva_lightning.data.prompts`) to take them from; None:
            the data module's held-out pairs.
    """

    num_prompts: int = 4
    max_new_tokens: int = 48
    split: str = "test"
    prompts_file: str | None = None

    def __post_init__(self) -> None:
        if self.num_prompts < 0 or self.max_new_tokens < 1:
            raise ValueError(
                "extrapolation.samples: num_prompts must be >= 0 and max_new_tokens >= 1, got "
                f"{self.num_prompts}, {self.max_new_tokens}"
            )
        if self.split not in ("train", "val", "test"):
            raise ValueError(
                f"extrapolation.samples.split: expected train, val or test, got {self.split!r}"
            )


def held_out_prompts(
    datamodule, values: Sequence[str], split: str, n: int, prompts_file: str | None = None
) -> list[str]:
    """The first ``n`` distinct prompts of ``split``: in value order from the data module, or
    from ``prompts_file`` one category at a time (benign, sensitive, benign, ...)."""
    if prompts_file is None:
        seen = dict.fromkeys(p.prompt for v in values for p in getattr(datamodule.splits[v], split))
        return list(seen)[:n]
    from itertools import chain, zip_longest

    from mva_lightning.data.prompts import read_prompts

    by_category: dict[str | None, list[str]] = {}
    for row in read_prompts(prompts_file, split=split):
        by_category.setdefault(row.category, []).append(row.prompt)
    turns = chain.from_iterable(zip_longest(*by_category.values()))
    return list(dict.fromkeys(p for p in turns if p is not None))[:n]


def write_samples(
    policy: nn.Module,
    datamodule,
    values: Sequence[str],
    names: Sequence[str],
    points: Sequence[tuple[float, ...]],
    settings: SampleSettings,
    path: str | os.PathLike,
    respond: Callable[[list[str], Sequence[tuple[float, ...]]], list[str]] | None = None,
) -> list[dict]:
    """Greedy answers of every point to the held-out prompts, written to ``path`` (JSONL).

    Args:
        policy: The PEFT model holding the adapters ``names``.
        datamodule: The data module (held-out prompts, tokenizer, chat template).
        values: Value names (whose splits give the prompts).
        names: The adapters each w weights, in order.
        points: The preference vectors to sample, the base (all zeros) first.
        settings: Prompts and length.
        path: The JSONL file.
        respond: ``(prompts, points) -> responses``, block k the answers at ``points[k]``;
            None: generate with the adapters ``names`` weighted by each point, in one batch.

    Returns:
        The records: ``w``, ``prompt``, ``response`` (and ``base``: whether w = 0).
    """
    from mva_lightning.model import lora
    from mva_lightning.model.generation import generate

    prompts = held_out_prompts(
        datamodule, values, settings.split, settings.num_prompts, settings.prompts_file
    )
    if not prompts or not points:
        return []
    if respond is not None:
        responses = respond(prompts, points)
    else:
        weights = [lora.preference_dict(names, w) for w in points]
        responses = generate(
            policy,
            datamodule.tokenizer,
            prompts * len(points),  # block k answers with w_k
            max_new_tokens=settings.max_new_tokens,
            batch_size=len(prompts) * min(len(points), 8),
            chat_template=datamodule.chat_template,
            max_prompt_length=datamodule.max_prompt_length,
            prompt_weights=lora.stack_weights(weights, len(prompts)),
        )
    records = [
        {
            "w": list(w),
            "base": not any(w),
            "prompt": prompt,
            "response": responses[k * len(prompts) + i],
        }
        for k, w in enumerate(points)
        for i, prompt in enumerate(prompts)
    ]
    write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))
    return records
