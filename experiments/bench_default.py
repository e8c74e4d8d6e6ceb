"""Wall time and peak memory of the main job (the embedded default), stage by stage.

Runs ``python -m mva_lightning`` in a subprocess (cold: a fresh cache folder, so the model
conversion and the data build are included; ``--warm`` reuses the cache), then reads the run's
``timings.json`` and ``metrics.json``. The run is one ``fit``: a row per training stage, then
one for what follows training (diagnostics and sweep); the sweep's time is taken from the run's
metrics and shown on its own row.

    python experiments/bench_default.py                    # the README's numbers
    python experiments/bench_default.py --warm -- trainer.max_epochs=2   # extra overrides

Prints a table and writes ``experiments/results/bench_default.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", action="store_true", help="reuse the default cache folder")
    parser.add_argument("--out", default=str(RESULTS / "bench_default.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mva-bench-default-"))
    env = dict(os.environ)
    if not args.warm:
        env["MVA_CACHE"] = str(work / "cache")
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "mva_lightning", f"paths.output_dir={run_dir}", *args.overrides]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    total = time.perf_counter() - start

    rows = json.loads((run_dir / "timings.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n = metrics.get("pareto/num_candidates", 0.0)
    cps = metrics.get("pareto/candidates_per_s", 0.0)
    if n and cps:
        sweep = n / cps
        rows[-1] = {
            **rows[-1],
            "stage": "diagnostics, front on test, checkpoints",
            "seconds": round(rows[-1]["seconds"] - sweep, 3),
        }
        rows.append(
            {
                "stage": "sweep: candidates on val",
                "seconds": round(sweep, 3),
                "peak_rss_mb": rows[-1]["peak_rss_mb"],
            }
        )
    print(f"{'stage':<40}{'seconds':>10}{'peak RSS (MiB)':>16}")
    for r in rows:
        print(f"{r['stage']:<40}{r['seconds']:>10.1f}{r['peak_rss_mb']:>16.0f}")
    print(f"{'total (process, incl. start-up)':<40}{total:>10.1f}")
    out = {
        "cold": not args.warm,
        "overrides": args.overrides,
        "total_seconds": round(total, 1),
        "stages": rows,
        "hypervolume": metrics.get("pareto/hypervolume"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
