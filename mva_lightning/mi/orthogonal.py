"""Orthogonality penalty (the paper's ablation): sum over modules of ||A_i A_j^T||_F^2."""

from __future__ import annotations

import torch

from mva_lightning.mi.base import MIEstimate, MIEstimator, check_pairs


class Orthogonal(MIEstimator):
    """Squared overlap between the two values' features, summed over modules.

    With ``features="lora_a"`` (x[m] = A_i, y[m] = A_j, both (r, d_in)) this is the paper's
    ||A_i A_j^T||_F^2: zero iff every row of A_i is orthogonal to every row of A_j.

    With ``activations`` the rows (tokens) are samples and the penalty is the squared norm
    of the uncentred cross-moment ||x^T y||_F^2 / n^2 = ||(1/n) sum_k x_k y_k^T||_F^2, which is
    zero iff every coordinate of x is uncorrelated (in the second-moment sense) with every
    coordinate of y. The 1/n^2 keeps it on one scale whatever the number of tokens.

    Args:
        features: ``lora_a`` | ``activations``.
    """

    def forward(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> MIEstimate:
        """Penalty summed over modules; gradient flows to x."""
        check_pairs(x, y)
        if not x:
            raise ValueError("Orthogonal: no modules given")
        total = sum(self._module_penalty(x[m], y[m], m) for m in x)
        return MIEstimate(value=total)

    def _module_penalty(self, x: torch.Tensor, y: torch.Tensor, m: str) -> torch.Tensor:
        if self.features == "lora_a":
            if x.shape[1] != y.shape[1]:
                raise ValueError(f"Orthogonal at {m}: A_i {tuple(x.shape)} vs A_j {tuple(y.shape)}")
            return (x @ y.T).pow(2).sum()  # ||A_i A_j^T||_F^2, (r, d_in) @ (d_in, r) -> (r, r)
        n = x.shape[0]
        return (x.T @ y).pow(2).sum() / n**2  # ||x^T y||_F^2 / n^2, (d_x, n) @ (n, d_y)

    def extra_repr(self) -> str:
        return f"features={self.features!r}"
