"""Tokenisation with prompt masking and truncation, and the ``[chosen; rejected]`` collator."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mva_lightning.data.sources import PreferencePair

_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Tokenized:
    """One tokenised preference pair.

    Attributes:
        index: Row of the pair in its split (keys the reference log-prob cache).
        prompt_ids: Prompt tokens (left-truncated to ``max_prompt_length``).
        chosen_ids: Chosen response tokens, ending with eos unless truncated.
        rejected_ids: Rejected response tokens, same rule.
    """

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def transcript_to_messages(prompt: str) -> list[dict[str, str]]:
    """Split an HH transcript ("\\n\\nHuman: ...\\n\\nAssistant:") into chat messages.

    Text before the first turn marker, if any, becomes a user message; the final empty
    assistant turn is dropped (the chat template's generation prompt stands for it).
    """
    parts = _TURN.split(prompt)
    messages = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def format_prompt(prompt: str, tokenizer, chat_template: bool) -> str:
    """The prompt text the model sees: raw transcript, or the tokenizer's chat template."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.chat_template=true but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        transcript_to_messages(prompt), tokenize=False, add_generation_prompt=True
    )


def tokenize_pair(
    pair: PreferencePair,
    index: int,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    chat_template: bool = False,
) -> Tokenized:
    """Tokenise one pair: keep the end of the prompt, cut responses to fit ``max_length``.

    Args:
        pair: The preference pair.
        index: Its row in the split.
        tokenizer: A Hugging Face tokenizer with ``eos_token_id``.
        max_length: Longest prompt + response, in tokens.
        max_prompt_length: Longest prompt; longer prompts keep their last tokens (the most
            recent turns, next to the response).
        chat_template: Wrap the transcript in the tokenizer's chat template.
    """
    if max_prompt_length >= max_length:
        raise ValueError(
            f"data.max_prompt_length ({max_prompt_length}) must be below data.max_length "
            f"({max_length}) to leave room for the response"
        )
    text = format_prompt(pair.prompt, tokenizer, chat_template)
    prompt_ids = tokenizer(text, add_special_tokens=not chat_template)["input_ids"]
    prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    eos = [tokenizer.eos_token_id]
    chosen = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + eos
    rejected = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"] + eos
    return Tokenized(index, prompt_ids, chosen[:room], rejected[:room])


def collate_pairs(examples: Sequence[Tokenized], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch B pairs as 2B right-padded rows: chosen rows first, then rejected rows.

    Returns:
        ``input_ids`` (2B, T), ``attention_mask`` (2B, T), ``response_mask`` (2B, T) True on
        response tokens, ``index`` (B,), and ``response_tokens`` (scalar) for throughput logs.
    """
    rows = [e.prompt_ids + e.chosen_ids for e in examples]
    rows += [e.prompt_ids + e.rejected_ids for e in examples]
    prompt_lens = [len(e.prompt_ids) for e in examples] * 2
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, plen) in enumerate(zip(rows, prompt_lens, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        response_mask[i, plen : len(row)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "index": torch.tensor([e.index for e in examples], dtype=torch.long),
        "response_tokens": response_mask.sum(),
    }


def collate_prompts(
    prompt_ids: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation: ``input_ids`` and ``attention_mask`` (B, T)."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        if ids:
            input_ids[i, width - len(ids) :] = torch.tensor(list(ids))
            attention_mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
