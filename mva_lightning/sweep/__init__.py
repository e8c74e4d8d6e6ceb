"""The extrapolation sweep: candidates, objectives, scoring loop, Pareto front and manifest.

:class:`ExtrapolationCallback` runs it once at the end of fit; ``python -m mva_lightning.sweep``
reruns it over a finished run.
"""

from mva_lightning.sweep.callback import ExtrapolationCallback

__all__ = ["ExtrapolationCallback"]
