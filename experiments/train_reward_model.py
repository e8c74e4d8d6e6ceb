"""Train the project's reward models on HH-RLHF pairs: one per value, scored on held-out pairs.

Each value's reward model is a linear Bradley-Terry head on a frozen language model's reading of
the whole exchange (:class:`mva_lightning.scorers.BradleyTerry` with ``features="hidden"``:
SmolLM2-135M-Instruct's layer-16 states, last token and response mean, standardised). The head
is the minimum of a ridge-regularised Bradley-Terry loss; the ridge strength is picked by
prompt-grouped cross-validation on the training pairs alone.

The split is the HH study's (``conf/experiment/hh_study.yaml``, ``data.split``): a prompt-hash
split with a fixed seed, so the pairs held out here are the ones the study's policies are
evaluated on, and no reward model or policy ever trains on them. Reported per value, on those
held-out pairs: pair accuracy (ties count half) with a 95 % bootstrap interval, beside
zero-shot baselines (the longer answer wins) and the earlier MiniLM head (``--minilm``); and the
time to encode and to fit.

    python experiments/train_reward_model.py --data-dir path/to/hh-rlhf           # both values
    python experiments/train_reward_model.py --data-dir path/to/hh-rlhf --max-train 200  # smoke

``--data-dir`` holds ``helpful-base-test.jsonl.gz`` and ``harmless-base-test.jsonl.gz`` (or pass
``--files helpful=PATH harmless=PATH``). The heads (a few KB each) are written to
``mva_lightning/assets/reward_models/<value>/``, where ``scorer=rm_helpful`` and
``scorer=rm_harmless`` load them; the results to ``experiments/results/reward_models.json``.
Encoded features are cached under ``$MVA_CACHE`` (``~/.cache/mva_lightning``), so a rerun with
other head settings takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = {"helpful": "helpful-base-test.jsonl.gz", "harmless": "harmless-base-test.jsonl.gz"}
PACKAGE = REPO / "mva_lightning" / "assets" / "reward_models"
L2_GRID = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
REFERENCE = {"helpful": 0.726, "harmless": 0.737}  # Ray2333 GPT-2-large, full HH-RLHF data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-dir", type=Path, default=None, help="folder holding " + ", ".join(FILES.values())
    )
    p.add_argument(
        "--files", nargs="+", default=[], metavar="VALUE=PATH", help="one file per value"
    )
    p.add_argument("--values", nargs="+", default=list(FILES), choices=list(FILES))
    p.add_argument("--model", default="smollm2", help="frozen LM: smollm2, or a hub id / folder")
    p.add_argument(
        "--layer", type=int, default=16, help="decoder layers run (features: its output)"
    )
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per row, from the end")
    p.add_argument("--l2", type=float, nargs="+", default=L2_GRID, help="ridge strengths tried")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (by prompt)")
    p.add_argument("--max-train", type=int, default=None, help="first N training pairs (smoke)")
    p.add_argument("--max-test", type=int, default=None, help="first N held-out pairs (smoke)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--minilm", action="store_true", help="also fit the MiniLM head (baseline)")
    p.add_argument("--models-out", type=Path, default=PACKAGE, help="where the heads are written")
    p.add_argument(
        "--out", type=Path, default=REPO / "experiments" / "results" / "reward_models.json"
    )
    p.add_argument("--no-save", action="store_true", help="do not write the heads")
    args = p.parse_args(argv)
    files = dict(f.split("=", 1) for f in args.files if "=" in f)
    bad = [f for f in args.files if "=" not in f] + [v for v in files if v not in FILES]
    if bad:
        p.error(f"--files: expected VALUE=PATH with VALUE in {list(FILES)}, got {bad}")
    for value in args.values:
        if value not in files:
            if args.data_dir is None:
                p.error(f"no file for {value}: pass --data-dir (holding {FILES[value]}) or --files")
            files[value] = str(args.data_dir / FILES[value])
        if not Path(files[value]).is_file():
            p.error(f"{files[value]}: no such file (expected the HH-RLHF {value}-base pairs)")
    args.paths = {v: Path(files[v]) for v in args.values}
    return args


def study_splits(paths: dict[str, Path]) -> dict:
    """Each value's train / val / test pairs, exactly as ``+experiment=hh_study`` splits them."""
    from hydra import compose, initialize_config_dir

    from mva_lightning.assembly import load_value_splits

    overrides = ["+experiment=hh_study"]
    for value in FILES:  # the config names both values; unused ones are dropped below
        path = paths.get(value, next(iter(paths.values())))
        overrides += [f"value.{value}.source.files=[{path}]", f"value.{value}.max_train_pairs=null"]
    with initialize_config_dir(config_dir=str(REPO / "mva_lightning" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    from omegaconf import open_dict

    with open_dict(cfg):
        for value in [v for v in FILES if v not in paths]:
            del cfg.value[value]
    return load_value_splits(cfg)


def cached(encoder, pairs, tag: str):
    """``encoder.pair_features(pairs)``, cached on disk by content (features, spec, pairs)."""
    import torch

    from mva_lightning.io import atomic_path
    from mva_lightning.model.backbones import default_cache_dir

    h = hashlib.sha256(json.dumps(encoder.config(), sort_keys=True, default=str).encode())
    for p in pairs:
        h.update(f"{len(p.prompt)}:{p.prompt}{len(p.chosen)}:{p.chosen}{p.rejected}".encode())
    path = default_cache_dir() / "reward_features" / f"{tag}-{h.hexdigest()[:20]}.pt"
    if path.is_file():
        return tuple(torch.load(path, weights_only=True))
    start = time.perf_counter()
    feats = encoder.pair_features(pairs)
    print(f"  {tag}: encoded {len(pairs)} pairs in {time.perf_counter() - start:.0f} s", flush=True)
    with atomic_path(path) as tmp:
        torch.save(list(feats), tmp)
    return feats


def pair_accuracy(margins) -> list[float]:
    """Per pair: 1 if the chosen answer scores higher, 0.5 on a tie, else 0."""
    return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]


def with_interval(items: list[float], resamples: int, seed: int = 0) -> dict:
    """Mean of per-pair items with its 95 % percentile bootstrap interval."""
    import numpy as np

    from mva_lightning.sweep.bootstrap import Bootstrap, resampled_means

    boot = Bootstrap(resamples=resamples, seed=seed)
    counts = boot.counts({"x": len(items)}, shared=False)["x"]
    draws = resampled_means(np.asarray([items]), counts)[0]
    return {"mean": float(np.mean(items)), "ci": boot.interval(draws), "n": len(items)}


def fold_of(prompt: str, folds: int) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % folds


def select_l2(make, train_pairs, feats, grid, folds: int) -> tuple[float, dict]:
    """The ridge strength with the best prompt-grouped cross-validated accuracy."""
    import torch

    fold = torch.tensor([fold_of(p.prompt, folds) for p in train_pairs])
    scores = {}
    for l2 in grid:
        correct = 0.0
        for k in range(folds):
            tr, te = fold != k, fold == k
            if not te.any() or not tr.any():
                continue
            head = make()
            head.fit((feats[0][tr], feats[1][tr]), l2=l2)
            margin = (head.head(feats[0][te]) - head.head(feats[1][te]))[:, 0]
            correct += sum(pair_accuracy(margin.tolist()))
        scores[l2] = correct / len(train_pairs)
    best = max(grid, key=lambda l2: (scores[l2], l2))  # ties: the stronger ridge
    return best, scores


def run_value(value: str, split, args: argparse.Namespace) -> list[dict]:
    from mva_lightning.scorers import BradleyTerry
    from mva_lightning.scorers.text import word_count

    train = split.train[: args.max_train] if args.max_train else split.train
    test = split.test[: args.max_test] if args.max_test else split.test
    print(f"{value}: {len(train)} train / {len(test)} held-out pairs", flush=True)
    longer = [
        (word_count(p.chosen) > word_count(p.rejected))
        - (word_count(p.chosen) < word_count(p.rejected))
        for p in test
    ]
    rows = [
        {
            "value": value,
            "scorer": "longer answer (zero-shot)",
            "test": with_interval(pair_accuracy(longer), args.resamples),
        }
    ]
    kinds = [
        (
            "hidden",
            {"lm": {"model": args.model, "layer": args.layer, "max_length": args.max_length}},
        )
    ]
    if args.minilm:
        kinds.append(("product", {"standardize": True}))
    for features, kwargs in kinds:

        def make(features=features, kwargs=kwargs):
            return BradleyTerry(name=f"{value}_rm", features=features, progress=True, **kwargs)

        encoder = make()
        start = time.perf_counter()
        f_train = cached(encoder, train, f"{value}-train")
        f_test = cached(encoder, test, f"{value}-test")
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        l2, cv = select_l2(make, train, f_train, args.l2, args.folds)
        rm = make()
        metrics = rm.fit(f_train, l2=l2)
        margin = (rm.head(f_test[0]) - rm.head(f_test[1]))[:, 0].tolist()
        fit_s = time.perf_counter() - start
        acc = with_interval(pair_accuracy(margin), args.resamples)
        rm.metrics = {
            **metrics,
            "test_acc": acc["mean"],
            "test_acc_ci": acc["ci"],
            "test_pairs": acc["n"],
            "train_pairs": len(train),
            "l2": l2,
        }
        name = "SmolLM2 layer-16 head" if features == "hidden" else "MiniLM head"
        rows.append(
            {
                "value": value,
                "scorer": name,
                "features": features,
                "l2": l2,
                "cv_acc": cv,
                "train_acc": metrics["train_acc"],
                "test": acc,
                "encode_s": encode_s,
                "fit_s": fit_s,
                "train_pairs": len(train),
                "reference_acc": REFERENCE[value],
            }
        )
        print(
            f"  {name}: held-out accuracy {acc['mean']:.3f} [{acc['ci'][0]:.3f}, "
            f"{acc['ci'][1]:.3f}] on {acc['n']} pairs (l2 {l2}, encode {encode_s:.0f} s, "
            f"fit {fit_s:.0f} s)",
            flush=True,
        )
        if features == "hidden" and not args.no_save:
            rm.save(args.models_out / value)
            print(f"  wrote {args.models_out / value}", flush=True)
    return rows


def portable(token: str) -> str:
    """A command-line token without this machine's folders: paths inside the repository become
    relative, others ``DIR/<name>`` (the data files are identified by name and digest)."""
    key, sep, value = token.partition("=") if not token.startswith("-") else ("", "", token)
    if not sep:
        key, value = "", token
    if os.path.isabs(value):
        inside = Path(value).resolve().is_relative_to(REPO)
        value = os.path.relpath(value, REPO) if inside else f"DIR/{Path(value).name}"
    return key + sep + value


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    from mva_lightning.io import write_json

    torch.manual_seed(0)
    splits = study_splits(args.paths)
    rows = []
    for value in args.values:
        rows += run_value(value, splits[value], args)
    args_given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python experiments/train_reward_model.py", *map(portable, args_given)])
    files = {
        v: {"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for v, p in args.paths.items()
    }
    settings = {
        k: v for k, v in vars(args).items() if k not in ("paths", "data_dir", "files", "out")
    }
    settings["models_out"] = portable(str(settings["models_out"]))
    write_json(args.out, {"command": command, "files": files, "settings": settings, "rows": rows})
    print("\n| value | scorer | held-out accuracy [95 % CI] | pairs |")
    print("|---|---|---|---|")
    for r in rows:
        t = r["test"]
        interval = f"{t['mean']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]"
        print(f"| {r['value']} | {r['scorer']} | {interval} | {t['n']} |")
    return rows


if __name__ == "__main__":
    main()
