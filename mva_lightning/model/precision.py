"""The autocast context of a Lightning ``trainer.precision``, for forwards Lightning does not wrap.

Lightning runs ``training_step`` and ``validation_step`` under its precision plugin, but the
reference pass before a stage, MODPO's margins and the Pareto sweep run in hooks and commands of
their own. They enter :func:`autocast` with the run's precision, so that under ``bf16-mixed`` the
reference log-probs are computed as the policy's are (on a batch of the same shape they equal the
step-0 policy's; bf16 rounding depends on the padded shape) and the reference pass, the sweep's
forwards and its generation get the same speed-up as training (on GPUs, and on CPUs with native
bf16 such as AMX). Reward models and other scorers are judges, not the policy: they run
outside it (:func:`full_precision`), so a score does not depend on the policy's precision.
"""

from __future__ import annotations

import contextlib

import torch

MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(
    precision: str | int | None, device_type: str = "cpu"
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a mixed ``precision`` (``bf16-mixed``, ``16-mixed``), else a no-op.

    Args:
        precision: Lightning's precision setting (``32-true``, ``bf16-mixed``, ...; None: full).
        device_type: ``cpu`` or ``cuda``: where the forwards run.
    """
    dtype = MIXED.get(str(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def device_type(model: torch.nn.Module) -> str:
    """``cpu`` or ``cuda``: where ``model``'s parameters live (the autocast device type)."""
    return next(model.parameters()).device.type


def full_precision(device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """Leave any autocast for the block (a scorer judging in its own precision)."""
    return torch.autocast(device_type, enabled=False)


def autocast_setting(device_type: str = "cpu") -> str | None:
    """The autocast dtype in force for ``device_type`` (e.g. ``"torch.bfloat16"``), else None;
    part of score-cache keys, since mixed-precision scores differ from fp32 ones by rounding."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return str(torch.get_autocast_dtype(device_type))
