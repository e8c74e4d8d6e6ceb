"""Trainer callbacks: side jobs around training (no research math inside)."""

from mva_lightning.callbacks.diagnostics import InterferenceDiagnostics
from mva_lightning.callbacks.extrapolation import ExtrapolationCallback

__all__ = ["ExtrapolationCallback", "InterferenceDiagnostics"]
