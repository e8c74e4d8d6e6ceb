"""Sequence log-probs of responses: one forward, the LM head only where it is needed.

log pi(y|x) = sum over response tokens t of log p(y_t | x, y_<t), in fp32, with prompt and
padding masked. For causal LMs whose logits are a plain linear head over the decoder's last
hidden state, the head and log-softmax run only at the positions that predict a response token
(for a 49k vocabulary the head is a large share of the FLOPs and memory); other models fall
back to the full forward.

A ``[chosen; rejected]`` batch holds every prompt twice (rows i and B + i). With
``share_prompt`` each pair runs as one packed row, prompt + chosen + rejected, under a custom
attention mask (chosen tokens see the prompt and earlier chosen tokens; rejected tokens see
the prompt and earlier rejected tokens, never the chosen ones) and position ids that restart
the rejected response where the prompt ends. Every token sees exactly what it sees in its own
row, so the log-probs are the plain ones up to float rounding, while the prompt tokens run once
instead of twice and padding shrinks to one row per pair (prefix sharing, as in Wang et al.
2024, "Accelerating Direct Preference Optimization with Prefix Sharing"). One forward, so it
pays at any width; it needs an attention implementation that takes a 4D mask (``sdpa``,
``eager``) and falls back to the plain path otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from mva_lightning.model import lora
from mva_lightning.training.losses import sum_by_sequence, token_logps

# Configs with one of these set scale or cap logits after the head: use the full forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


# Attention implementations that apply a caller-made 4D mask as given.
_MASKED_ATTENTION = ("sdpa", "eager")


def share_prompt_pays(model: nn.Module, setting: bool | str = "auto") -> bool:
    """Resolve a ``share_prompt`` setting: ``True`` / ``False``, or ``"auto"``.

    ``"auto"`` is on where the packed forward applies: a separable LM head and an attention
    implementation that takes a 4D mask (``sdpa`` or ``eager``).

    Raises:
        ValueError: ``setting`` is neither a bool nor ``"auto"``.
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"train.share_prompt: expected true, false or auto, got {setting!r}")
    return _split_head(model) is not None and _attention_kind(model) is not None


def _attention_kind(model: nn.Module) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "_attn_implementation", None)
    return kind if kind in _MASKED_ATTENTION else None


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
    pair_weights: Mapping[str, torch.Tensor] | None = None,
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
        pair_weights: Value name -> (S/2,) preference weights of a ``[chosen; rejected]``
            batch's pairs: pair i (rows i and S/2 + i) computes with its own combination of
            value vectors (:func:`lora.using_row_weights`), so that one forward scores many
            preference vectors. None: the model's current weights for every row.

    Returns:
        (S,) fp32 log pi(y|x).
    """
    num_seqs = input_ids.shape[0]
    if pair_weights is not None and num_seqs % 2:
        raise ValueError(f"pair_weights needs a [chosen; rejected] batch, got {num_seqs} rows")
    split = _split_head(model) if head_on_response_only else None
    kind = _attention_kind(model) if share_prompt and split is not None else None
    if kind is not None:
        packed = _packed_pair_logps(
            *split, kind, input_ids, attention_mask, response_mask, _rows(model, pair_weights, 1)
        )
        if packed is not None:
            return packed
    target_mask = response_mask[:, 1:].bool()  # (S, T-1): token t+1 is predicted at position t
    targets = input_ids[:, 1:][target_mask]  # (N,)
    with _rows(model, pair_weights, 2):  # rows i and B + i are pair i
        if split is not None:
            decoder, head = split
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            logits = head(hidden[:, :-1][target_mask])  # (N, V), only response positions
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits[:, :-1][target_mask]  # (N, V)
    seq_index = torch.arange(num_seqs, device=input_ids.device)[:, None].expand_as(target_mask)
    return sum_by_sequence(token_logps(logits, targets), seq_index[target_mask], num_seqs)


def _packed_pair_logps(
    decoder: nn.Module,
    head: nn.Module,
    attention: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    rows: contextlib.AbstractContextManager,
) -> torch.Tensor | None:
    """``response_logps`` of a ``[chosen; rejected]`` batch, one packed row per pair.

    ``rows`` is entered around the forward (per-pair weights of the packed rows).

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
    in_prompt = torch.arange(width, device=device)[None, :] < starts[:b, None]  # (B, T)
    if (
        bool((resp_len == 0).any())
        or bool((starts == 0).any())
        or not torch.equal(starts[:b], starts[b:])
        or not torch.equal(resp_len, real_len - starts)  # prompt, response, then padding
        or not bool(((input_ids[:b] == input_ids[b:]) | ~in_prompt).all())
    ):
        return None

    # Packed row i: prompt (P), chosen (C), rejected (R), padding; columns j of width L.
    p, c, r = starts[:b, None], resp_len[:b, None], resp_len[b:, None]  # (B, 1)
    total = p + c + r
    j = torch.arange(int(total.max()), device=device)[None, :]  # (1, L)
    in_chosen_row = j < p + c  # prompt and chosen: the chosen row's own columns
    is_chosen = in_chosen_row & (j >= p)  # (B, L)
    real = j < total
    is_rejected = real & ~in_chosen_row  # taken from the rejected row's column j - C
    src = torch.where(in_chosen_row, j, j - c).clamp(max=width - 1)
    ids = torch.where(in_chosen_row, input_ids[:b].gather(1, src), input_ids[b:].gather(1, src))
    ids = ids.masked_fill(~real, 0)
    positions = torch.where(is_rejected, j - c, j).masked_fill(~real, 0)

    # Causal over real keys; rejected queries never see chosen keys; padding sees itself.
    sees = (j[:, :, None] >= j[:, None, :]) & real[:, None, :]  # (B, L, L) query, key
    sees &= ~(is_rejected[:, :, None] & is_chosen[:, None, :])
    sees |= torch.eye(j.shape[1], dtype=torch.bool, device=device)
    mask = sees[:, None]  # (B, 1, L, L), True = attend (sdpa's convention)
    if attention == "eager":  # eager adds the mask to the scores
        dtype = head.weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    with rows:
        hidden = decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, L, d)

    # A token is predicted at the previous column; the first rejected token at the prompt's end.
    targets = is_chosen | is_rejected
    predictor = torch.where(is_rejected & (j == p + c), p - 1, j - 1)  # (B, L)
    pair = torch.arange(b, device=device)[:, None].expand_as(targets)  # (B, L)
    logits = head(hidden[pair[targets], predictor[targets]])  # (N, V)
    seq_index = torch.where(is_chosen, pair, pair + b)[targets]  # chosen -> i, rejected -> B + i
    return sum_by_sequence(token_logps(logits, ids[targets]), seq_index, num_seqs)


def _rows(
    model: nn.Module, pair_weights: Mapping[str, torch.Tensor] | None, rows_per_pair: int
) -> contextlib.AbstractContextManager:
    """Per-row weights for a forward whose rows are the pairs, repeated ``rows_per_pair`` times."""
    if pair_weights is None:
        return contextlib.nullcontext()
    return lora.using_row_weights(
        model, {v: w.repeat(rows_per_pair) for v, w in pair_weights.items()}
    )
