"""Decoding-time combination of value vectors (MOD: Shi et al. 2024, arXiv 2406.18853).

Weight-space combination (:func:`mva_lightning.model.lora.using_row_weights`) generates from the
merged model W_0 + sum_v w_v delta W_v. MOD instead combines the values' next-token
distributions: token t is chosen from

    sum_v w_v log pi_v(y_t | x, y_<t),    pi_v = the base with value v's vector alone (w = e_v),

greedily (its argmax: no normalisation needed) or by sampling from its softmax (the
distribution proportional to prod_v pi_v^{w_v}). Any w is allowed: negative entries and
entries above 1 (outside the simplex). Greedy MOD does not change when w is scaled by a positive
constant (the argmax is the same).

How: each prompt becomes K rows, row (i, v) running with the one-hot adapter weights e_v, in one
``model.generate`` call per batch (its KV cache, left padding, attention mask and position ids,
as :func:`mva_lightning.model.generation.generate`); a logits processor combines the K rows of
each prompt, picks one token and forces it on all K rows, so they stay one continuation and stop
together at eos. Cost: K rows per prompt per token, i.e. K times the forward cost of generating
with merged weights.

The preference vector w = 0 has no combined distribution; it decodes from the base model pi_0
(all K rows run with no adapter, one of them counted), as weight-space generation does at w = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mva_lightning.model import lora
from mva_lightning.model.generation import (
    check_prompt_weights,
    check_sampling,
    continue_batch,
    generate_batches,
)


def combine_logprobs(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MOD's combined next-token score: sum_v w_v log_softmax(logits of value v).

    Args:
        logits: (B * K, V) next-token logits, rows i * K ... i * K + K - 1 the K values of
            prompt i.
        weights: (B, K) preference vector of each prompt.

    Returns:
        (B, V) combined scores in float32 (not normalised). A value with w_v = 0 contributes
        nothing, even where its log-prob is -inf.
    """
    b, k = weights.shape
    logp = torch.log_softmax(logits.float(), dim=-1).view(b, k, -1)  # (B, K, V)
    w = weights.to(logp.device, torch.float32)[:, :, None]  # (B, K, 1)
    return torch.where(w != 0, w * logp, 0.0).sum(dim=1)  # (B, V)


def pick_tokens(
    scores: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """Next token per row from combined scores: argmax, or a sample from their softmax.

    Sampling uses the global RNG (seed it, e.g. inside :func:`generation.continue_batch`) and
    ``transformers``' temperature and nucleus warpers, as ``generate`` samples.

    Args:
        scores: (B, V) combined scores (:func:`combine_logprobs`).
        do_sample: Sample instead of taking the argmax.
        temperature: Sampling temperature.
        top_p: Nucleus mass; 1.0 keeps the whole distribution.

    Returns:
        (B,) token ids.
    """
    if not do_sample:
        return scores.argmax(dim=-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]  # (B,)


def mod_row_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter weights of the K rows of each prompt and the weights that combine them.

    Args:
        weights: (B, K) preference vector of each prompt.

    Returns:
        ``(rows, mix)``: ``rows`` (B * K, K), row i * K + v the one-hot e_v (all zeros for a
        prompt whose w is 0: the base); ``mix`` (B, K) the combination weights, w itself, or
        e_1 where w = 0 (one base row counted).
    """
    b, k = weights.shape
    eye = torch.eye(k, dtype=torch.float32)  # (K, K)
    nonzero = (weights != 0).any(dim=1)  # (B,)
    rows = (eye[None] * nonzero[:, None, None]).reshape(b * k, k)  # (B * K, K)
    mix = torch.where(nonzero[:, None], weights.float(), eye[0])  # (B, K)
    return rows, mix


class _CombineValues:
    """Logits processor: combine each prompt's K rows, pick a token, force it on all K rows."""

    def __init__(self, mix: torch.Tensor, do_sample: bool, temperature: float, top_p: float):
        self.mix, self.sampling = mix, (do_sample, temperature, top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = self.mix.shape[1]
        token = pick_tokens(combine_logprobs(scores, self.mix), *self.sampling)  # (B,)
        forced = torch.full_like(scores, -torch.inf)  # (B * K, V)
        rows = torch.arange(scores.shape[0], device=scores.device)
        forced[rows, token.repeat_interleave(k)] = 0.0
        return forced


def generate_combined(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    prompt_weights: Mapping[str, Sequence[float] | torch.Tensor],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    chat_template: bool = False,
    max_prompt_length: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """Generate for every prompt by decoding-time combination (MOD) of the value vectors.

    Prompt i decodes from sum_v prompt_weights[v][i] log pi_v (module docstring): greedy, or
    sampled from its softmax. Cost: each prompt runs as K = ``len(prompt_weights)`` rows, one
    per value, so every token costs K times the forward of :func:`generation.generate` with
    merged weights (``batch_size`` prompts are ``K * batch_size`` rows per forward).

    Args:
        model: A model from :func:`lora.add_value_vectors` (its current weights are restored
            after).
        tokenizer: Its tokenizer (``pad_token_id`` and ``eos_token_id`` set).
        prompts: Prompt texts, formatted and truncated as :func:`generation.generate` does.
        prompt_weights: Value name -> one preference weight per prompt (any sign or magnitude);
            the K names are the values combined.
        max_new_tokens: Longest continuation, in tokens.
        do_sample: Sample from the combined distribution instead of greedy decoding.
        temperature: Sampling temperature (``do_sample`` only).
        top_p: Nucleus mass (``do_sample`` only).
        batch_size: Prompts per ``generate`` call.
        chat_template: Wrap each prompt in the tokenizer's chat template.
        max_prompt_length: Keep only the last this-many prompt tokens (None: keep all).
        seed: Sampling seed; batch b samples from ``seed + b`` (the global RNG is untouched).
        progress: Show a tqdm bar over batches.

    Returns:
        One decoded continuation per prompt, in input order, as :func:`generation.generate`
        returns them (cut at the first eos, special tokens skipped).

    Raises:
        KeyError: A name has no value vector.
        ValueError: On bad settings, no values, or not one weight per prompt.
    """
    from transformers import LogitsProcessorList

    check_sampling(do_sample, temperature, top_p)
    if not prompt_weights:
        raise ValueError("generate_combined: prompt_weights names no value to combine")
    check_prompt_weights(prompt_weights, len(prompts))
    lora.check_names(lora.value_names(model), prompt_weights)
    names = list(prompt_weights)
    table = torch.stack(
        [torch.as_tensor(prompt_weights[v], dtype=torch.float32).reshape(-1) for v in names], 1
    )  # (N, K)

    def step(rows: Sequence[int], batch: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        k = len(names)
        adapters, mix = mod_row_weights(table[list(rows)])  # (B * K, K), (B, K)
        expanded = {key: t.repeat_interleave(k, dim=0) for key, t in batch.items()}  # (B * K, T)
        combine = _CombineValues(mix.to(batch["input_ids"].device), do_sample, temperature, top_p)
        with lora.using_row_weights(model, dict(zip(names, adapters.unbind(1), strict=True))):
            new = continue_batch(
                model,
                tokenizer,
                expanded,
                max_new_tokens,
                seed + b,
                do_sample=False,  # the processor picks the token; greedy takes it
                logits_processor=LogitsProcessorList([combine]),
            )
        return new[::k]  # (B, <= max_new_tokens): the K rows of a prompt are identical

    return generate_batches(
        model,
        tokenizer,
        prompts,
        step,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat_template=chat_template,
        max_prompt_length=max_prompt_length,
        progress=progress,
    )
