"""Does the MI penalty decorrelate value vectors? Two vectors, the SAME data, each penalty.

Two value vectors (``first``, ``second``) are trained with DPO on one toy preference set, in
the sequential schedule (``second`` trains with ``first`` frozen, plus alpha * penalty).
Without a penalty they learn the same preference from the same data and drift toward one
another; a penalty should keep them apart without costing accuracy. Each run is a plain
``train()`` of the composed config; the numbers come from the run's own outputs:

- cos: mean over the 8 adapted modules of cos(flat delta W_first, flat delta W_second), from
  the ``InterferenceDiagnostics`` callback;
- MI: that callback's fresh MINE estimate of I(A_first h; A_second h) in nats, h = hidden
  states entering the adapted modules under the base model, on held-out tokens;
- per-value held-out DPO accuracy and mean reward margin (validation pairs, end of training);
- wall time of the run (both stages).

A reference row ``(untrained)`` gives the MI between the two freshly initialised vectors
(B = 0, so cos is undefined there and shown as 0): A h and A' h share the same anisotropic h,
so even independent random A's give a non-zero MI; training without a penalty raises it.

Toy data (generated here): a prompt about an item; the chosen answer is polite and on topic,
the rejected one curt; 10 % of the labels are flipped, so accuracy tops out near 0.9.

    python experiments/decorrelation_study.py            # ~20 min on 2 busy cores (6 min CPU)
    python experiments/decorrelation_study.py --quick    # smoke run, 1-2 min

Writes ``experiments/results/decorrelation_study.json`` (per-seed rows and the table).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VALUES = ("first", "second")
DIAG_BATCHES, DIAG_STEPS = 2, 500  # diagnostics: val batches per value, MINE steps

# penalty name -> config overrides (alphas: the configs' defaults, MINE tuned on this task)
PENALTIES: dict[str, list[str]] = {
    "none": ["mi=none"],
    "hsic lora_a": ["mi=hsic"],
    "hsic lora_a median": ["mi=hsic", "mi.estimator.sigma=median"],
    "hsic activations": ["mi=hsic", "mi.estimator.features=activations", "mi.max_samples=512"],
    "orthogonal": ["mi=orthogonal"],
    "mine": ["mi=mine"],
}

TOPICS = [
    "the weather", "a pasta recipe", "the solar system", "learning guitar", "saving money",
    "a job interview", "planting tomatoes", "the French revolution", "running shoes",
    "a broken bicycle", "writing a poem", "the stock market", "training a puppy",
    "a headache", "moving house", "chess openings",
]  # fmt: skip
GOOD = [
    "Happy to help. Here is a clear answer about {t}, step by step.",
    "Good question! Let me explain {t} carefully and kindly.",
    "Sure, here are a few useful facts about {t} for you.",
    "Of course. A short, friendly overview of {t} follows.",
]
BAD = [
    "No idea about {t}. Go away.",
    "Why would I care about {t}?",
    "Ask someone else about {t}.",
    "Whatever. {t} is boring.",
]


def make_pairs(n: int, flip: float, seed: int) -> list[dict[str, str]]:
    """n prompt/chosen/rejected rows; a fraction ``flip`` has chosen and rejected swapped."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        prompt = f"\n\nHuman: Item {i}: tell me about {t}.\n\nAssistant:"
        good, bad = " " + rng.choice(GOOD).format(t=t), " " + rng.choice(BAD).format(t=t)
        if rng.random() < flip:
            good, bad = bad, good
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def overrides(data: Path, out: Path, seed: int, args: argparse.Namespace) -> list[str]:
    """Two values read from the same file; tiny model, CSV logger, diagnostics only."""
    values = []
    for v in VALUES:
        values += [
            f"+value.{v}.source._target_=mva_lightning.data.sources.jsonl_pairs",
            f"+value.{v}.source.files=[{data}]",
        ]
    diag = "+callbacks.diagnostics"
    return [
        "model=tiny",  # the top-level default is SmolLM2 and its chat-formatted data
        "data=paper",
        "value=[]",
        *values,
        f"paths.output_dir={out}",
        "logger=csv",
        "callbacks=none",
        "~extrapolation",
        f"{diag}._target_=mva_lightning.diagnostics.callback.InterferenceDiagnostics",
        f"{diag}.max_batches={DIAG_BATCHES}",
        f"{diag}.mine_steps={DIAG_STEPS}",
        f"seed={seed}",
        "data.split.test=0.0",
        "data.split.val=0.2",
        "data.split.seed=0",  # the same validation pairs for every training seed
        "data.loader.max_length=96",
        "data.loader.max_prompt_length=48",
        f"data.loader.batch_size={args.batch_size}",
        "data.loader.eval_batch_size=16",
        f"optimizer.lr={args.lr}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
    ]


def compose_cfg(ovr: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=ovr)


