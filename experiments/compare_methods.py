"""Does MVA's front dominate the baselines? Every method (conf/method/) on one setting.

Each method trains with the same base model, LoRA, beta, data and evaluator; each run's
extrapolation sweep scores its candidates (MVA / SOUP / ablations: their grids; DPO, DPO-LW,
DPO-SeqT, MODPO: one model per run, the candidate [[1.0]]) on the same held-out split with the
same objective. A method's points are the union over its runs; its front is the non-dominated
set; its hypervolume uses ONE reference point shared by every method: the base model's scores
(w = 0). Per method: hypervolume, best score per value, trained runs and wall time, as the mean
and spread (std) over seeds.

Settings:
- ``tiny`` (about 3 minutes on 2 cores): the random-init 2-layer model on generated toy pairs
  where the values conflict (helpful prefers compliance on every prompt, harmless prefers a
  refusal on risky prompts); objective: implicit-reward accuracy on the test pairs.
- ``embedded`` (default): the embedded default (SmolLM2-135M-Instruct, pairs built from its
  own samples, generation scored by the values' scorers), sized for the CPU: two of its
  values, helpful and positive (``--values`` picks others), at most 32 training pairs per
  value, one epoch, fronts scored on the 32 benign test prompts of the package's prompt file
  (held out of training by its split column; 16-token greedy answers).
- ``hh``: the paper's HH experiment on real human preferences, CPU-sized
  (``+experiment=hh_study``): SmolLM2-135M-Instruct on the helpful-base and harmless-base pairs
  in ``--data-dir`` (``helpful-base-test.jsonl.gz``, ``harmless-base-test.jsonl.gz``), split by
  prompt with a fixed seed. Every candidate is scored two ways, each with its own table: (a)
  ``pairs``: implicit-reward accuracy on the held-out human-labelled pairs (no scorer: the
  labellers judge); (b) ``generation``: greedy answers to held-out prompts scored by the
  project's reward models (``scorer=rm_helpful``, ``rm_harmless``), which never saw them.

    python experiments/compare_methods.py [--setting embedded] [--seeds 3] [--methods mva ...]
    python experiments/compare_methods.py --setting hh --data-dir path/to/hh-rlhf
    python experiments/compare_methods.py --setting tiny --override trainer.max_epochs=3

A method's time is its runs' stage times (training and sweep, without the one-off data build);
SOUP, MOD and ``mva_no_extrapolation`` reuse the training of ``mva_no_mi`` / ``mva`` (same
config but the sweep: SOUP's candidates, MOD's decoding-time combination, in every scoring) and
count it in their time. Finished run folders are reused by a rerun (an interrupted comparison
resumes); ``--only-seeds 2`` runs one seed alone, e.g. in a second process, and a final run
without it collects every seed.

Writes ``experiments/results/compare_methods/<setting>.{json,csv}`` and one plot per seed,
``<setting>_seed<N>.png`` (``hh``: ``hh_<scoring>.*`` and ``hh_<scoring>_seed<N>.png``);
the run folders go to ``outputs/compare_methods/<setting>/seed<N>/`` (``--work``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import shutil
import statistics
import time
from pathlib import Path

from mva_lightning.io import write_csv, write_json

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "mva_lightning" / "conf"
OUT = REPO / "experiments" / "results" / "compare_methods"
HH_FILES = {"helpful": "helpful-base-test.jsonl.gz", "harmless": "harmless-base-test.jsonl.gz"}
# The table's order. Membership is conf/method/: every method config, checked at import.
ORDER = [
    "mva",
    "soup",
    "dpo",
    "dpo_lw",
    "dpo_seqt",
    "modpo",
    "mod",
    "panacea",
    "mva_no_mi",
    "mva_no_extrapolation",
    "mva_orthogonal",
]


def every_method() -> list[str]:
    """The methods of conf/method/ in the table's order.

    Raises:
        SystemExit: ``ORDER`` and the config folder name different methods.
    """
    configs = {p.stem for p in (CONF / "method").glob("*.yaml")}
    if configs != set(ORDER):
        raise SystemExit(
            "compare_methods.ORDER and conf/method/ disagree: "
            f"configs missing from ORDER {sorted(configs - set(ORDER))}, "
            f"names in ORDER without a config {sorted(set(ORDER) - configs)}; "
            "add the method to ORDER (and to MI / method_runs if it differs) or remove it"
        )
    return ORDER


METHODS = every_method()
# The MI group of each method, passed on the command line too: an experiment's
# `override /mi` would otherwise win over the method's (experiments are applied last).
MI = {m: "none" for m in METHODS} | {"mva": "hsic", "mva_no_extrapolation": "hsic"}
MI["mva_orthogonal"] = "orthogonal"
RESAMPLES = 1000  # bootstrap resamples of the held-out items per seed (paired across methods)
SWEEP = [[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]]  # DPO-LW and MODPO: one run per w (K = 2)
# Methods whose training is another method's, with other candidates: the trained run is reused
# and only its sweep is rerun (`python -m mva_lightning.sweep`) into its own folder.
SAME_TRAINING = {"soup": "mva_no_mi", "mva_no_extrapolation": "mva", "mod": "mva_no_mi"}
EMBEDDED_VALUES = ["helpful", "positive"]
SETTINGS = ["tiny", "embedded", "hh"]


def scorings(setting: str) -> dict[str | None, dict | None]:
    """How a setting scores candidates: name -> objective (None: the run's own sweep).

    One unnamed scoring for ``tiny`` and ``embedded``; ``hh`` names two: ``generation`` (its
    runs' own sweep) and ``pairs`` (the same candidates re-swept into ``<subdir>_pairs`` with
    implicit-reward accuracy on the held-out pairs, ``conf/extrapolation/objective/implicit``).
    """
    if setting != "hh":
        return {None: None}
    from omegaconf import OmegaConf

    implicit = OmegaConf.load(CONF / "extrapolation" / "objective" / "implicit.yaml")
    implicit.split = "test"
    return {"generation": None, "pairs": OmegaConf.to_container(implicit)}


def weight_sweep(num_values: int) -> list[list[float]]:
    """DPO-LW / MODPO weights: three points for K = 2; for K > 2 each value leads once (0.6)."""
    if num_values == 2:
        return SWEEP
    rest = round(0.4 / (num_values - 1), 4)
    return [[0.6 if i == k else rest for i in range(num_values)] for k in range(num_values)]


def toy_files(folder: Path, n: int = 96, seed: int = 0) -> dict[str, Path]:
    """Conflicting toy values in HH format: helpful = comply, harmless = refuse risky prompts."""
    rng = random.Random(seed)
    words = "apples rivers lamps code music trains salt maps clocks paper".split()
    risky = "pick a lock|make a weapon|hack a phone|steal a car".split("|")
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"helpful": [], "harmless": []}
    for i in range(n):
        topic = rng.choice(risky) if i % 2 else f"{rng.choice(words)} and {rng.choice(words)}"
        prompt = f"\n\nHuman: Tell me how to {topic} ({i}).\n\nAssistant:"
        comply = f" Sure, first {rng.choice(words)}, then {rng.choice(words)}."
        refuse = f" I cannot help with that, sorry{'.' * rng.randint(1, 3)}"
        rows["helpful"].append(_pair(prompt, comply, refuse))
        if i % 2:  # risky: the values disagree
            rows["harmless"].append(_pair(prompt, refuse, comply))
        else:
            rows["harmless"].append(_pair(prompt, comply, f" {rng.choice(words)}, you fool."))
    paths = {}
    for value, lines in rows.items():
        paths[value] = folder / f"{value}.jsonl.gz"
        with gzip.open(paths[value], "wt") as fh:
            fh.write("\n".join(lines) + "\n")
    return paths


def _pair(prompt: str, chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected})


def setting_overrides(
    setting: str, data_dir: Path, values: list[str] | None = None, hh_dir: Path | None = None
) -> list[str]:
    """Overrides shared by every method of a setting.

    Args:
        setting: ``tiny``, ``embedded`` or ``hh``.
        data_dir: Where the tiny setting writes its generated toy files.
        values: The embedded values compared (default ``EMBEDDED_VALUES``).
        hh_dir: The folder holding the HH-RLHF files (``hh`` only).
    """
    if setting == "tiny":
        files = toy_files(data_dir)
        return [
            "model=tiny",
            "value=[helpful,harmless]",
            "data=paper",
            "extrapolation=grid",
            f"value.helpful.source.files=[{files['helpful']}]",
            f"value.harmless.source.files=[{files['harmless']}]",
            "data.loader.max_length=64",
            "data.loader.max_prompt_length=40",
            "data.loader.batch_size=4",
            "data.split.test=0.25",
            "data.split.val=0.1",
            "data.split.by_prompt=true",
            "trainer.max_epochs=2",
            "optimizer.lr=5e-4",
            "extrapolation.objective.split=test",
        ]
    if setting == "embedded":
        values = values or EMBEDDED_VALUES
        return [
            f"value=[{','.join(f'embedded_{v}' for v in values)}]",
            *(f"value.{v}.max_pairs=32" for v in values),
            "trainer.max_epochs=1",
            "extrapolation.objective.num_prompts=32",  # the prompt file's benign test rows
            "extrapolation.objective.prompts_split=test",
        ]
    if setting == "hh":
        if hh_dir is None:
            raise SystemExit("--setting hh needs --data-dir (the HH-RLHF files)")
        return [
            "+experiment=hh_study",
            f"value.helpful.source.files=[{hh_dir / HH_FILES['helpful']}]",
            f"value.harmless.source.files=[{hh_dir / HH_FILES['harmless']}]",
            "extrapolation.objective.prompts_split=test",  # the fixed split's held-out prompts
        ]
    raise SystemExit(f"--setting: expected one of {SETTINGS}, got {setting!r}")


def method_runs(method: str, run_root: Path, num_values: int) -> list[tuple[str, list[str]]]:
    """(run name, extra overrides) for each trained run of a method."""
    base = [f"method={method}", f"mi={MI[method]}"]
    if method == "dpo":
        one_hot = [[float(i == k) for i in range(num_values)] for k in range(num_values)]
        return [(f"dpo_{k}", [*base, f"method.weights={w}"]) for k, w in enumerate(one_hot)]
    if method in ("dpo_lw", "modpo"):
        margins = run_root / SAME_TRAINING["soup"] / "adapters"  # independent, no-MI vectors
        extra = [f"method.margin_from={margins}"] if method == "modpo" else []
        return [
            (f"{method}_{i}", [*base, *extra, f"method.weights={w}"])
            for i, w in enumerate(weight_sweep(num_values))
        ]
    return [(method, base)]


def run_points(
    run_dir: Path, subdir: str = "extrapolation"
) -> tuple[list[list[float]], dict[str, float], list[str]]:
    """Scores of every candidate of a finished run's sweep, the base scores and the values."""
    data = json.loads((run_dir / subdir / "pareto.json").read_text())
    values = data["values"]
    points = [[float(row[v]) for v in values] for row in data["rows"]]
    return points, data["base_scores"], values


def run_items(run_dir: Path, subdir: str = "extrapolation") -> tuple[list, dict | None, bool]:
    """Per-item scores (pairs or prompts) of every candidate of a run's sweep, the base's, and
    whether the values share their items (one prompt set): what paired intervals resample."""
    from mva_lightning.sweep.manifest import read_manifest, read_per_item

    rows, base = read_per_item(run_dir / subdir)
    shared = read_manifest(run_dir / subdir).objective.get("objective") == "GenerationScore"
    per_item = [r.per_item if r is not None else None for r in rows]
    return per_item, (base.per_item if base is not None else None), shared


def resampled_hypervolumes(
    items: dict[str, list[dict[str, list[float]]]],
    base: dict[str, list[float]],
    values: list[str],
    shared: bool,
    seed: int,
    resamples: int = RESAMPLES,
) -> dict[str, list[float]]:
    """Per method, its hypervolume in each of ``resamples`` resamples of the held-out items.

    Every method and the base are rescored on the same resamples (the same prompts or pairs),
    so differences between methods are paired; the reference point of each resample is the
    base's score on it.
    """
    import numpy as np

    from mva_lightning.sweep.bootstrap import Bootstrap, hypervolumes, resampled_scores

    boot = Bootstrap(resamples=resamples, seed=seed)
    counts = boot.counts({v: len(base[v]) for v in values}, shared)
    out = {}
    for method, cands in items.items():
        table = {v: np.array([base[v], *(c[v] for c in cands)]) for v in values}
        scores = resampled_scores(table, counts, values)  # (B, 1 + C, K), row 0 the base
        out[method] = hypervolumes(scores, range(1, len(cands) + 1)).tolist()
    return out


def compare_seed(
    setting: str,
    seed: int,
    methods: list[str],
    root: Path,
    values: list[str] | None = None,
    hh_dir: Path | None = None,
    scoring: str | None = None,
    extra: list[str] | None = None,
) -> dict:
    """Every method on one seed: per method its points, front, hypervolume and times.

    Args:
        setting: See :func:`setting_overrides`.
        seed: The runs' seed.
        methods: Methods in the table.
        root: This seed's run folders.
        values: Embedded values (``embedded`` only).
        hh_dir: The HH-RLHF folder (``hh`` only).
        scoring: One of :func:`scorings` (a named extra scoring re-sweeps finished runs).
        extra: Overrides applied to every run, after the setting's.
    """
    from mva_lightning.train import train

    common = [*setting_overrides(setting, root / "data", values, hh_dir), *(extra or [])]
    objective = scorings(setting)[scoring]
    num_values = len(values or EMBEDDED_VALUES) if setting == "embedded" else 2
    needed = set(methods) | {SAME_TRAINING[m] for m in methods if m in SAME_TRAINING}
    if "modpo" in methods:
        needed.add(SAME_TRAINING["soup"])  # MODPO's frozen margins: the no-MI vectors
    # Trained methods first (the no-MI vectors before MODPO), then the re-swept ones.
    order = sorted(needed, key=lambda m: (m in SAME_TRAINING, m != SAME_TRAINING["soup"]))
    out: dict[str, dict] = {}
    base: dict[str, float] | None = None
    names: list[str] = []
    items: dict[str, list] = {}  # method -> per candidate, value -> per-item scores
    base_items, shared = None, False
    compute = 0.0  # this seed's CPU time: every trained run and sweep once
    training: dict[str, float] = {}  # trained method -> seconds of training (without sweeps)
    for method in order:
        points, seconds, runs = [], 0.0, 0
        items[method] = []
        for name, extra_run in method_runs(method, root, num_values):
            overrides = [
                *common,
                *extra_run,
                f"seed={seed}",
                "logger=csv",
                "callbacks=none",
                "extrapolation.report_split=null",
                "trainer.enable_progress_bar=false",
            ]
            if method in SAME_TRAINING:
                donor = SAME_TRAINING[method]
                run_dir, subdir = root / donor, f"extrapolation_{method}"
                if not (run_dir / subdir / "pareto.json").is_file():
                    resweep(overrides, method_runs(donor, root, num_values)[0][1], run_dir, subdir)
                seconds += training[donor]  # the training it reuses counts too
                compute += sweep_seconds(run_dir, subdir) if objective is None else 0.0
            else:
                run_dir, subdir = root / name, "extrapolation"
                cfg = _compose([*overrides, f"paths.output_dir={run_dir.resolve()}"])
                if not finished(run_dir, cfg):  # a finished run is reused
                    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run restarts
                    train(cfg)
                runs += 1
                training[method] = training.get(method, 0.0) + run_seconds(run_dir)
                training[method] -= sweep_seconds(run_dir, subdir)
                seconds += run_seconds(run_dir) - sweep_seconds(run_dir, subdir)
                compute += run_seconds(run_dir) if objective is None else 0.0
            if objective is not None:  # this scoring: the same candidates, another objective
                subdir = rescore(overrides, run_dir, subdir, scoring, objective)
            seconds += sweep_seconds(run_dir, subdir)
            compute += sweep_seconds(run_dir, subdir) if objective is not None else 0.0
            got, run_base, names = run_points(run_dir, subdir)
            points += got
            per_item, run_base_items, shared = run_items(run_dir, subdir)
            items[method] += per_item
            base_items = base_items or run_base_items
            if base is None:
                base = run_base
            elif any(abs(base[v] - run_base[v]) > 1e-6 for v in names):
                raise RuntimeError(f"{name}: base scores {run_base} differ from {base}")
        out[method] = summarise_points(points, [base[v] for v in names], names)
        out[method] |= {"runs": runs, "seconds": seconds, "trained_with": SAME_TRAINING.get(method)}
    assert base is not None
    reference = [base[v] for v in names]
    complete = base_items is not None and all(c is not None for m in items for c in items[m])
    if complete:  # paired resamples: every method on the same held-out items
        kept = {m: items[m] for m in methods}
        for m, hvs in resampled_hypervolumes(kept, base_items, names, shared, seed).items():
            out[m]["hypervolume_resamples"] = hvs
    return {"seed": seed, "values": names, "reference": reference, "compute_s": compute, **out}


def rescore(overrides: list[str], run_dir: Path, subdir: str, scoring: str, objective: dict) -> str:
    """Score the candidates of ``run_dir/subdir`` with ``objective`` into ``<subdir>_<scoring>``
    (once: a finished rescoring is reused); returns that folder's name."""
    from omegaconf import OmegaConf

    from mva_lightning.sweep.cli import rerun

    target = f"{subdir}_{scoring}"
    if not (run_dir / target / "pareto.json").is_file():
        cfg = _compose(overrides)
        candidates = OmegaConf.to_container(cfg.extrapolation.candidates, resolve=True)
        combination = cfg.extrapolation.objective.get("combination", "weights")
        if combination != "weights":  # the method's way of combining (MOD: decoding)
            objective = {**objective, "combination": combination}
        patch = {"candidates": candidates, "objective": objective, "output_subdir": target}
        rerun(run_dir, {**patch, "report_split": None, "progress": False})
    return target


def sweep_seconds(run_dir: Path, subdir: str) -> float:
    """How long the sweep in ``run_dir/subdir`` took."""
    return float(json.loads((run_dir / subdir / "pareto.json").read_text())["seconds"])


def finished(run_dir: Path, cfg) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg`` (a rerun resumes there).

    The run's saved, resolved ``config.yaml`` must equal ``cfg`` resolved: a run made with other
    overrides or under other config defaults is trained again.
    """
    from omegaconf import OmegaConf

    saved = run_dir / "config.yaml"
    if not (run_dir / "extrapolation" / "pareto.json").is_file() or not saved.is_file():
        return False
    return OmegaConf.load(saved) == OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))


def run_seconds(run_dir: Path) -> float:
    """A finished run's stage times (training and its sweep), without the one-off data build."""
    stages = json.loads((run_dir / "timings.json").read_text())
    return sum(s["seconds"] for s in stages if s["stage"] != "data")


def summarise_points(points: list[list[float]], ref: list[float], names: list[str]) -> dict:
    """A method's points, its non-dominated front, hypervolume against ``ref`` and best scores."""
    import numpy as np

    from mva_lightning.sweep import pareto

    arr = np.array(points)
    mask = pareto.pareto_mask(arr)
    return {
        "points": arr.tolist(),
        "front": arr[mask].tolist(),
        "hypervolume": pareto.hypervolume(arr[mask], ref),
        "best": {v: float(arr[:, i].max()) for i, v in enumerate(names)},
    }


def resweep(overrides: list[str], donor_extra: list[str], run_dir: Path, subdir: str) -> None:
    """Rerun a finished run's sweep with another method's candidates, into ``run_dir/subdir``;
    the method's objective too where it differs from the run's (MOD: ``combination``).

    Raises:
        RuntimeError: The two methods' configs differ in more than their sweep settings.
    """
    from omegaconf import OmegaConf

    from mva_lightning.sweep.cli import rerun

    mine = _compose(overrides)
    donor = _compose(
        [*[o for o in overrides if not o.startswith(("method=", "mi="))], *donor_extra]
    )
    strip = {"extrapolation", "method"}
    a = {k: v for k, v in OmegaConf.to_container(mine).items() if k not in strip}
    b = {k: v for k, v in OmegaConf.to_container(donor).items() if k not in strip}
    if a != b:
        raise RuntimeError(f"{subdir}: training differs from the run in {run_dir}")
    candidates = OmegaConf.to_container(mine.extrapolation.candidates, resolve=True)
    # a partial node: merged onto the run's own sweep settings (+extrapolation.KEY=V)
    patch = {"candidates": candidates, "output_subdir": subdir, "report_split": None}
    objective = OmegaConf.to_container(mine.extrapolation.objective, resolve=True)
    if objective != OmegaConf.to_container(donor.extrapolation.objective, resolve=True):
        patch["objective"] = objective  # a whole node (with _target_): replaces the run's
    rerun(run_dir, {**patch, "progress": False})


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def summarise(per_seed: list[dict], methods: list[str]) -> list[dict]:
    """One table row per method: mean and std over seeds, and with paired resamples the
    hypervolume's mean and 95 % interval over seeds x resamples and, against MVA, the paired
    difference (MVA minus the method), its interval and the share of resamples MVA wins."""
    values = per_seed[0]["values"]
    rows = []
    paired = all("hypervolume_resamples" in s[m] for s in per_seed for m in methods)
    for m in methods:
        row: dict = {"method": m, "trained_with": per_seed[0][m].get("trained_with")}
        series = {
            "hypervolume": [s[m]["hypervolume"] for s in per_seed],
            **{f"best/{v}": [s[m]["best"][v] for s in per_seed] for v in values},
            "runs": [s[m]["runs"] for s in per_seed],
            "seconds": [s[m]["seconds"] for s in per_seed],
        }
        for key, xs in series.items():
            row[f"{key}_mean"] = statistics.fmean(xs)
            row[f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        if paired:
            row.update(_paired(per_seed, m, "mva" if "mva" in methods else None))
        rows.append(row)
    return rows


def _paired(per_seed: list[dict], method: str, against: str | None) -> dict:
    import numpy as np

    from mva_lightning.sweep.bootstrap import Bootstrap

    boot = Bootstrap()
    hv = np.concatenate([s[method]["hypervolume_resamples"] for s in per_seed])
    out = {"hypervolume_resampled_mean": float(hv.mean()), "hypervolume_ci": boot.interval(hv)}
    if against is None or against == method:
        return out
    mva = np.concatenate([s[against]["hypervolume_resamples"] for s in per_seed])
    diff = mva - hv  # paired: the same seed and resample for both
    ci = boot.interval(diff)
    return out | {
        "mva_minus_this_mean": float(diff.mean()),
        "mva_minus_this_ci": ci,
        "mva_wins_share": float((diff > 0).mean() + 0.5 * (diff == 0).mean()),
        "significant": bool(ci[0] > 0 or ci[1] < 0),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="embedded", choices=SETTINGS)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument(
        "--values",
        nargs="+",
        default=None,
        choices=["helpful", "harmless", "positive"],
        help=f"embedded setting: the values compared (default: {' '.join(EMBEDDED_VALUES)})",
    )
    p.add_argument(
        "--only-seeds",
        nargs="+",
        type=int,
        default=None,
        help="train and sweep just these seeds (e.g. one per process), no table; a later run "
        "without it reuses their finished run folders",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"hh: the folder holding the HH-RLHF files {', '.join(HH_FILES.values())}",
    )
    p.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides for every run, e.g. trainer.max_epochs=2 (scale a setting up)",
    )
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--work", type=Path, default=None, help="run folders (outputs/compare_methods)")
    args = p.parse_args(argv)
    if args.values is not None and args.setting != "embedded":
        raise SystemExit(f"--values picks embedded values; --setting {args.setting} has its own")
    if args.setting == "hh":
        if args.data_dir is None:
            raise SystemExit(
                "--setting hh needs --data-dir: a folder holding the HH-RLHF files "
                + ", ".join(HH_FILES.values())
            )
        missing = [f for f in HH_FILES.values() if not (args.data_dir / f).is_file()]
        if missing:
            raise SystemExit(f"--data-dir {args.data_dir}: missing {', '.join(missing)}")
    elif args.data_dir is not None:
        raise SystemExit(f"--data-dir is for --setting hh; {args.setting} has its data")
    logging.getLogger("lightning").setLevel(logging.WARNING)

    work = args.work or REPO / "outputs" / "compare_methods" / args.setting  # gitignored
    seeds = args.only_seeds if args.only_seeds is not None else range(args.seeds)
    all_rows = []
    for scoring in scorings(args.setting):
        start = time.perf_counter()
        per_seed = [
            compare_seed(
                args.setting,
                seed,
                args.methods,
                work / f"seed{seed}",
                args.values,
                args.data_dir,
                scoring,
                args.override,
            )
            for seed in seeds
        ]
        if args.only_seeds is not None:
            continue
        name = f"{args.setting}_{scoring}" if scoring else args.setting
        rows = report(per_seed, args.methods, name, args.out, time.perf_counter() - start)
        all_rows += [{**r, "scoring": scoring} if scoring else r for r in rows]
    if args.only_seeds is not None:
        print(f"seeds {args.only_seeds} done in {work}; the table: rerun without --only-seeds")
    return all_rows


def report(per_seed: list[dict], methods: list[str], name: str, out: Path, wall: float) -> list:
    """Write one scoring's table (JSON, CSV) and per-seed plots, print the table."""
    import numpy as np

    from mva_lightning.sweep import pareto

    rows = summarise(per_seed, methods)
    for seed in per_seed:  # the resamples are summarised in the table; not written out
        for m in methods:
            seed[m].pop("hypervolume_resamples", None)
    compute = sum(seed["compute_s"] for seed in per_seed)
    write_json(
        (out / name).with_suffix(".json"),
        {
            "setting": name,
            "seeds": len(per_seed),
            "wall_s": wall,  # this invocation (finished runs are reused)
            "compute_s": compute,  # every run (or, for a rescoring, every re-sweep) once
            "table": rows,
            "per_seed": per_seed,
        },
    )
    write_csv((out / name).with_suffix(".csv"), rows)
    main_m = "mva" if "mva" in methods else methods[0]
    for seed in per_seed:  # one plot per seed: every method's front on that seed's data
        pts = np.array(seed[main_m]["points"])
        pareto.plot_front(
            pts,
            seed["values"],
            pareto.pareto_mask(pts),
            None,
            out / f"{name}_seed{seed['seed']}.png",
            title=f"{name}, seed {seed['seed']}: {main_m} (grey/blue) vs baselines",
            reference=seed["reference"],
            extra_fronts={m: np.array(seed[m]["front"]) for m in methods if m != main_m},
        )
    print(f"\n{name}:")
    _print(rows, per_seed[0]["values"], wall, compute)
    return rows


def _print(rows: list[dict], values: list[str], wall: float, compute: float) -> None:
    head = ["method", "HV (seeds)", "HV [95 % CI]", "MVA - this [95 % CI]", "MVA wins"]
    head += [*(f"best {v}" for v in values), "runs", "seconds"]
    print(" | ".join(head))
    for r in rows:
        ci = r.get("hypervolume_ci")
        diff = r.get("mva_minus_this_ci")
        verdict = ("" if r.get("significant") else " (no detectable difference)") if diff else ""
        cells = [
            r["method"],
            f"{r['hypervolume_mean']:.4f} ± {r['hypervolume_std']:.4f}",
            f"{r['hypervolume_resampled_mean']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "",
            f"{r['mva_minus_this_mean']:+.4f} [{diff[0]:+.4f}, {diff[1]:+.4f}]{verdict}"
            if diff
            else "",
            f"{r['mva_wins_share']:.2f}" if diff else "",
            *(f"{r[f'best/{v}_mean']:.3f} ± {r[f'best/{v}_std']:.3f}" for v in values),
            f"{r['runs_mean']:.0f}",
            f"{r['seconds_mean']:.1f}",
        ]
        print(" | ".join(cells))
    print(f"wall time {wall:.0f} s; every run once: {compute:.0f} s")


if __name__ == "__main__":
    main()
