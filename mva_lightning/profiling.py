"""Wall time and peak memory per stage of a run, written to ``<run>/timings.json``."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB else


class StageTimer:
    """Collects (stage, seconds, peak RSS so far) rows."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float | str]] = []
        self._open: tuple[str, float] | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as one stage."""
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def start(self, name: str) -> None:
        """Open a stage (closing the one still open, if any)."""
        self.stop()
        self._open = (name, time.perf_counter())

    def stop(self) -> None:
        """Close the open stage, if any, as one row."""
        if self._open is None:
            return
        name, start = self._open
        self._open = None
        self.rows.append(
            {
                "stage": name,
                "seconds": round(time.perf_counter() - start, 3),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        )


def fit_timer(timer: StageTimer):
    """A Lightning callback adding rows to ``timer``: each training stage of the fit, then
    everything after training (diagnostics and sweep, in ``on_fit_end``). Put it last."""
    import lightning as L

    class FitTimes(L.Callback):
        def __init__(self) -> None:
            self.stage: int | None = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if pl_module.stage != self.stage:
                self.stage = pl_module.stage
                timer.start(f"train stage{self.stage}-{'+'.join(pl_module.stage_values)}")

        def on_train_end(self, trainer, pl_module) -> None:
            timer.start("after training: diagnostics, sweep")

        def on_fit_end(self, trainer, pl_module) -> None:
            timer.stop()

    return FitTimes()
