"""No penalty: alpha = 0 (the "w/o decorrelation" ablation; SOUP with convex weights)."""

from __future__ import annotations

import torch

from mva_lightning.mi.base import MIEstimate, MIEstimator, check_pairs


class NoMI(MIEstimator):
    """Returns a constant 0 (no gradient to anything).

    Args:
        features: Accepted for config symmetry; unused.
    """

    def forward(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> MIEstimate:
        """A 0-dim zero on the features' device."""
        check_pairs(x, y)
        device = next(iter(x.values())).device if x else None
        return MIEstimate(value=torch.zeros((), device=device))
