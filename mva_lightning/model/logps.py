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

:func:`combined_response_logps` is the same for the decoding-time combination (MOD) of the
value vectors: K one-hot copies of every row in that one forward, their per-token
log-softmaxes combined with w and renormalised.
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
    row_weights = _pairs_to_rows(pair_weights, num_seqs)
    logits, targets, seq_index = _response_logits(
        model,
        input_ids,
        attention_mask,
        response_mask,
        head_on_response_only,
        share_prompt,
        row_weights,
    )
    return sum_by_sequence(token_logps(logits, targets), seq_index, num_seqs)


def combined_response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    head_on_response_only: bool = True,
    share_prompt: bool = False,
    pair_weights: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`response_logps` of the decoding-time combination (MOD) of the value vectors.

    Per response token t, log p_MOD(y_t) = s_t[y_t] - logsumexp(s_t) with
    s_t = sum_v w_v log_softmax(logits of pi_v at t) over the vocabulary, pi_v the base with
    value v's vector alone (:mod:`mva_lightning.model.decoding`); summed over the response. Each
    sequence runs as K rows in one forward, row v with the one-hot weights e_v
    (:func:`lora.using_row_weights`), so it costs K times :func:`response_logps`. A one-hot w
    gives that value's own log-probs, and w = 0 the base model's, as decoding does.

    Args:
        model: A model from :func:`lora.add_value_vectors`; its K value vectors are combined.
        input_ids: (S, T) prompt + response, right-padded.
        attention_mask: (S, T) 1 on real tokens.
        response_mask: (S, T) True where token t belongs to the response (the targets).
        head_on_response_only: As :func:`response_logps`.
        share_prompt: As :func:`response_logps` (the K rows of a pair stay one packed pair).
        pair_weights: Value name -> (S/2,) preference vector of each pair of a
            ``[chosen; rejected]`` batch (values left out: 0); None: the model's current
            weights (:func:`lora.get_weights`) for every row.

    Returns:
        (S,) fp32 log p_MOD(y|x).
    """
    from mva_lightning.model.decoding import combine_logprobs, mod_row_weights

    num_seqs, device = input_ids.shape[0], input_ids.device
    names = lora.value_names(model)
    if not names:
        raise ValueError("combined_response_logps: the model has no value vectors to combine")
    k = len(names)
    if pair_weights is None:
        current = lora.get_weights(model)
        table = torch.tensor([[current[v] for v in names]]).expand(num_seqs, k)  # (S, K)
    else:
        lora.check_names(names, pair_weights)
        rows = _pairs_to_rows(pair_weights, num_seqs)
        zeros = torch.zeros(num_seqs)
        table = torch.stack([rows.get(v, zeros).float().cpu() for v in names], 1)  # (S, K)
    adapters, mix = mod_row_weights(table)  # (S * K, K) one-hot rows, (S, K) combination
    # Expanded row (h, c, i), h the half of a [chosen; rejected] batch: copy c (adapter e_c) of
    # row h * S/2 + i, so that the rows of pair (c, i) stay S * K / 2 apart (packable).
    halves = 2 if num_seqs % 2 == 0 else 1
    shape = (halves, k, num_seqs // halves)
    seq = torch.arange(num_seqs).view(halves, 1, -1).expand(shape).reshape(-1)  # (S * K,)
    copy = torch.arange(k).view(1, k, 1).expand(shape).reshape(-1)  # (S * K,)
    row_adapters = adapters.view(num_seqs, k, k)[seq, copy]  # (S * K, K)
    expanded = [t[seq.to(t.device)] for t in (input_ids, attention_mask, response_mask)]
    logits, targets, index = _response_logits(
        model,
        *expanded,
        head_on_response_only,
        share_prompt,
        dict(zip(names, row_adapters.unbind(1), strict=True)),
    )  # (K * N, V), (K * N,), (K * N,)
    # Align the copies: tokens of copy c of row s, in order, under key c * S + s (stable sort);
    # then token n's K copies are rows n * K ... n * K + K - 1.
    key = (copy * num_seqs + seq).to(device)[index]
    n = key.shape[0] // k
    order = torch.argsort(key, stable=True).view(k, n).t().reshape(-1)  # (N * K,)
    logits = logits[order]  # (N * K, V), token-major
    token_seq = seq.to(device)[index[order[::k]]]  # (N,)
    targets = targets[order[::k]]  # (N,)
    token_mix = mix.to(device)[token_seq]  # (N, K)
    scores = combine_logprobs(logits, token_mix)  # (N, V) sum_v w_v log pi_v
    # one value alone (one-hot w; w = 0 counts the base row): that row's own logits, so that
    # the log-probs are exactly what response_logps computes
    single = ((token_mix != 0).sum(dim=1) == 1) & (token_mix.sum(dim=1) == 1)  # (N,)
    own = logits.view(n, k, -1)[torch.arange(n, device=device), token_mix.argmax(dim=1)]
    scores = torch.where(single[:, None], own.float(), scores)  # (N, V)
    return sum_by_sequence(token_logps(scores, targets), token_seq, num_seqs)


def _pairs_to_rows(
    pair_weights: Mapping[str, torch.Tensor] | None, num_seqs: int
) -> dict[str, torch.Tensor] | None:
    """(S/2,) weights per pair -> (S,) per row of a ``[chosen; rejected]`` batch."""
    if pair_weights is None:
        return None
    if num_seqs % 2:
        raise ValueError(f"pair_weights needs a [chosen; rejected] batch, got {num_seqs} rows")
    return {v: w.repeat(2) for v, w in pair_weights.items()}


def _response_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    head_on_response_only: bool,
    share_prompt: bool,
    row_weights: Mapping[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token (see :func:`response_logps`).

    Args:
        row_weights: Value name -> (S,) weights of each row (None: the model's current ones).

    Returns:
        ``(logits, targets, seq_index)``: (N, V) logits, (N,) the token each predicts and (N,)
        its row; the tokens of a row come in their order.
    """
    split = _split_head(model) if head_on_response_only else None
    kind = _attention_kind(model) if share_prompt and split is not None else None
    if kind is not None:
        packed = _packed_pair_logits(
            *split, kind, input_ids, attention_mask, response_mask, model, row_weights
        )
        if packed is not None:
            return packed
    target_mask = response_mask[:, 1:].bool()  # (S, T-1): token t+1 is predicted at position t
    targets = input_ids[:, 1:][target_mask]  # (N,)
    with _rows(model, row_weights):
        if split is not None:
            decoder, head = split
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            logits = head(hidden[:, :-1][target_mask])  # (N, V), only response positions
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits[:, :-1][target_mask]  # (N, V)
    seq_index = torch.arange(input_ids.shape[0], device=input_ids.device)
    return logits, targets, seq_index[:, None].expand_as(target_mask)[target_mask]


