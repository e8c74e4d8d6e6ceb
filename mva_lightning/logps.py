"""Sequence log-probs of responses: one forward, the LM head only where it is needed.

log pi(y|x) = sum over response tokens t of log p(y_t | x, y_<t), in fp32, with prompt and
padding masked. For causal LMs whose logits are a plain linear head over the decoder's last
hidden state, the head and log-softmax run only at the positions that predict a response token
(for a 49k vocabulary the head is a large share of the FLOPs and memory); other models fall
back to the full forward.
"""

from __future__ import annotations

import torch
from torch import nn

from mva_lightning.losses import sum_by_sequence, token_logps

# Configs with one of these set scale or cap logits after the head: use the full forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


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
) -> torch.Tensor:
    """Sum of response-token log-probs per sequence.

    Args:
        model: A causal LM (a PEFT model computes with its current adapter weights).
        input_ids: (S, T) prompt + response, right-padded.
        attention_mask: (S, T) 1 on real tokens.
        response_mask: (S, T) True where token t belongs to the response (the targets).
        head_on_response_only: Run the LM head only at positions predicting a response token.

    Returns:
        (S,) fp32 log pi(y|x).
    """
    num_seqs = input_ids.shape[0]
    target_mask = response_mask[:, 1:].bool()  # (S, T-1): token t+1 is predicted at position t
    targets = input_ids[:, 1:][target_mask]  # (N,)
    split = _split_head(model) if head_on_response_only else None
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = head(hidden[:, :-1][target_mask])  # (N, V), only response positions
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits[:, :-1][target_mask]  # (N, V)
    seq_index = torch.arange(num_seqs, device=input_ids.device)[:, None].expand_as(target_mask)
    return sum_by_sequence(token_logps(logits, targets), seq_index[target_mask], num_seqs)
