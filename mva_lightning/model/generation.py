"""Batched generation for evaluation: left-padded prompts, greedy or seeded sampling.

Prompts are tokenised as in training (:func:`mva_lightning.data.collate.format_prompt`; the
tokenizer's special tokens are added unless a chat template already holds them), sorted by
length so that each batch carries little padding, left-padded
(:func:`mva_lightning.data.collate.collate_prompts`) and generated in one ``model.generate`` call
per batch. Results come back in the order of the input prompts. Each continuation stops at the
first eos and is decoded with special tokens skipped; a continuation that is empty (eos first)
is returned as ``""``.

:func:`generate_batches` is that batching with the per-batch call left open (a ``step``): both
:func:`generate` (merged weights) and :func:`mva_lightning.model.decoding.generate_combined`
(decoding-time combination) run through it, with :func:`continue_batch` as the one
``model.generate`` call.

Truncation rule: a prompt longer than ``max_prompt_length`` keeps its LAST tokens (the most
recent turns, next to the response), as in training. A prompt that still does not fit the
model's context together with ``max_new_tokens`` is an error naming the prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from mva_lightning.data.collate import collate_prompts, format_prompt
from mva_lightning.model import lora


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` accepts (``max_position_embeddings``), or None if unknown."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    chat_template: bool = False,
    max_prompt_length: int | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, left-truncated to ``max_prompt_length`` (keeps the end).

    An empty prompt gets the tokenizer's bos token (there is nothing else to condition on).

    Raises:
        ValueError: If a prompt is empty and the tokenizer has no bos token.
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i}: expected a string, got {type(prompt).__name__}")
        text = format_prompt(prompt, tokenizer, chat_template)
        ids = list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"])
        if not ids:
            if tokenizer.bos_token_id is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no bos token")
            ids = [tokenizer.bos_token_id]
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        out.append(ids)
    return out


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    chat_template: bool = False,
    max_prompt_length: int | None = None,
    seed: int = 0,
    progress: bool = False,
    prompt_weights: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
) -> list[str]:
    """Generate a continuation for every prompt with the model as it is (its current weights).

    Args:
        model: A causal LM (a PEFT model generates with its current :func:`lora.set_weights`).
        tokenizer: Its tokenizer (``pad_token_id`` and ``eos_token_id`` set).
        prompts: Prompt texts (raw transcripts, or wrapped by the chat template).
        max_new_tokens: Longest continuation, in tokens.
        do_sample: Sample (``temperature``, ``top_p``) instead of greedy decoding.
        temperature: Sampling temperature (``do_sample`` only).
        top_p: Nucleus mass (``do_sample`` only); 1.0 keeps the whole distribution.
        batch_size: Prompts per ``generate`` call.
        chat_template: Wrap each prompt in the tokenizer's chat template.
        max_prompt_length: Keep only the last this-many prompt tokens (None: keep all).
        seed: Sampling seed; batch b samples from ``seed + b`` (the global RNG is untouched).
        progress: Show a tqdm bar over batches.
        prompt_weights: Value name -> one preference weight per prompt: prompt i generates
            with W_0 + sum_v prompt_weights[v][i] delta W_v (:func:`lora.using_row_weights`),
            so that one call generates for many preference vectors. None: the model's current
            weights for every prompt.

    Returns:
        One decoded continuation per prompt, in input order, without the prompt, cut at the
        first eos, special tokens skipped; ``""`` when the model emits eos first.

    Raises:
        ValueError: On bad settings, or if prompt ``i`` plus ``max_new_tokens`` exceeds the
            model's context (the message names the prompt and the lengths).
    """
    check_sampling(do_sample, temperature, top_p)
    check_prompt_weights(prompt_weights, len(prompts))
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}

    def step(rows: Sequence[int], batch: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        if prompt_weights is None:
            weights = contextlib.nullcontext()
        else:
            rows_w = {
                v: torch.tensor([float(w[i]) for i in rows]) for v, w in prompt_weights.items()
            }
            weights = lora.using_row_weights(model, rows_w)
        with weights:
            return continue_batch(
                model, tokenizer, batch, max_new_tokens, seed + b, do_sample=do_sample, **sampling
            )

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


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` unless sampling settings are usable (only checked if ``do_sample``)."""
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(
            f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}"
        )