def _packed_pair_logits(
    decoder: nn.Module,
    head: nn.Module,
    attention: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    model: nn.Module,
    row_weights: Mapping[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`_response_logits` of a ``[chosen; rejected]`` batch, one packed row per pair.

    Returns None (the caller takes the plain path) unless rows i and B + i hold the same
    non-empty prompt and the same ``row_weights``, and every row is prompt, then a non-empty
    response, then padding.
    """
    num_seqs, width = input_ids.shape
    if num_seqs % 2:
        return None
    b = num_seqs // 2
    if row_weights is not None and not all(torch.equal(w[:b], w[b:]) for w in row_weights.values()):
        return None
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
    pair_rows = None if row_weights is None else {v: w[:b] for v, w in row_weights.items()}
    with _rows(model, pair_rows):
        hidden = decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, L, d)

    # A token is predicted at the previous column; the first rejected token at the prompt's end.
    targets = is_chosen | is_rejected
    predictor = torch.where(is_rejected & (j == p + c), p - 1, j - 1)  # (B, L)
    pair = torch.arange(b, device=device)[:, None].expand_as(targets)  # (B, L)
    logits = head(hidden[pair[targets], predictor[targets]])  # (N, V)
    seq_index = torch.where(is_chosen, pair, pair + b)[targets]  # chosen -> i, rejected -> B + i
    return logits, ids[targets], seq_index


def _rows(
    model: nn.Module, row_weights: Mapping[str, torch.Tensor] | None
) -> contextlib.AbstractContextManager:
    """Per-row weights for a forward (None: the model's current weights)."""
    if row_weights is None:
        return contextlib.nullcontext()
    return lora.using_row_weights(model, row_weights)
