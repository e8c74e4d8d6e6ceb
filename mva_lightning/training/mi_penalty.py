"""The mutual-information penalty between value vectors, as one object the module owns.

alpha * sum over a stage's pairs (i, j) of MI(theta_i, theta_j) (docs/method.md §4). The
estimator (:mod:`mva_lightning.mi`) maps paired features to an estimate; this class builds the
features from the policy's LoRA factors or from the hidden states a forward captured, keeps one
statistics network per pair for estimators that have one (MINE: an adversary trained with its
own optimizer on detached features before each policy step), and drops estimates that are not
finite so that they never reach a gradient.

"No penalty" is one thing: :func:`is_enabled` is false (no estimator, or alpha = 0), and the
module then holds no :class:`MIPenalty` at all.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mva_lightning.mi import MIEstimator, activation_features, lora_features
from mva_lightning.model import lora

log = logging.getLogger(__name__)


def is_enabled(estimator: object | None, alpha: float) -> bool:
    """Whether a run has an MI penalty: an estimator is configured and alpha > 0."""
    return estimator is not None and alpha > 0


def pair_key(pair: tuple[str, str]) -> str:
    """``"helpful__harmless"``: the name of a pair's statistics network."""
    return f"{pair[0]}__{pair[1]}"


@dataclass
class PenaltyOutput:
    """One step's penalty.

    Attributes:
        total: 0-dim sum of the finite estimates (graph to the trainable vectors).
        estimates: ``"i-j"`` -> that pair's estimate, detached.
        skipped: Pairs whose estimate was not finite (left out of ``total``).
    """

    total: torch.Tensor
    estimates: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class MIPenalty(nn.Module):
    """alpha * sum_pairs MI(theta_i, theta_j), with a statistics network per pair if needed.

    Args:
        estimator: The MI estimator (copied once per pair when it has a statistics network).
        alpha: Weight of the penalty (> 0).
        pairs: Every (trainable i, other j) pair any stage penalises.
        adapters: Value -> its LoRA adapter (one per value: the penalty is between vectors).
        max_samples: Cap on activation samples per module fed to the estimator.
    """

    def __init__(
        self,
        estimator: MIEstimator,
        alpha: float,
        pairs: Iterable[tuple[str, str]],
        adapters: Mapping[str, str],
        max_samples: int = 2048,
    ) -> None:
        super().__init__()
        if not is_enabled(estimator, alpha):
            raise ValueError(f"MIPenalty needs an estimator and alpha > 0, got alpha={alpha}")
        if len(set(adapters.values())) < len(adapters):
            raise ValueError(
                f"adapters {dict(adapters)}: the MI penalty needs one adapter per value; "
                "use mi=none with a shared adapter"
            )
        self.alpha, self.max_samples = float(alpha), max_samples
        self.adapters = dict(adapters)
        self.features = estimator.features
        self.has_heads = estimator.has_head
        if self.has_heads:
            self.heads = nn.ModuleDict(
                {pair_key(p): copy.deepcopy(estimator) for p in sorted(set(pairs))}
            )
        else:
            self.estimator = estimator
        self._generator = torch.Generator().manual_seed(0)  # activation subsampling

    def check(self, policy: nn.Module) -> None:
        """Raise, before training, if the value vectors' shapes cannot work with the estimator."""
        first = next(iter(self.adapters.values()))
        template = next(iter(self.heads.values())) if self.has_heads else self.estimator
        template.check_factors(lora.lora_factors(policy, first))

    def estimator_for(self, pair: tuple[str, str]) -> MIEstimator:
        """The estimator of one pair (its own statistics network, or the shared estimator)."""
        return self.heads[pair_key(pair)] if self.has_heads else self.estimator

    def needs_inputs(self, pairs: Sequence[tuple[str, str]]) -> bool:
        """Whether the features are activations (the forward must capture LoRA inputs)."""
        return bool(pairs) and self.features == "activations"

    def head_parameters(self, pairs: Sequence[tuple[str, str]]) -> list[nn.Parameter]:
        """Parameters of the statistics networks of ``pairs`` (none without networks)."""
        if not self.has_heads:
            return []
        return [p for pair in pairs for p in self.estimator_for(pair).parameters()]

    def features_of(
        self,
        policy: nn.Module,
        pair: tuple[str, str],
        inputs: dict[str, torch.Tensor] | None,
        detach_y: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Paired features (x of vector i, y of vector j) per module."""
        fi = lora.lora_factors(policy, self.adapters[pair[0]])
        fj = lora.lora_factors(policy, self.adapters[pair[1]])
        if self.features == "activations":
            if inputs is None:
                raise RuntimeError("activation features need the inputs captured in the forward")
            return activation_features(
                inputs, fi, fj, self.max_samples, self._generator, detach_y=detach_y
            )
        return lora_features(fi, fj, self.features, detach_y=detach_y)

    def forward(
        self,
        policy: nn.Module,
        pairs: Sequence[tuple[str, str]],
        captured: Mapping[str, dict[str, torch.Tensor]],
        detach_y: bool,
        head_step: Callable[[MIEstimator, dict, dict], None] | None = None,
    ) -> PenaltyOutput:
        """sum over ``pairs`` of the MI estimate (not yet times alpha).

        Args:
            policy: The PEFT model holding the value vectors.
            pairs: The stage's (trainable i, other j) pairs.
            captured: Value -> module -> (N, d_in) hidden states of its forward (activations).
            detach_y: No gradient to vector j (sequential: j is frozen).
            head_step: Called as ``head_step(estimator, x, y)`` before each estimate of a pair
                with a statistics network (the adversary's update); None: no update.
        """
        device = next(policy.parameters()).device
        out = PenaltyOutput(total=torch.zeros((), device=device))
        for pair in pairs:
            est = self.estimator_for(pair)
            x, y = self.features_of(policy, pair, captured.get(pair[0]), detach_y)
            if est.has_head and head_step is not None:
                head_step(est, x, y)
            estimate = est(x, y)
            # a diverged estimate (inf/NaN, flagged or not) never reaches .grad: it is left out
            # and listed in skipped (the training module stops the run on it)
            if not (estimate.finite and bool(torch.isfinite(estimate.value))):
                log.warning("MI estimate for %s is not finite", pair)
                out.skipped.append(pair)
                continue
            out.total = out.total + estimate.value
            out.estimates[f"{pair[0]}-{pair[1]}"] = estimate.value.detach()
        return out


def train_head(estimator: MIEstimator, x: dict, y: dict, optimizer: torch.optim.Optimizer) -> None:
    """The adversary's update: ``estimator.head_steps`` steps maximising its bound on detached
    features (the policy does not move), gradients averaged across processes under DDP."""
    detached_x = {k: t.detach() for k, t in x.items()}
    detached_y = {k: t.detach() for k, t in y.items()}
    for _ in range(estimator.head_steps):  # the adversary catches up before the policy moves
        optimizer.zero_grad()
        loss = estimator.head_loss(detached_x, detached_y)
        loss.backward()  # plain backward: the head is not in the DDP-reduced policy graph
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in estimator.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        optimizer.step()
