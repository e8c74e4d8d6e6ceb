"""How cost grows: number of values K, candidate grid size, number of pairs (tiny model).

Each point runs in its own child process (peak RSS per point). Three sweeps:

- ``values``: K = 1..4 value vectors trained by the sequential schedule (one stage per value,
  no penalty), the same pairs per value. Expected: fit time linear in K.
- ``values_hsic``: the same with the HSIC penalty (K >= 2). Stage k also estimates HSIC against
  each of the k - 1 earlier vectors, so the penalty's share grows with the K (K - 1) / 2 pairs:
  above linear by that term (the table's expected ratio stays K).
- ``pairs``: one value, 32 / 64 / 128 training pairs. Expected: fit time linear in pairs.
- ``candidates``: the extrapolation sweep (:func:`mva_lightning.sweep.sweep.extrapolate`,
  implicit-reward objective on held-out pairs) over grids of 9 / 25 / 100 preference vectors
  for K = 2. Expected: linear in candidates (+1: the base, w = 0, is always scored).

The table gives, per point, the measured time, its ratio to the sweep's first point, the
expected ratio and the time per unit (per stage, pair or candidate; flat when cost is linear,
and robuster than the ratios, which inherit the first point's noise). Times are the work
itself (``fit_s``: the run's one ``trainer.fit``, every stage; ``sweep_s``: the scoring loop),
not process start-up or model loading, reported apart.

Usage::

    python experiments/bench_scaling.py               # all three sweeps
    python experiments/bench_scaling.py --quick       # smoke size (tests)

Writes ``experiments/results/bench_scaling.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()

import _bench_utils as bu  # noqa: E402  (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "bench_scaling.json"

FULL = {
    "values": [1, 2, 3, 4],
    "values_hsic": [1, 2, 3, 4],
    "pairs": [32, 64, 128],
    "candidates": [3, 5, 10],  # grid points per axis: 9, 25, 100 candidates for K = 2
    "pairs_per_value": 256,  # stages of a few seconds: sub-second ones vary by 40 %
    "val_pairs": 32,
    "batch": 4,
    "max_length": 96,
    "max_prompt_length": 48,
}
QUICK = {
    "values": [1, 2],
    "values_hsic": [2],
    "pairs": [4, 8],
    "candidates": [2, 3],
    "pairs_per_value": 4,
    "val_pairs": 2,
    "batch": 2,
    "max_length": 48,
    "max_prompt_length": 24,
}
NAMES = ["v1", "v2", "v3", "v4"]


# --------------------------------------------------------------------------- data
def write_value_file(path: Path, n: int, tag: str) -> Path:
    """``n`` toy pairs (prompt / chosen / rejected JSONL) of lengths that vary with the row."""
    with path.open("w") as fh:
        for i in range(n):
            more = " and more" * (i % 5)
            prompt = f"\n\nHuman: Question {i} about {tag}{more}\n\nAssistant:"
            chosen = f" A careful answer {i} on {tag}." + " Details follow." * (i % 3)
            fh.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": " No."}) + "\n")
    return path


def overrides(spec: dict, files: list[str]) -> list[str]:
    """Config overrides for K = len(files) values named v1..vK from JSONL files."""
    out = [
        "value=custom",
        f"value.custom.source.files=[{files[0]}]",
        "model=tiny",
        "data=paper",
        "data.loader.chat_template=false",
        "logger=csv",
        "callbacks=none",
        "extrapolation=none",
        "mi=hsic" if spec.get("penalty") and len(files) > 1 else "mi=none",
        f"paths.output_dir={spec['tmp']}/run",
        "data.split.test=0",
        f"data.split.val={spec.get('val_fraction', 0)}",
        f"data.loader.batch_size={spec['batch']}",
        f"data.loader.max_length={spec['max_length']}",
        f"data.loader.max_prompt_length={spec['max_prompt_length']}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "+callbacks.timer._target_=_bench_utils.FitTimer",
    ]
    for name, f in zip(NAMES[1:], files[1:], strict=False):
        out += [
            f"+value.{name}.source._target_=mva_lightning.data.sources.jsonl_pairs",
            f"+value.{name}.source.files=[{f}]",
        ]
    return out


# --------------------------------------------------------------------------- children
def child_train(spec: dict) -> dict:
    """``train(cfg)`` with K values; the fit time of every stage, summed."""
    from hydra import compose, initialize_config_dir

    from mva_lightning.train import train

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(spec, spec["files"]))
    start = time.perf_counter()
    train(cfg)
    timer = bu.FitTimer.last
    return {
        "fit_s": sum(timer.seconds),
        "stage_s": timer.seconds,
        "steps": timer.steps,
        "train_call_s": time.perf_counter() - start,
    }


def child_sweep(spec: dict) -> dict:
    """The extrapolation sweep over an S x S grid for K = 2 (value vectors set at random)."""
    import torch
    from hydra import compose, initialize_config_dir

    from mva_lightning.assembly import build, load_value_splits
    from mva_lightning.sweep.objectives import ImplicitReward
    from mva_lightning.sweep.sweep import extrapolate

    spec = {**spec, "val_fraction": 0.5}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(spec, spec["files"]))
    splits = load_value_splits(cfg)
    _, module, datamodule = build(cfg, splits)
    policy = module.policy
    with torch.no_grad():  # trained-looking vectors: B != 0 (the cost does not depend on it)
        gen = torch.Generator().manual_seed(0)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    s = spec["grid"]
    grid = [round(0.1 + i * (1.0 / max(s - 1, 1)), 6) for i in range(s)]
    result = extrapolate(
        policy,
        datamodule,
        list(cfg.value.keys()),
        {"mode": "grid", "values": grid},
        ImplicitReward(beta=0.1, split="val"),
        out_dir=Path(spec["tmp"]) / "extrapolation",
        progress=False,
    )
    return {
        "sweep_s": result.seconds,
        "candidates": len(result.weights),
        "scored": result.scored,
        "val_pairs_per_value": len(splits["custom"].val),
    }


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t_ready = time.perf_counter()
    result = child_sweep(spec) if spec["sweep"] == "candidates" else child_train(spec)
    result.update(sweep=spec["sweep"], x=spec["x"], start_to_ready_s=t_ready - T_START)
    bu.emit(result)


# --------------------------------------------------------------------------- parent
def points(size: dict, tmp: Path) -> list[dict]:
    """One child spec per point, with its data files."""
    base = {k: size[k] for k in ("batch", "max_length", "max_prompt_length")}
    specs = []
    for sweep in ("values", "values_hsic"):
        for k in size[sweep]:
            files = [
                str(write_value_file(tmp / f"v{j}_{k}.jsonl", size["pairs_per_value"], f"v{j}"))
                for j in range(k)
            ]
            point = {"sweep": sweep, "x": k, "files": files, "expected": k}
            specs.append({**base, **point, "penalty": sweep == "values_hsic"})
    for n in size["pairs"]:
        files = [str(write_value_file(tmp / f"pairs_{n}.jsonl", n, "v0"))]
        specs.append({**base, "sweep": "pairs", "x": n, "files": files, "expected": n})
    for s in size["candidates"]:
        n_val = 2 * size["val_pairs"]  # half of them become validation pairs
        files = [str(write_value_file(tmp / f"grid_{j}.jsonl", n_val, f"g{j}")) for j in (0, 1)]
        specs.append(
            {**base, "sweep": "candidates", "x": s * s, "grid": s, "files": files}
            | {"expected": s * s + 1}
        )
    return specs


def add_ratios(rows: list[dict]) -> None:
    """Measured time / first point's time, next to the expected ratio, per sweep."""
    for sweep in ("values", "values_hsic", "pairs", "candidates"):
        group = [r for r in rows if r["sweep"] == sweep]
        if not group:
            continue
        key = "sweep_s" if sweep == "candidates" else "fit_s"
        first = group[0]
        for r in group:
            r["time_s"] = r[key]
            r["measured_ratio"] = r[key] / first[key]
            r["expected_ratio"] = r["expected"] / first["expected"]
            r["ratio_of_ratios"] = r["measured_ratio"] / r["expected_ratio"]
            r["time_per_unit_s"] = r[key] / r["expected"]  # per stage, pair or candidate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--sweeps", default="values,values_hsic,pairs,candidates")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per child (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}

    from mva_lightning.io import write_json

    size = QUICK if args.quick else FULL
    sweeps = set(args.sweeps.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in points(size, Path(tmp)):
            if spec["sweep"] not in sweeps:
                continue
            spec.update(tmp=tempfile.mkdtemp(dir=tmp), threads=args.threads)
            load = bu.load_average()
            r = bu.run_child(Path(__file__), spec)
            r.update(expected=spec["expected"], load_before=load)
            rows.append(r)
            t = r.get("fit_s", r.get("sweep_s"))
            print(
                f"{r['sweep']:<10} x={r['x']:<4} {t:8.2f} s  rss {r['peak_rss_mib']:.0f} MiB "
                f"(load {load:.1f})",
                flush=True,
            )
    add_ratios(rows)
    cols = [
        "sweep",
        "x",
        "time_s",
        "measured_ratio",
        "expected_ratio",
        "ratio_of_ratios",
        "time_per_unit_s",
        "peak_rss_mib",
        "process_wall_s",
    ]
    print()
    print(bu.table(rows, cols))
    report = {
        "machine": bu.machine(),
        "command": "python experiments/bench_scaling.py " + " ".join(sys.argv[1:]),
        "size": size,
        "notes": {
            "values": "sequential schedule, one stage per value, fit_s = the one fit of all stages",
            "values_hsic": "the same with HSIC (K >= 2): stage k pays k - 1 estimates",
            "pairs": "one value, fit_s of its single stage",
            "candidates": "extrapolate() over an S x S grid (K = 2); sweep_s = scoring loop, "
            "base w = 0 included (expected ratio uses S^2 + 1)",
        },
        "rows": rows,
    }
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
