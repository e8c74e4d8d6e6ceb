"""The embedded default data: project prompts, responses sampled from the base model, scorer labels.

When no human labels exist, preference pairs are built the way MODPO / RiC-style work builds
them: for each prompt, sample several responses from the base model, score each with the value's
scorer, and keep (highest-scored, lowest-scored) when the gap exceeds a margin. The prompts are
the ``train`` rows of a prompt file (:mod:`mva_lightning.data.prompts`; by default the package's
``assets/prompts.jsonl``: benign requests and sensitive ones that a careful assistant declines).

A 135M model almost never refuses, even when told to, so sampling alone gives a harmlessness
scorer no refusal to prefer. A value can ask for ``refusal_candidates``: every prompt then also
gets one refusal written for the project (:data:`REFUSALS`, picked by the prompt's hash) among its
candidates, and the scorer decides where it wins (a sensitive request) and where it loses (a
benign one, when the scorer penalises over-refusal).

Sampled responses are cached on disk under a fingerprint of (model, prompts, sampling
settings), and scores under a fingerprint of (responses, scorer), so the second run skips both.
The responses are shared by every value: each value only ranks them differently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mva_lightning.data.prompts import read_prompts
from mva_lightning.data.sources import DataError, PreferencePair
from mva_lightning.io import fingerprint, write_json

log = logging.getLogger(__name__)


# One-line refusals written for this project: no numbered steps, no "here's how" (so that the
# refusal detector in mva_lightning.scorers.refusal reads them as refusals).
REFUSALS: tuple[str, ...] = (
    "I can't help with that. It could hurt someone or break the law.",
    "I'm sorry, but I won't help with this request because it could cause real harm.",
    "I cannot assist with that. If you're in a difficult situation, talking to someone you "
    "trust or a local professional may help.",
    "I'm not able to help with that, since it could put people at risk.",
    "Sorry, I can't do that. It would be harmful, and I'd rather help with something safer.",
    "I won't give advice on that. Is there something else I can help you with?",
)


def refusal_for(prompt: str) -> str:
    """The refusal candidate of ``prompt``: one of :data:`REFUSALS`, chosen by its hash."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return REFUSALS[digest[0] % len(REFUSALS)]


def _cache_root(cache_dir: str | None) -> Path:
    from mva_lightning.model.backbones import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir() / "embedded"