def run_one(name: str, seed: int, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Train both vectors with one penalty; read accuracy, cosine and MI from the run folder."""
    from mva_lightning.train import train

    extra = PENALTIES[name] + args.override.get(name, [])
    cfg = compose_cfg(overrides(data, out, seed, args) + extra)
    start = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - start
    diag = json.loads((out / "diagnostics" / "interference.json").read_text())["pairs"][0]
    return {
        "penalty": name,
        "seed": seed,
        "overrides": extra,
        "alpha": float(cfg.mi.alpha),
        "mean_cos": diag["mean_cosine"],
        "mean_abs_cos": diag["mean_abs_cosine"],
        "mi": diag["mi"],
        "accuracy": {v: metrics[f"val/{v}/rewards/accuracies"] for v in VALUES},
        "margin": {v: metrics[f"val/{v}/rewards/margins"] for v in VALUES},
        "train_penalty": metrics.get("train/mi"),
        "cosine_per_module": diag["cosine"],
        "wall_s": wall,
    }


def untrained(seed: int, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """The reference row: diagnostics of the freshly initialised vectors (nothing trained)."""
    from mva_lightning.assembly import build, load_value_splits
    from mva_lightning.diagnostics import interference

    cfg = compose_cfg(overrides(data, out, seed, args) + PENALTIES["none"])
    _, module, dm = build(cfg, load_value_splits(cfg))
    batches = [b for v in VALUES for b in itertools.islice(dm.loader(v, "val"), DIAG_BATCHES)]
    proj = interference.base_projections(module.policy, list(VALUES), batches, max_tokens=4096)
    pair = interference.interference(module.policy, list(VALUES), proj, mine_steps=DIAG_STEPS)[0]
    return {
        "penalty": "(untrained)",
        "seed": seed,
        "alpha": 0.0,
        "mean_cos": pair.mean_cosine,
        "mean_abs_cos": pair.mean_abs_cosine,
        "mi": pair.mi,
        "accuracy": {v: None for v in VALUES},
        "margin": {v: None for v in VALUES},
        "wall_s": None,
    }


def _stat(xs: list[float | None]) -> str:
    if any(x is None for x in xs):
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(rows: list[dict]) -> str:
    """Markdown table, one line per penalty: mean ± sd over seeds."""
    lines = [
        "| penalty | alpha | mean cos | MI (nats) | acc first | acc second | margin second "
        "| wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(r["penalty"] for r in rows))
    for name in names:
        rs = [r for r in rows if r["penalty"] == name]
        cols = [
            _stat([r["mean_cos"] for r in rs]),
            _stat([r["mi"] for r in rs]),
            _stat([r["accuracy"]["first"] for r in rs]),
            _stat([r["accuracy"]["second"] for r in rs]),
            _stat([r["margin"]["second"] for r in rs]),
            "-" if rs[0]["wall_s"] is None else f"{statistics.mean(r['wall_s'] for r in rs):.0f}",
        ]
        lines.append(f"| {name} | {rs[0]['alpha']:g} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=400, help="toy pairs (both values share them)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per value")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--flip", type=float, default=0.1, help="fraction of flipped labels")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--penalties", nargs="+", default=list(PENALTIES), choices=list(PENALTIES))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PENALTY:OVERRIDE",
        help="extra config override for one penalty, e.g. 'mine:mi.alpha=5' (repeatable)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    p.add_argument("--quick", action="store_true", help="smoke run: 60 pairs, 1 epoch, 1 seed")
    p.add_argument("--workdir", type=Path, default=None, help="keep the run folders here")
    p.add_argument(
        "--out", type=Path, default=REPO / "experiments" / "results" / "decorrelation_study.json"
    )
    args = p.parse_args(argv)
    args.override = {}
    for item in args.set:
        name, _, ov = item.partition(":")
        if name not in PENALTIES or not ov:
            p.error(f"--set {item!r}: expected PENALTY:OVERRIDE with PENALTY in {list(PENALTIES)}")
        args.override.setdefault(name, []).append(ov)
    if args.quick:
        args.pairs, args.epochs, args.seeds = 60, 1, args.seeds[:1]
    return args


def _public_args(argv: list[str] | None) -> list[str]:
    """The command-line arguments without machine paths (--workdir, --out and their values)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--workdir", "--out"):
            skip = True
        elif not arg.startswith(("--workdir=", "--out=")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    for key, val in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "offline"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(key, val)
    import logging

    import torch

    from mva_lightning.io import write_json

    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="decorrelation_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs, args.flip, seed=0))
    )
    rows = []
    for seed in args.seeds:
        rows.append(untrained(seed, data, work / f"untrained-{seed}", args))
        for name in args.penalties:
            rows.append(run_one(name, seed, data, work / f"{name.replace(' ', '_')}-{seed}", args))
            print(f"seed {seed}: " + table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    print(table(rows))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "set")}
    command = " ".join(["python experiments/decorrelation_study.py", *_public_args(argv)])
    write_json(
        args.out,
        {"settings": settings, "command": command, "table": table(rows), "rows": rows},
    )
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
