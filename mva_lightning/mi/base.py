"""The interface every mutual-information penalty implements.

A penalty compares two value vectors i (trainable) and j through paired features, one tensor
per adapted module: ``x[m]`` of shape (n_m, d_x) for value i and ``y[m]`` of shape (n_m, d_y)
for value j, row k of ``x[m]`` paired with row k of ``y[m]``. Which features (LoRA A rows or
per-token projections A h) is chosen by the estimator's ``features`` attribute and extracted
by :mod:`mva_lightning.mi.features`. There is no delta W variant: delta W = s B A is 0 at
initialisation (B = 0), so a dependence measure on it, and its gradient, would be 0 until
training had moved B.

A new estimator is one file in this package plus one config in ``conf/mi/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mva_lightning.model.lora import LoraFactors

FEATURES = ("lora_a", "activations")


@dataclass
class MIEstimate:
    """What an estimator returns.

    Attributes:
        value: Scalar penalty/estimate to minimise w.r.t. the value vectors (grad flows to x).
        finite: False when the raw estimate was inf/NaN and ``value`` was replaced by 0.
    """

    value: torch.Tensor
    finite: bool = True


class MIEstimator(nn.Module):
    """Base class: ``forward(x, y)`` -> :class:`MIEstimate` summed or pooled over modules.

    Estimators with a statistics network (MINE) override :meth:`head_loss`; the LightningModule
    minimises it with the head's own optimizer, on detached features.

    Args:
        features: ``lora_a`` | ``activations``.
    """

    features: str = "lora_a"
    head_steps: int = 1  # head updates per training step (estimators with a network)

    def __init__(self, features: str = "lora_a") -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"mi.estimator.features: expected one of {FEATURES}, got {features!r}")
        self.features = features

    @property
    def has_head(self) -> bool:
        """True when the estimator has parameters of its own to train (a statistics network)."""
        return any(True for _ in self.parameters())

    def forward(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> MIEstimate:
        raise NotImplementedError

    def head_loss(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss for the estimator's own parameters (none by default)."""
        raise NotImplementedError(f"{type(self).__name__} has no statistics network")

    def check_factors(self, factors: Mapping[str, LoraFactors]) -> None:
        """Raise a clear error, before training, if the value vectors' shapes cannot work.

        Called once by the LightningModule with one value's factors (module -> A, B); the
        default accepts everything. Estimators with fixed input widths (MINE) override it.
        """


def check_pairs(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    """Raise a clear error unless x and y hold paired samples for the same modules."""
    if x.keys() != y.keys():
        raise ValueError(f"MI features cover different modules: {sorted(x)} vs {sorted(y)}")
    for m in x:
        if x[m].shape[0] != y[m].shape[0]:
            raise ValueError(
                f"MI features at {m}: {x[m].shape[0]} vs {y[m].shape[0]} samples; expected pairs"
            )
