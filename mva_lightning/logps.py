"""Sequence log-probs of responses: one forward, the LM head only where it is needed.

log pi(y|x) = sum over response tokens t of log p(y_t | x, y_<t), in fp32, with prompt and
padding masked. For causal LMs whose logits are a plain linear head over the decoder's last
hidden state, the head and log-softmax run only at the positions that predict a response token
(for a 49k vocabulary the head is a large share of the FLOPs and memory); other models fall
back to the full forward.

A ``[chosen; rejected]`` batch holds every prompt twice (rows i and B + i). With
``share_prompt`` the prompts run once (left-padded, keeping their positions) and both responses
continue from the prompt's key/value cache, repeated for the two rows: the same log-probs up to
float rounding, with the prompt tokens' compute and activations halved. Gradients flow through
the cache into the prompt forward, as in the plain path. It trades one forward for two (prompt,
then responses): it pays when compute dominates, not for toy widths where per-call overhead
does (``share_prompt_pays``; measured in ``experiments/bench_train.py``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mva_lightning.losses import sum_by_sequence, token_logps

# Configs with one of these set scale or cap logits after the head: use the full forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


# Below this width a forward costs mostly per-call overhead: bench_train measured the shared
# prompt 7-12 % slower on a 64-wide model and 3-11 % faster on SmolLM2-135M (576 wide) at its
# short prompts; the saving grows with the prompt's share of the sequence.
SHARE_PROMPT_MIN_WIDTH = 256


def share_prompt_pays(model: nn.Module, setting: bool | str = "auto") -> bool:
    """Resolve a ``share_prompt`` setting: ``True`` / ``False``, or ``"auto"`` (by model width).

    Raises:
        ValueError: ``setting`` is neither a bool nor ``"auto"``.
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"train.share_prompt: expected true, false or auto, got {setting!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    width = getattr(getattr(base, "config", None), "hidden_size", None)
    return width is not None and width >= SHARE_PROMPT_MIN_WIDTH


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is not None and any(getattr(config, k, None) for k in _LOGIT_POSTPROCESSING):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is base or not isinstance(head, nn.Linear):
        return None
    return decoder, head


def response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    head_on_response_only: bool = True,
    share_prompt: bool = False,
) -> torch.Tensor:
    """Sum of response-token log-probs per sequence.

    Args:
        model: A causal LM (a PEFT model computes with its current adapter weights).
        input_ids: (S, T) prompt + response, right-padded.
        attention_mask: (S, T) 1 on real tokens.
        response_mask: (S, T) True where token t belongs to the response (the targets).
        head_on_response_only: Run the LM head only at positions predicting a response token.
        share_prompt: Rows i and S/2 + i share their prompt (a ``[chosen; rejected]`` batch):
            run each prompt once (see the module docstring). Needs ``head_on_response_only``;
            batches that do not have that form, and models without a separable head, take
            the plain path.

    Returns:
        (S,) fp32 log pi(y|x).
    """
    num_seqs = input_ids.shape[0]
    split = _split_head(model) if head_on_response_only else None
    if share_prompt and split is not None:
        shared = _shared_prompt_logps(*split, input_ids, attention_mask, response_mask)
        if shared is not None:
            return shared
    target_mask = response_mask[:, 1:].bool()  # (S, T-1): token t+1 is predicted at position t
    targets = input_ids[:, 1:][target_mask]  # (N,)
    if split is not None:
        decoder, head = split
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        logits = head(hidden[:, :-1][target_mask])  # (N, V), only response positions
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1][target_mask]  # (N, V)
    seq_index = torch.arange(num_seqs, device=input_ids.device)[:, None].expand_as(target_mask)
    return sum_by_sequence(token_logps(logits, targets), seq_index[target_mask], num_seqs)


def _shared_prompt_logps(
    decoder: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor | None:
    """``response_logps`` of a ``[chosen; rejected]`` batch with each prompt run once.

    Returns None (the caller takes the plain path) unless rows i and B + i hold the same
    non-empty prompt and every row is prompt, then a non-empty response, then padding.
    """
    num_seqs, width = input_ids.shape
    if num_seqs % 2:
        return None
    b = num_seqs // 2
    device = input_ids.device
    resp = response_mask.bool()
    starts = resp.int().argmax(dim=1)  # (S,) prompt lengths: first response position
    resp_len = resp.sum(dim=1)  # (S,)
    real_len = attention_mask.bool().sum(dim=1)  # (S,)
    cols = torch.arange(width, device=device)
    in_prompt = cols[None, :] < starts[:b, None]  # (B, T)
    if (
        bool((resp_len == 0).any())
        or bool((starts == 0).any())
        or not torch.equal(starts[:b], starts[b:])
        or not torch.equal(resp_len, real_len - starts)  # prompt, response, then padding
        or not bool(((input_ids[:b] == input_ids[b:]) | ~in_prompt).all())
    ):
        return None
    p_width, r_width = int(starts.max()), int(resp_len.max())

    # 1. Prompts, left-padded to P so that they end together; positions as in the full rows.
    src = torch.arange(p_width, device=device)[None, :] - (p_width - starts[:b, None])  # (B, P)
    p_mask = src >= 0
    p_pos = src.clamp(min=0)
    p_ids = torch.where(p_mask, input_ids[:b].gather(1, p_pos), 0)
    out = decoder(input_ids=p_ids, attention_mask=p_mask.long(), position_ids=p_pos, use_cache=True)
    cache_name = _cache_name(decoder)  # transformers 5 renames past_key_values -> cache
    cache = getattr(out, cache_name)
    cache.reorder_cache(torch.arange(b, device=device).repeat(2))  # (2B, ...): [prompts; prompts]

    # 2. Responses of both rows, continuing from the cache at their own positions.
    r_pos = starts[:, None] + torch.arange(r_width, device=device)[None, :]  # (S, R)
    r_mask = torch.arange(r_width, device=device)[None, :] < resp_len[:, None]  # (S, R)
    r_ids = torch.where(r_mask, input_ids.gather(1, r_pos.clamp(max=width - 1)), 0)
    kv_mask = torch.cat([p_mask.repeat(2, 1), r_mask], dim=1).long()  # (S, P + R)
    hidden = decoder(
        input_ids=r_ids,
        attention_mask=kv_mask,
        position_ids=r_pos,
        use_cache=True,
        **{cache_name: cache},
    ).last_hidden_state  # (S, R, d)

    # Response token t is predicted at the previous position: the prompt's last for t = 0.
    last_prompt = out.last_hidden_state[:, -1:].repeat(2, 1, 1)  # (S, 1, d)
    predictors = torch.cat([last_prompt, hidden[:, :-1]], dim=1)  # (S, R, d)
    logits = head(predictors[r_mask])  # (N, V), response positions only
    seq_index = torch.arange(num_seqs, device=device)[:, None].expand_as(r_mask)
    return sum_by_sequence(token_logps(logits, r_ids[r_mask]), seq_index[r_mask], num_seqs)


def _cache_name(decoder: nn.Module) -> str:
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
