"""Interference between value vectors after training: cosine of delta W and MINE estimates.

:mod:`~mva_lightning.diagnostics.interference` computes; :class:`InterferenceDiagnostics` (a
Lightning callback) runs it once at the end of fit and writes and logs the results.
"""

from mva_lightning.diagnostics.callback import InterferenceDiagnostics

__all__ = ["InterferenceDiagnostics"]
