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

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as one stage."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.rows.append(
                {
                    "stage": name,
                    "seconds": round(time.perf_counter() - start, 3),
                    "peak_rss_mb": round(peak_rss_mb(), 1),
                }
            )