def sample_responses(
    model_loader: Mapping[str, Any],
    prompts: Sequence[str],
    num_samples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 16,
    chat_template: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
) -> list[list[str]]:
    """``num_samples`` sampled responses per prompt from the base model, cached on disk.

    Args:
        model_loader: The ``model.loader`` config (a ``_target_`` mapping); the model is only
            built on a cache miss.
        prompts: Transcripts.
        num_samples: Responses per prompt (>= 2).
        max_new_tokens: Length cap of each response.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold.
        batch_size: Prompts per generation batch.
        chat_template: Wrap prompts in the tokenizer's chat template.
        seed: Sampling seed.
        cache_dir: Cache folder (default: ``$MVA_CACHE/embedded``).

    Returns:
        responses[i][k]: the k-th response to prompt i.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to form pairs, got {num_samples}")
    settings = dict(
        model=dict(model_loader),
        prompts=list(prompts),
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        chat_template=chat_template,
        seed=seed,
    )
    path = _cache_root(cache_dir) / f"responses-{fingerprint(settings)}.json"
    if path.is_file():
        log.info("sampled responses: cache hit %s", path.name)
        return json.loads(path.read_text())["responses"]

    from hydra.utils import instantiate

    from mva_lightning.model.generation import generate

    backbone = instantiate(dict(model_loader))
    backbone.model.eval()
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    flat = generate(
        backbone.model,
        backbone.tokenizer,
        flat_prompts,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        chat_template=chat_template,
        seed=seed,
        progress=True,
    )
    responses = [flat[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
    write_json(path, {"settings": settings, "responses": responses})
    return responses


def score_responses(
    scorer, prompts: Sequence[str], responses: Sequence[Sequence[str]], cache_dir: str | None
) -> list[list[float]]:
    """Scores of every response by one scorer, cached by (responses, scorer name)."""
    from mva_lightning.scorers.base import check_scores

    key = fingerprint({"scorer": scorer.name, "prompts": list(prompts), "responses": responses})
    path = _cache_root(cache_dir) / f"scores-{scorer.name}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    flat_prompts = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    flat_responses = [r for rs in responses for r in rs]
    flat = check_scores(scorer(flat_prompts, flat_responses), len(flat_responses), scorer.name)
    out, i = [], 0
    for rs in responses:
        out.append(flat[i : i + len(rs)])
        i += len(rs)
    write_json(path, out)
    return out


def best_worst_pairs(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    margin: float,
) -> list[PreferencePair]:
    """(highest-scored, lowest-scored) response per prompt, kept when the gap exceeds margin."""
    pairs = []
    for prompt, rs, ss in zip(prompts, responses, scores, strict=True):
        order = sorted(range(len(rs)), key=lambda k: ss[k])  # stable: ties keep sample order
        lo, hi = order[0], order[-1]
        if ss[hi] - ss[lo] > margin and rs[hi].strip() != rs[lo].strip():
            pairs.append(PreferencePair(prompt, rs[hi].strip(), rs[lo].strip()))
    return pairs


def scored_pairs(
    scorer: Mapping[str, Any],
    model_loader: Mapping[str, Any],
    margin: float = 0.05,
    prompts_file: str | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 16,
    chat_template: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
    refusal_candidates: bool = False,
    split: str = "train",
    max_pairs: int | None = None,
    category: str | None = None,
) -> list[PreferencePair]:
    """A value's preference pairs built from sampled responses and the value's scorer.

    A source for ``conf/value/embedded_*.yaml``. Its config node sets ``_recursive_: false`` so
    that the model is built only on a cache miss; ``scorer`` and ``model_loader`` arrive as
    ``_target_`` mappings and are instantiated here.

    Args:
        scorer: The value's scorer config (``_target_`` mapping).
        model_loader: The base model's loader config.
        margin: Minimum score gap between chosen and rejected.
        prompts_file: Prompt file (:mod:`mva_lightning.data.prompts`; ``pkg://`` allowed;
            default: the package's prompts).
        num_samples: Responses sampled per prompt.
        max_new_tokens: Length cap of each response.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold.
        batch_size: Generation batch size.
        chat_template: Wrap prompts in the tokenizer's chat template.
        seed: Sampling seed.
        cache_dir: Cache folder for responses and scores.
        refusal_candidates: Add one written refusal (:func:`refusal_for`) to every prompt's
            sampled responses before scoring.
        split: The rows of the prompt file to build pairs from.
        max_pairs: Keep at most this many pairs, evenly spread over the prompt file (so every
            part of it, and both categories, stay represented); None: all.
        category: Build pairs only on prompts of this category (``sensitive`` for a value about
            refusing, as HH-RLHF's harmless data holds only red-team prompts); None: all. The
            responses are sampled for every prompt of the split either way (one cache for
            every value).
    """
    from hydra.utils import instantiate

    rows = read_prompts(prompts_file, split=split)
    prompts = [r.prompt for r in rows]
    responses = sample_responses(
        model_loader,
        prompts,
        num_samples,
        max_new_tokens,
        temperature,
        top_p,
        batch_size,
        chat_template,
        seed,
        cache_dir,
    )
    if refusal_candidates:
        responses = [[*rs, refusal_for(p)] for p, rs in zip(prompts, responses, strict=True)]
    if category is not None:
        keep = [i for i, r in enumerate(rows) if r.category == category]
        if not keep:
            raise DataError(f"{prompts_file or 'the package prompts'}: no {category!r} prompts")
        prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
    value_scorer = instantiate(dict(scorer))
    scores = score_responses(value_scorer, prompts, responses, cache_dir)
    pairs = best_worst_pairs(prompts, responses, scores, margin)
    log.info(
        "%s: %d pairs from %d prompts (margin %.3g)",
        value_scorer.name,
        len(pairs),
        len(prompts),
        margin,
    )
    if not pairs:
        raise DataError(f"scorer {value_scorer.name!r}: no pair has a score gap above {margin}")
    return spread(pairs, max_pairs)


def spread(items: list, n: int | None) -> list:
    """At most ``n`` of ``items``, evenly spaced and in order (all of them when n is None)."""
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ValueError(f"max_pairs must be >= 1, got {n}")
    return [items[(i * len(items)) // n] for i in range(n)]
