"""Helpers shared by the benchmarks: one child process per measured point, timing, tables.

Every measured point runs in its own child process (``python <script> --child '<json>'``) so that
its peak resident memory (``ru_maxrss``) belongs to that point alone; the child prints one JSON
line that starts with :data:`RESULT_TAG`, which the parent reads back.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_TAG = "BENCH_RESULT "
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "TRANSFORMERS_VERBOSITY": "error",
}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> float:
    """One-minute load average (the machine is shared: a high value means noisy timings)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def emit(result: dict[str, Any]) -> None:
    """Child side: print the result line the parent parses (peak RSS added here, at the end)."""
    result = {**result, "peak_rss_mib": round(peak_rss_mib(), 1)}
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(script: str | Path, spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``script --child <spec>`` in a fresh interpreter and return its result dict.

    Raises:
        RuntimeError: The child failed, printed no result or ran past ``timeout``; the message
            holds its output tail.
    """
    return run_children(script, [spec], timeout)[0]


def run_children(
    script: str | Path, specs: Sequence[dict[str, Any]], timeout: float = 3600
) -> list[dict[str, Any]]:
    """Run ``script --child <spec>`` for every spec at once (e.g. the ranks of one process group).

    Each result gets ``process_wall_s``, from the common start to that child's exit. When a child
    fails, the others are stopped: no rank is left waiting for a peer that is gone.

    Returns:
        Every child's result dict, in ``specs`` order.

    Raises:
        RuntimeError: A child failed, printed no result or ran past ``timeout``; the message holds
            its output tail.
    """
    env = {**os.environ, **CHILD_ENV}
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2 * len(specs))]
        logs = list(zip(files[::2], files[1::2], strict=True))  # (stdout, stderr) per child
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), "--child", json.dumps(spec)],
                stdout=out,
                stderr=err,
                text=True,
                env=env,
            )
            for spec, (out, err) in zip(specs, logs, strict=True)
        ]
        walls: list[float | None] = [None] * len(procs)  # None: still running, or stopped here
        try:
            while None in walls:
                for i, proc in enumerate(procs):
                    if walls[i] is None and proc.poll() is not None:
                        walls[i] = time.perf_counter() - start
                if any(p.returncode for p in procs) or time.perf_counter() - start > timeout:
                    break
                time.sleep(0.05)
        finally:  # stop what still runs: the peers of a failed child, a timeout, an interrupt
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        texts = []
        for out, err in logs:
            out.seek(0)
            err.seek(0)
            texts.append((out.read(), err.read()))
    results = [
        [json.loads(ln[len(RESULT_TAG) :]) for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
        for out, _ in texts
    ]
    failed = [
        i for i, p in enumerate(procs) if walls[i] is None or p.returncode != 0 or not results[i]
    ]
    if failed:  # the child that failed on its own, not one stopped because of it
        i = next((i for i in failed if walls[i] is not None), failed[0])
        why = f"rc {procs[i].returncode}" if walls[i] is not None else f"stopped after {timeout} s"
        tail = "".join(texts[i])[-4000:]
        name = specs[i].get("name") or specs[i].get("sweep")
        rank = f" rank {specs[i]['rank']}" if "rank" in specs[i] else ""
        raise RuntimeError(f"child {name}{rank} failed ({why}):\n{tail}")
    return [{**r[-1], "process_wall_s": round(w, 2)} for r, w in zip(results, walls, strict=True)]


class StepClock:
    """Wall-clock marks at the start and end of each optimizer step.

    Throughput excludes the first ``warmup`` steps: it is measured from the end of the last
    warm-up step to the end of the last step, so data loading and per-step framework overhead
    between steps count, and one-off set-up does not.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.cpu_ends: list[float] = []

    def start(self) -> None:
        self.starts.append(time.perf_counter())

    def end(self, response_tokens: int, loss: float) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.tokens.append(int(response_tokens))
        self.losses.append(float(loss))

    def summary(self, t_ready: float) -> dict[str, Any]:
        """Steps/s, response tokens/s, set-up time (``t_ready`` to the first step), losses."""
        n, w = len(self.ends), self.warmup
        if w < 1 or n <= w:
            raise RuntimeError(f"ran {n} steps with warmup={w}: need 1 <= warmup < steps")
        span, timed = self.ends[-1] - self.ends[w - 1], n - w
        durations = [b - a for a, b in zip(self.ends[w - 1 : -1], self.ends[w:], strict=True)]
        return {
            "steps": n,
            "timed_steps": timed,
            "steps_per_s": timed / span,
            "s_per_step": span / timed,
            "response_tokens_per_s": sum(self.tokens[w:]) / span,
            # CPU seconds of all this process's threads per step: less sensitive to other
            # processes on a shared machine than wall time (but counts threads' spin-waits).
            "cpu_s_per_step": (self.cpu_ends[-1] - self.cpu_ends[w - 1]) / timed,
            # Per-step wall times (end to end, from the previous step's end): on a shared machine
            # the minimum is the least disturbed estimate, the median the typical one.
            "step_s_min": min(durations),
            "step_s_median": median(durations),
            "setup_s": self.starts[0] - t_ready,
            "first_loss": self.losses[0],
            "last_loss": self.losses[-1],
        }


def _lightning_callback_base():
    try:
        import lightning as L
    except ImportError:  # the TRL side never needs it
        return object
    return L.Callback


class LightningClock(_lightning_callback_base()):
    """Lightning callback: a :class:`StepClock` over training batches, plus side measurements.

    The last instance is kept in ``LightningClock.last`` (``train(cfg)`` builds it from config).
    After training it records the LoRA A checksum at the start (same seeded init as TRL?) and
    the cost of one ``lora.set_weights`` call, which the module makes before every forward.
    """

    last: LightningClock | None = None

    def __init__(self, warmup: int = 1) -> None:
        self.clock = StepClock(warmup)
        self.extra: dict[str, Any] = {}
        LightningClock.last = self

    def on_train_start(self, trainer, pl_module) -> None:
        policy = pl_module.policy
        self.extra["lora_a_checksum"] = float(
            sum(p.double().sum() for n, p in policy.named_parameters() if "lora_A" in n)
        )
        self.extra["lora_b_zero_init"] = all(
            bool((p == 0).all()) for n, p in policy.named_parameters() if "lora_B" in n
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        tokens = sum(int(b["response_tokens"]) for b in batch.values())
        self.clock.end(tokens, float(loss))

    def on_train_end(self, trainer, pl_module) -> None:
        from mva_lightning.model import lora

        value = pl_module.stage_values[0]
        n = 20
        start = time.perf_counter()
        for i in range(n):
            lora.set_weights(pl_module.policy, {value: 1.0 + (i % 2)})
        self.extra["set_weights_ms"] = 1e3 * (time.perf_counter() - start) / n
        self.extra["lora_layers"] = len(lora.lora_layers(pl_module.policy))


class FitTimer(_lightning_callback_base()):
    """Lightning callback: wall seconds and steps of each ``trainer.fit`` (one per run: every
    stage, the diagnostics and the sweep).

    Instances share the class-level lists of the last-created run (``FitTimer.last``).
    """

    last: FitTimer | None = None

    def __init__(self) -> None:
        if FitTimer.last is None:
            FitTimer.last = self
        self.run = FitTimer.last
        if self.run is self:
            self.seconds: list[float] = []
            self.steps: list[int] = []
        self._start = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.run.seconds.append(time.perf_counter() - self._start)
        self.run.steps.append(int(trainer.global_step))


def median(xs: Sequence[float]) -> float:
    """Median, NaN for an empty list."""
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        **processor(),
        "load_average_1min": load_average(),
    }


def processor() -> dict[str, Any]:
    """The CPU's model name and its native bf16 instructions (bf16 speed depends on them)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return {"processor": platform.processor() or None, "native_bf16": None}
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
        [],
    )
    return {"processor": name, "native_bf16": sorted({"amx_bf16", "avx512_bf16"} & set(flags))}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of the given columns (floats to 3 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
