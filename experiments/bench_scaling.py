"""How cost grows: number of values K, candidate grid size, number of pairs (tiny model).

Each point runs in its own child process (peak RSS per point; one per rank for
``sweep_processes``). Five sweeps:

- ``values``: K = 1..4 value vectors trained by the sequential schedule (one stage per value,
  no penalty), the same pairs per value. Expected: fit time linear in K.
- ``values_hsic``: the same with the HSIC penalty (K >= 2). Stage k also estimates HSIC against
  each of the k - 1 earlier vectors, so the penalty's share grows with the K (K - 1) / 2 pairs:
  above linear by that term (the table's expected ratio stays K).
- ``pairs``: one value, 32 / 64 / 128 training pairs. Expected: fit time linear in pairs.
- ``candidates``: the extrapolation sweep (:func:`mva_lightning.sweep.sweep.extrapolate`,
  implicit-reward objective on held-out pairs) over grids of 9 / 25 / 100 preference vectors
  for K = 2. Expected: linear in candidates (+1: the base, w = 0, is always scored).
- ``sweep_processes``: the same sweep of one fixed set of value vectors (K = 2, a 10 x 10 grid:
  100 candidates and the base) on 1 and on 2 processes, one torch thread each. The 2 processes
  are ranks of a ``torch.distributed`` gloo group on this machine (launched by the benchmark),
  each scoring its share of the candidates (``extrapolate(..., shard=Shard(rank, 2, gather))``,
  the gather of the sweep callback under ``trainer=ddp``). Timed on rank 0 after a barrier, up to
  the all-gather that ends the scoring. Expected: candidates/s about twice the 1-process rate on
  a quiet machine with 2 free cores (somewhat less: every rank computes the reference
  log-probs, and rank 0 scores ceil(101 / 2) = 51), less when the cores are shared. The
  benchmark checks that the 2-process manifest has the 1-process scores and front (up to float
  rounding): ``same_front`` and ``max_abs_score_diff``.

The table gives, per point, the measured time, its ratio to the sweep's first point, the
expected ratio and the time per unit (per stage, pair or candidate; flat when cost is linear,
and robuster than the ratios, which inherit the first point's noise). Times are the work
itself (``fit_s``: the run's one ``trainer.fit``, every stage; ``sweep_s``: the scoring loop),
not process start-up or model loading, reported apart. A second table gives ``sweep_processes``:
candidates, processes, seconds, candidates/s, the speed-up over 1 process and the check.

Usage::

    python experiments/bench_scaling.py               # all five sweeps
    python experiments/bench_scaling.py --quick       # smoke size (tests)
    python experiments/bench_scaling.py --sweeps sweep_processes   # 1 vs 2 processes alone

Writes ``experiments/results/bench_scaling.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
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
    "sweep_processes": [1, 2],  # processes sweeping together
    "process_grid": 10,  # grid points per axis of that sweep: 100 candidates
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
    "sweep_processes": [1, 2],
    "process_grid": 2,
    "pairs_per_value": 4,
    "val_pairs": 2,
    "batch": 2,
    "max_length": 48,
    "max_prompt_length": 24,
}
NAMES = ["v1", "v2", "v3", "v4"]
SCORING = ("candidates", "sweep_processes")  # sweeps of the extrapolation scoring, not training
SWEEPS = ("values", "values_hsic", "pairs", *SCORING)
SCORE_TOL = {"rel_tol": 1e-5, "abs_tol": 1e-6}  # float rounding: batches of other candidates
PROCESS_COLUMNS = [
    "sweep",
    "processes",
    "candidates",
    "scored",
    "sweep_s",
    "candidates_per_s",
    "speedup",
    "same_front",
    "max_abs_score_diff",
]


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


def join_group(spec: dict):
    """This process's :class:`~mva_lightning.sweep.sweep.Shard` of the sweep.

    Alone unless ``spec["world_size"]`` > 1: then rank ``spec["rank"]`` of a gloo group on this
    machine (``spec["port"]``), gathering with ``all_gather_object`` as the sweep callback does
    under DDP.
    """
    import torch.distributed as dist

    from mva_lightning.sweep.callback import _all_gather_objects
    from mva_lightning.sweep.sweep import Shard

    world_size = spec.get("world_size", 1)
    if world_size == 1:
        return Shard()
    rank = spec["rank"]
    init = f"tcp://127.0.0.1:{spec['port']}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    return Shard(rank, world_size, _all_gather_objects)


def child_sweep(spec: dict) -> dict:
    """The extrapolation sweep over an S x S grid for K = 2 (value vectors set at random, the
    same in every process), alone or as one rank of several (:func:`join_group`).

    Returns:
        Rank 0's timings and counts (``sweep_s``: the scoring loop, after a barrier; ``call_s``:
        the whole call, selection and writing included, to a barrier after it); on another rank,
        just its rank.
    """
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from mva_lightning.assembly import build, load_value_splits
    from mva_lightning.sweep.objectives import ImplicitReward
    from mva_lightning.sweep.sweep import extrapolate

    shard = join_group(spec)
    barrier = dist.barrier if shard.world_size > 1 else lambda: None
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
    barrier()  # every rank starts scoring together; the scoring ends in an all-gather
    start = time.perf_counter()
    result = extrapolate(
        policy,
        datamodule,
        list(cfg.value.keys()),
        {"mode": "grid", "values": grid},
        ImplicitReward(beta=0.1, split="val"),
        out_dir=Path(spec["tmp"]) / "extrapolation",
        progress=False,
        shard=shard,
    )
    barrier()
    call_s = time.perf_counter() - start
    if shard.world_size > 1:
        dist.destroy_process_group()
    if result is None:  # not rank 0: it scored and cached its share, and writes nothing
        return {"rank": shard.rank}
    return {
        "sweep_s": result.seconds,
        "call_s": call_s,
        "candidates": len(result.weights),
        "processes": shard.world_size,
        "scored": result.scored,
        "candidates_per_s": result.candidates_per_s,
        "val_pairs_per_value": len(splits["custom"].val),
    }


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t_ready = time.perf_counter()
    result = child_sweep(spec) if spec["sweep"] in SCORING else child_train(spec)
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
    n_val = 2 * size["val_pairs"]  # half of them become validation pairs
    files = [str(write_value_file(tmp / f"grid_{j}.jsonl", n_val, f"g{j}")) for j in (0, 1)]
    for s in size["candidates"]:
        specs.append(
            {**base, "sweep": "candidates", "x": s * s, "grid": s, "files": files}
            | {"expected": s * s + 1}
        )
    s = size["process_grid"]
    for n in size["sweep_processes"]:
        point = {"sweep": "sweep_processes", "x": n, "processes": n, "grid": s, "threads": 1}
        # expected: the busiest rank's candidates (the base included)
        specs.append({**base, **point, "files": files, "expected": math.ceil((s * s + 1) / n)})
    return specs


def free_port() -> int:
    """A TCP port of this machine that is free now (a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_point(spec: dict) -> dict:
    """One point: its child process, or ``spec["processes"]`` of them, the ranks of one group.

    Returns:
        The child's result (rank 0's), with the largest peak RSS of any rank (per process).
    """
    if "processes" not in spec:
        return bu.run_child(Path(__file__), spec)
    world = {"world_size": spec["processes"], "port": free_port()}
    ranks = [{**spec, **world, "rank": r} for r in range(spec["processes"])]
    results = bu.run_children(Path(__file__), ranks)
    return {**results[0], "peak_rss_mib": max(r["peak_rss_mib"] for r in results)}


def add_ratios(rows: list[dict]) -> None:
    """Measured time / first point's time, next to the expected ratio, per sweep."""
    for sweep in SWEEPS:
        group = [r for r in rows if r["sweep"] == sweep]
        if not group:
            continue
        key = "sweep_s" if sweep in SCORING else "fit_s"
        first = group[0]
        for r in group:
            r["time_s"] = r[key]
            r["measured_ratio"] = r[key] / first[key]
            r["expected_ratio"] = r["expected"] / first["expected"]
            r["ratio_of_ratios"] = r["measured_ratio"] / r["expected_ratio"]
            # per stage, pair or candidate (of the busiest rank)
            r["time_per_unit_s"] = r[key] / r["expected"]


def same_front(one, other) -> dict:
    """Whether two sweeps' manifests (:class:`ExtrapolationResult`) have the same candidates,
    value vectors and data (fingerprint), scores up to float rounding and Pareto front.

    Returns:
        ``same_front`` and ``max_abs_score_diff`` (over every score of every candidate and the
        base; None when the candidates differ).
    """
    if one.weights != other.weights:
        return {"same_front": False, "max_abs_score_diff": None}
    pairs = [
        (x, b.get(k, math.nan))
        for a, b in zip(
            [one.base_scores, *one.scores], [other.base_scores, *other.scores], strict=True
        )
        for k, x in a.items()
        if isinstance(x, float)
    ]
    close = all(math.isclose(x, y, **SCORE_TOL) for x, y in pairs)
    same = close and one.on_front == other.on_front and one.fingerprint == other.fingerprint
    return {"same_front": same, "max_abs_score_diff": max(abs(x - y) for x, y in pairs)}


def compare_processes(rows: list[dict], manifests: dict[int, Path]) -> dict | None:
    """``sweep_processes``: each point against the 1-process one, added to its row.

    Args:
        rows: Every row; the ``sweep_processes`` ones get ``speedup`` (their candidates/s over
            the 1-process rate), ``same_front`` and ``max_abs_score_diff``.
        manifests: Per number of processes, the folder of that sweep's ``pareto.json``.

    Returns:
        Per number of processes, those columns with candidates, seconds and candidates/s; None
        without a 1-process point.
    """
    from mva_lightning.sweep.manifest import read_manifest

    group = {r["processes"]: r for r in rows if r["sweep"] == "sweep_processes"}
    if 1 not in group:
        return None
    one = read_manifest(manifests[1])
    for n, r in group.items():
        r["speedup"] = r["candidates_per_s"] / group[1]["candidates_per_s"]
        r.update(same_front(one, read_manifest(manifests[n])))
    return {str(n): {k: r[k] for k in PROCESS_COLUMNS[1:]} for n, r in group.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--sweeps", default=",".join(SWEEPS))
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per child (0: torch's default; sweep_processes: always 1)",
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
    manifests: dict[int, Path] = {}  # sweep_processes: processes -> the sweep's folder
    with tempfile.TemporaryDirectory() as tmp:
        for spec in points(size, Path(tmp)):
            if spec["sweep"] not in sweeps:
                continue
            spec = {"threads": args.threads, **spec, "tmp": tempfile.mkdtemp(dir=tmp)}
            load = bu.load_average()
            r = run_point(spec)
            r.update(expected=spec["expected"], load_before=load)
            rows.append(r)
            if "processes" in spec:
                manifests[spec["processes"]] = Path(spec["tmp"]) / "extrapolation"
            t = r.get("fit_s", r.get("sweep_s"))
            print(
                f"{r['sweep']:<15} x={r['x']:<4} {t:8.2f} s  rss {r['peak_rss_mib']:.0f} MiB "
                f"(load {load:.1f})",
                flush=True,
            )
        processes = compare_processes(rows, manifests)  # reads the manifests: before cleanup
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
    if processes:
        print()
        print(bu.table([r for r in rows if r["sweep"] == "sweep_processes"], PROCESS_COLUMNS))
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
            "sweep_processes": "the same sweep (one fixed set of vectors) on 1 and 2 processes "
            "(gloo, 1 torch thread each); sweep_s = rank 0's scoring loop after a barrier, to "
            "the all-gather; candidates_per_s = scored / sweep_s; speedup over 1 process; "
            "same_front: the manifest's scores (rel 1e-5, abs 1e-6) and front match 1 process",
        },
        "sweep_processes": processes,
        "rows": rows,
    }
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
