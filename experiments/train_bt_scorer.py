"""How good are the offline scorers at telling chosen from rejected on real HH-RLHF pairs?

For each value (helpful-base, harmless-base; the official test files of Anthropic/hh-rlhf,
``helpful-base-test.jsonl.gz`` and ``harmless-base-test.jsonl.gz``, in ``--data-dir``): a
seeded 80 % / 20 % split of the pairs; a Bradley-Terry head on frozen MiniLM features
(:class:`mva_lightning.scorers.BradleyTerry`) trains on the 80 % and is scored on the 20 %:
held-out pair accuracy = fraction of pairs with ``r(chosen) > r(rejected)``
(ties count as wrong). On the same held-out pairs, zero-shot baselines:

- ``longer``: the longer response (in words) wins;
- ``relevance``: the :class:`Relevance` scorer (MiniLM cosine of question and answer);
- ``harmlessness``: the :class:`Harmlessness` scorer (profanity + refusal of sensitive prompts);
- ``sentiment``: the :class:`Sentiment` scorer (VADER).

Reference (the reward models' own reports): Ray2333 GPT-2-large 0.726 helpful, 0.737 harmless
(trained on the HH-RLHF train split, evaluated on its test split; ours trains on 80 % of the
test split, far fewer pairs). MiniLM features are computed once per value and cached
(``$MVA_CACHE`` or ``~/.cache/mva_lightning``), so reruns with other head settings take seconds.

    python experiments/train_bt_scorer.py --data-dir path/to/hh-rlhf                  # all pairs
    python experiments/train_bt_scorer.py --data-dir path/to/hh-rlhf --max-pairs 300  # smoke

Writes ``experiments/results/bt_scorer.json`` and the trained heads to
``experiments/results/bt/<value>/`` (load them with ``scorer=bt scorer.path=...``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = {"helpful": 0.726, "harmless": 0.737}  # Ray2333 GPT-2-large reward models
FILES = {"helpful": "helpful-base-test.jsonl.gz", "harmless": "harmless-base-test.jsonl.gz"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"folder holding the HH-RLHF test files ({', '.join(FILES.values())})",
    )
    p.add_argument("--values", nargs="+", default=list(FILES), choices=list(FILES))
    p.add_argument("--max-pairs", type=int, default=None, help="first N rows of each file")
    p.add_argument("--heldout", type=float, default=0.2, help="held-out fraction")
    p.add_argument("--features", default="product", choices=["product", "joint"])
    p.add_argument("--hidden", type=int, nargs="+", default=[0, 64], help="head widths (0: linear)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    p.add_argument("--no-save", action="store_true", help="do not write the trained heads")
    args = p.parse_args(argv)
    if args.data_dir is None:
        p.error(f"--data-dir is required: a folder holding {', '.join(FILES.values())}")
    return args


def cached_features(bt, pairs, key: str):
    """``bt.pair_features(pairs)``, cached on disk under ``key`` (a content hash)."""
    import torch

    from mva_lightning.io import atomic_path
    from mva_lightning.model.backbones import default_cache_dir

    path = default_cache_dir() / "bt_features" / f"{key}.pt"
    if path.is_file():
        return torch.load(path)
    start = time.perf_counter()
    feats = bt.pair_features(pairs)
    print(f"  encoded {len(pairs)} pairs in {time.perf_counter() - start:.0f} s", flush=True)
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats


def accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Fraction of pairs the scores order correctly (ties count as wrong)."""
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)


def baselines(test, feats_test) -> dict[str, float]:
    """Zero-shot pair accuracies of the cheap scorers on the held-out pairs."""
    from mva_lightning.scorers import Harmlessness, Sentiment
    from mva_lightning.scorers.text import word_count

    prompts = [p.prompt for p in test]
    out = {
        "longer": accuracy(
            [word_count(p.chosen) for p in test], [word_count(p.rejected) for p in test]
        )
    }
    if feats_test is not None:  # product features: the e_x * e_y half sums to the cosine
        f_w, f_l = feats_test
        d = f_w.shape[1] // 2
        out["relevance"] = accuracy(f_w[:, d:].sum(-1).tolist(), f_l[:, d:].sum(-1).tolist())
    for scorer in (Harmlessness(), Sentiment()):
        out[scorer.name] = accuracy(
            scorer(prompts, [p.chosen for p in test]), scorer(prompts, [p.rejected for p in test])
        )
    return out


def run_value(value: str, args: argparse.Namespace) -> list[dict]:
    from mva_lightning.data.sources import hh_rlhf, split_pairs
    from mva_lightning.scorers import BradleyTerry

    path = args.data_dir / FILES[value]
    pairs = hh_rlhf(files=[path], max_rows=args.max_pairs)
    split = split_pairs(pairs, test=args.heldout, val=0.0, seed=args.seed)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    key = f"{value}-{digest}-{args.max_pairs}-{args.heldout}-{args.seed}-{args.features}"
    print(f"{value}: {len(split.train)} train / {len(split.test)} held-out pairs", flush=True)
    encoder = BradleyTerry(features=args.features, progress=True)
    train_f = cached_features(encoder, split.train, f"{key}-train")
    test_f = cached_features(encoder, split.test, f"{key}-test")
    base = baselines(split.test, test_f if args.features == "product" else None)
    rows = []
    for hidden in args.hidden:
        bt = BradleyTerry(name=f"{value}_bt", hidden=hidden, features=args.features, seed=args.seed)
        start = time.perf_counter()
        metrics = bt.fit(
            train_f,
            test_f,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
        )
        rows.append(
            {
                "value": value,
                "head": "linear" if hidden == 0 else f"mlp{hidden}",
                "features": args.features,
                "train_pairs": len(split.train),
                "heldout_pairs": len(split.test),
                "train_acc": metrics["train_acc"],
                "heldout_acc": metrics["val_acc"],
                "fit_s": time.perf_counter() - start,
                "reference_acc": REFERENCE[value],
                **{f"zero_shot/{k}": v for k, v in base.items()},
            }
        )
        if not args.no_save and hidden == args.hidden[0]:
            bt.save(args.out / "bt" / value)
    return rows


def table(rows: list[dict]) -> str:
    cols = [
        "value",
        "head",
        "train_pairs",
        "heldout_pairs",
        "train_acc",
        "heldout_acc",
        "reference_acc",
    ] + sorted({k for r in rows for k in r if k.startswith("zero_shot/")})
    lines = [" | ".join(c.removeprefix("zero_shot/") for c in cols)]
    lines.append(" | ".join("---" for _ in cols))
    for r in rows:
        lines.append(
            " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    missing = [v for v in args.values if not (args.data_dir / FILES[v]).is_file()]
    if missing:
        print(f"missing data in {args.data_dir}: {[FILES[v] for v in missing]}", file=sys.stderr)
        return 1
    from mva_lightning.io import write_json

    start = time.perf_counter()
    rows = [row for value in args.values for row in run_value(value, args)]
    print(table(rows))
    out = args.out / "bt_scorer.json"
    write_json(
        out,
        {
            "command": " ".join(["python experiments/train_bt_scorer.py", *(argv or sys.argv[1:])]),
            "settings": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("data_dir", "out")
            },
            "rows": rows,
            "wall_s": time.perf_counter() - start,
        },
    )
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
