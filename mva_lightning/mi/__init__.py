"""Mutual-information penalties between value vectors (docs/method.md §4).

Each estimator maps paired features ``x[m]``, ``y[m]`` (one tensor per adapted module, built by
:func:`lora_features` or :func:`activation_features`) to an :class:`MIEstimate`. "No penalty"
is no estimator at all (``mi=none``), see :mod:`mva_lightning.training.mi_penalty`.
"""

from mva_lightning.mi.base import FEATURES, MIEstimate, MIEstimator, check_pairs
from mva_lightning.mi.features import activation_features, lora_features
from mva_lightning.mi.hsic import HSIC, hsic, median_sigma, rbf_kernel
from mva_lightning.mi.mine import MINE, dv_bound, estimate_mi
from mva_lightning.mi.orthogonal import Orthogonal

__all__ = [
    "FEATURES",
    "HSIC",
    "MINE",
    "MIEstimate",
    "MIEstimator",
    "Orthogonal",
    "activation_features",
    "check_pairs",
    "dv_bound",
    "estimate_mi",
    "hsic",
    "lora_features",
    "median_sigma",
    "rbf_kernel",
]
