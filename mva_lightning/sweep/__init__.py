"""The extrapolation sweep: candidates, objectives, scoring loop, Pareto front and manifest.

:class:`ExtrapolationCallback` runs it once at the end of fit; ``python -m mva_lightning.sweep``
(:mod:`mva_lightning.sweep.cli`) reruns it over a finished run.
"""

__all__ = ["ExtrapolationCallback"]


def __getattr__(name: str):
    # Lazy: the command's config and argument errors come before lightning and torch load.
    if name == "ExtrapolationCallback":
        from mva_lightning.sweep.callback import ExtrapolationCallback

        return ExtrapolationCallback
    raise AttributeError(f"module 'mva_lightning.sweep' has no attribute {name!r}")