def check_prompt_weights(
    prompt_weights: Mapping[str, Sequence[float] | torch.Tensor] | None, num_prompts: int
) -> None:
    """Raise ``ValueError`` unless every value has one weight per prompt (None passes)."""
    if prompt_weights is None or num_prompts == 0:
        return
    bad = {v: len(w) for v, w in prompt_weights.items() if len(w) != num_prompts}
    if bad:
        raise ValueError(f"prompt_weights: expected {num_prompts} weights per value, got {bad}")


BatchStep = Callable[[Sequence[int], dict[str, torch.Tensor], int], torch.Tensor]


def generate_batches(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    step: BatchStep,
    max_new_tokens: int,
    batch_size: int = 8,
    chat_template: bool = False,
    max_prompt_length: int | None = None,
    progress: bool = False,
) -> list[str]:
    """The batching shared by every decoder: tokenise, check, sort, left-pad, call, decode.

    Prompts are sorted by length (longest first) and cut into batches of ``batch_size``; batch
    b (rows: the input indices of its prompts) is left-padded and handed to
    ``step(rows, batch, b)``, in eval mode, which returns the new tokens of each of its rows.

    Args:
        model: A causal LM (eval mode during the call; its mode is restored after).
        tokenizer: Its tokenizer (``pad_token_id`` and ``eos_token_id`` set).
        prompts: Prompt texts.
        step: ``(rows, batch, b) -> (B, <= max_new_tokens)`` new token ids, ``batch`` holding
            ``input_ids`` and ``attention_mask`` (B, T) on the model's device.
        max_new_tokens: Longest continuation, in tokens (checked against the context).
        batch_size: Prompts per batch.
        chat_template: Wrap each prompt in the tokenizer's chat template.
        max_prompt_length: Keep only the last this-many prompt tokens (None: keep all).
        progress: Show a tqdm bar over batches.

    Returns:
        One decoded continuation per prompt, in input order, cut at the first eos, special
        tokens skipped.

    Raises:
        ValueError: On bad settings, or if prompt ``i`` plus ``max_new_tokens`` exceeds the
            model's context.
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ValueError("generate: the tokenizer needs pad_token_id and eos_token_id")
    ids = tokenize_prompts(tokenizer, prompts, chat_template, max_prompt_length)
    limit = context_length(model)
    if limit is not None:
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                    f"exceeds the model's context of {limit} tokens (set max_prompt_length <= "
                    f"{limit - max_new_tokens} or lower max_new_tokens)"
                )

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(ids)
    was_training = model.training
    if was_training:
        model.eval()
    try:
        for b, rows in enumerate(tqdm(batches, desc="generate", disable=not progress)):
            batch = collate_prompts([ids[i] for i in rows], pad)  # (B, T) left-padded
            batch = {k: t.to(device) for k, t in batch.items()}
            new = step(rows, batch, b).cpu()  # (B, <= max_new_tokens)
            for row, tokens in zip(rows, new.tolist(), strict=True):
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                outputs[row] = tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        if was_training:
            model.train()
    return outputs


def continue_batch(
    model: nn.Module,
    tokenizer,
    batch: Mapping[str, torch.Tensor],
    max_new_tokens: int,
    seed: int = 0,
    **kwargs,
) -> torch.Tensor:
    """One ``model.generate`` call on a left-padded batch: the new tokens only.

    Runs without gradients, with the global RNG seeded by ``seed`` inside a fork (restored
    after), stopping each row at the tokenizer's eos (later positions are padding).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (``pad_token_id``, ``eos_token_id``).
        batch: ``input_ids`` and ``attention_mask`` (B, T), left-padded, on the model's device.
        max_new_tokens: Longest continuation, in tokens.
        seed: Seed of the sampling RNG.
        **kwargs: More ``model.generate`` arguments (``do_sample``, ``logits_processor``, ...).

    Returns:
        (B, <= max_new_tokens) new token ids, on the model's device.
    """
    device = batch["input_ids"].device
    with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
    return out[:, batch["input_ids"].shape[1] :]  # (B, <= max_new_tokens)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []
