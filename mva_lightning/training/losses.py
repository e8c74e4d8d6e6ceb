"""Pure loss functions over named shapes (B = pairs in a batch).

Vocabulary follows the DPO paper and TRL: ``policy_/reference_`` x ``chosen_/rejected_`` x
``logps/rewards``. Nothing here touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOOutput:
    """Per-pair DPO terms.

    Attributes:
        loss: Scalar, mean over pairs.
        losses: (B,) per-pair loss.
        chosen_rewards: (B,) beta * (log pi(y_w|x) - log pi_0(y_w|x)), detached.
        rejected_rewards: (B,) beta * (log pi(y_l|x) - log pi_0(y_l|x)), detached.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """TRL's metric names: loss, rewards/{chosen,rejected,margins,accuracies}."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {
            "loss": self.loss.detach(),
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
        }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    margin: torch.Tensor | None = None,
) -> DPOOutput:
    """Sigmoid DPO loss (Rafailov et al. 2023), optionally with a MODPO margin.

    L = -log sigmoid(beta * ([log pi(y_w) - log pi_0(y_w)] - [log pi(y_l) - log pi_0(y_l)]) - m)

    Args:
        policy_chosen_logps: (B,) sequence log-probs of chosen responses under the policy.
        policy_rejected_logps: (B,) same for rejected responses.
        reference_chosen_logps: (B,) under the reference (base model).
        reference_rejected_logps: (B,) under the reference.
        beta: KL strength.
        label_smoothing: Conservative DPO's eps (0 = plain DPO).
        margin: (B,) subtracted from the logits (MODPO's margin from other values); None = 0.

    Returns:
        A :class:`DPOOutput`.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return DPOOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def modpo_margin(
    reward_margins: torch.Tensor, weights: torch.Tensor, own_weight: float
) -> torch.Tensor:
    """MODPO's margin (Zhou et al. 2023) from the frozen implicit rewards of the other values.

    m = (1/w_k) * sum_j w_j * (r_j(y_w) - r_j(y_l)), r_j = beta * (log pi_j - log pi_0).
    With logits scaled by 1/w_k, the MODPO loss is ``dpo_loss(..., beta=beta / w_k, margin=m)``.

    Args:
        reward_margins: (J, B) r_j(y_w) - r_j(y_l) for each of the J other values.
        weights: (J,) their preference weights w_j.
        own_weight: w_k > 0, the weight of the value being trained.

    Returns:
        (B,) margins.
    """
    if not own_weight > 0:
        raise ValueError(f"modpo_margin: own_weight (w_k) must be > 0, got {own_weight}")
    if reward_margins.dim() != 2 or weights.shape != reward_margins.shape[:1]:
        raise ValueError(
            f"modpo_margin: expected reward_margins (J, B) and weights (J,), got "
            f"{tuple(reward_margins.shape)} and {tuple(weights.shape)}"
        )
    weights = weights.to(reward_margins)
    return (weights[:, None] * reward_margins).sum(0) / own_weight  # (B,)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row, without materialising the full log-softmax.

    Args:
        logits: (N, V) logits, any float dtype (upcast to fp32 here).
        targets: (N,) token ids.

    Returns:
        (N,) fp32 log-probs.
    """
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sum_by_sequence(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Sum per-token values into per-sequence totals.

    Args:
        values: (N,) per-token values.
        seq_index: (N,) sequence of each token, in [0, num_seqs).
        num_seqs: Number of sequences S.

    Returns:
        (S,) sums; a sequence with no tokens sums to 0.
    """
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_index, values)


def split_chosen_rejected(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) log-probs of a [chosen; rejected] batch -> ((B,), (B,))."""
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
