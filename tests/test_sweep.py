"""The extrapolation sweep, its callback and command: front, checkpoints, manifest, resume, bad
input, runs, reruns over a finished run."""

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    VALUES,
    compose,
    make_datamodule,
    make_policy,
    toy_overrides,
    write_hh_file,
)
from omegaconf import OmegaConf
from peft import PeftModel

from mva_lightning.model import lora
from mva_lightning.model.backbones import tiny_llama
from mva_lightning.model.precision import autocast
from mva_lightning.sweep.cli import rerun, sweep_settings
from mva_lightning.sweep.manifest import ExtrapolationResult, read_manifest, w_label
from mva_lightning.sweep.objectives import ImplicitReward, Objective
from mva_lightning.sweep.sweep import extrapolate
from mva_lightning.train import train

# Hand-made scores: (1, 0), (0, 1) and (0.5, 0.5) are non-dominated, (0.4, 0.4) is dominated by
# (0.5, 0.5). With the base (0, 0) as reference the boxes [0,1]x[0,.2], [0,.2]x[0,1], [0,.6]^2
# cover 0.2 + 0.2 + 0.36 - (0.04 + 0.12 + 0.12) + 0.04 = 0.52.
TABLE = {
    (0.0, 0.0): (0.0, 0.0),
    (1.0, 0.0): (1.0, 0.2),
    (0.0, 1.0): (0.2, 1.0),
    (0.5, 0.5): (0.6, 0.6),
    (0.4, 0.4): (0.5, 0.5),
    (1.5, -0.5): (0.9, 0.1),
}
CANDIDATES = [w for w in TABLE if w != (0.0, 0.0)]
FRONT = [True, True, True, False, False]  # (1.5, -0.5) scores (0.9, 0.1) < (1.0, 0.2)


class TableObjective(Objective):
    """Looks the policy's current w up in TABLE; raises after ``fail_after`` calls."""

    def __init__(self, fail_after=None, split="val"):
        self.split, self.fail_after, self.calls, self.prepared = split, fail_after, 0, 0

    def settings(self):
        return {**super().settings(), "table": sorted(map(str, TABLE.items()))}

    def validate(self, datamodule, values):
        pass

    def data_fingerprint(self, datamodule, values):
        return "table"

    def prepare(self, policy, datamodule, values):
        self.prepared += 1

    def score(self, policy, datamodule, values):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated interruption")
        w = tuple(round(x, 6) + 0.0 for x in lora.get_weights(policy).values())
        a, b = TABLE[w]
        return {"helpful": a, "harmless": b, "helpful/extra": 10 * a}

    def for_split(self, split):
        return TableObjective(split=split)


@pytest.fixture(scope="module")
def policy():
    return make_policy()[0]


def _sweep(policy, out, objective=None, **kw):
    kw.setdefault("candidates", CANDIDATES)
    return extrapolate(
        policy, None, VALUES, objective=objective or TableObjective(), out_dir=out, **kw
    )


def test_front_hypervolume_and_columns(policy, tmp_path):
    result = _sweep(policy, tmp_path / "ext")
    assert result.weights == CANDIDATES and result.on_front == FRONT
    assert result.hypervolume == pytest.approx(0.52)
    assert result.base_scores == {"helpful": 0.0, "harmless": 0.0, "helpful/extra": 0.0}
    assert result.reference_point == [0.0, 0.0] and result.scored == 6 and result.skipped == 0
    assert result.rows()[0] == {
        "w/helpful": 1.0,
        "w/harmless": 0.0,
        "helpful": 1.0,
        "harmless": 0.2,
        "helpful/extra": 10.0,
        "on_front": True,
        "checkpoint": "ext/checkpoints/w_1.0_0.0",
    }
    metrics = result.metrics()
    assert metrics["pareto/front_size"] == 3 and metrics["pareto/candidates_per_s"] > 0
    fixed = _sweep(policy, tmp_path / "ref", reference_point=[0.5, 0.1])
    # only (1, 0.2) and (0.6, 0.6) beat (0.5, 0.1) in both: boxes [.5,1]x[.1,.2] (0.05) and
    # [.5,.6]x[.1,.6] (0.05) overlap on [.5,.6]x[.1,.2] (0.01)
    assert fixed.hypervolume == pytest.approx(0.09)
    assert lora.get_weights(policy) == {"helpful": 0.0, "harmless": 0.0}  # restored


def test_one_checkpoint_per_saved_vector_each_loading_to_the_same_logits(policy, tmp_path):
    result = _sweep(policy, tmp_path / "ext", save="all")
    folders = sorted((tmp_path / "ext" / "checkpoints").iterdir())
    assert [f.name for f in folders] == sorted(w_label(w) for w in CANDIDATES)
    ids = torch.tensor([[72, 101, 108, 108, 111, 33, 10, 65]])
    fresh = None  # one fresh base; each checkpoint loads into it as a plain PEFT adapter
    for i, (w, rel) in enumerate(zip(result.weights, result.checkpoints, strict=True)):
        folder = tmp_path / rel
        meta = json.loads((folder / "preference.json").read_text())
        assert meta["w"] == list(w) and meta["values"] == VALUES
        assert meta["on_front"] == result.on_front[i] and meta["scores"] == result.scores[i]
        if fresh is None:
            fresh = PeftModel.from_pretrained(tiny_llama(seed=1).model, folder, adapter_name="0")
        else:
            fresh.load_adapter(folder, adapter_name=str(i))
        fresh.set_adapter(str(i))
        with torch.no_grad(), lora.using_weights(policy, dict(zip(VALUES, w, strict=True))):
            want = policy(input_ids=ids).logits
            torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    front_only = _sweep(policy, tmp_path / "ext")  # same folder, save=front: stale ones go
    assert front_only.skipped == 6
    assert len(list((tmp_path / "ext" / "checkpoints").iterdir())) == 3


def test_manifest_round_trips(policy, tmp_path):
    result = _sweep(policy, tmp_path / "ext", report_split="test")
    assert result.report[0] == {
        "test/helpful": 1.0,
        "test/harmless": 0.2,
        "test/helpful/extra": 10.0,
    }
    assert result.report[3] == {}  # off the front: not reported
    data = json.loads((tmp_path / "ext" / "pareto.json").read_text())
    assert ExtrapolationResult.from_json(data) == result
    assert read_manifest(tmp_path / "ext") == read_manifest(tmp_path / "ext" / "pareto.json")
    assert read_manifest(tmp_path / "ext") == result
    with pytest.raises(FileNotFoundError, match="no sweep manifest"):
        read_manifest(tmp_path)
    with open(tmp_path / "ext" / "pareto.csv") as fh:
        rows = list(csv.DictReader(fh))
    parsed = [
        {
            k: (x == "True" if k == "on_front" else x if k == "checkpoint" else float(x))
            for k, x in row.items()
            if x != ""
        }
        for row in rows
    ]
    want = [{k: x for k, x in row.items() if x not in ("", None)} for row in result.rows()]
    assert parsed == want
    assert (tmp_path / "ext" / "pareto.png").stat().st_size > 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_skips_scored_candidates_and_gives_the_same_front(policy, tmp_path):
    full = _sweep(policy, tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _sweep(policy, tmp_path / "ext", objective=TableObjective(fail_after=3))
    assert len(list((tmp_path / "ext" / "scores").rglob("w_*.json"))) == 3  # base + 2
    assert not (tmp_path / "ext" / "pareto.json").exists()
    objective = TableObjective()
    resumed = _sweep(policy, tmp_path / "ext", objective=objective)
    assert (resumed.skipped, resumed.scored, objective.calls) == (3, 3, 3)
    assert resumed.on_front == full.on_front and resumed.scores == full.scores
    assert resumed.hypervolume == full.hypervolume


class BatchedTable(TableObjective):
    """TABLE again, scored ``candidates_per_forward`` at a time; records each batch's size."""

    candidates_per_forward = 4

    def __init__(self):
        super().__init__()
        self.batches = []

    def score_many(self, policy, datamodule, values, weights):
        self.batches.append(len(weights))
        out = []
        for w in weights:
            a, b = TABLE[tuple(round(w[v], 6) + 0.0 for v in VALUES)]
            out.append({"helpful": a, "harmless": b, "helpful/extra": 10 * a})
        return out


def test_sweep_scores_candidates_in_batches_of_candidates_per_forward(policy, tmp_path):
    full = _sweep(policy, tmp_path / "one")
    objective = BatchedTable()
    batched = _sweep(policy, tmp_path / "batched", objective=objective)
    assert objective.batches == [4, 2]  # the base and 5 candidates
    assert batched.scores == full.scores and batched.on_front == full.on_front
    assert objective.calls == 0  # score() itself never ran


class AutoBatchedTable(BatchedTable):
    """BatchedTable whose batch size is only known after prepare (as ImplicitReward's auto)."""

    candidates_per_forward = 1

    def prepare(self, policy, datamodule, values):
        self.candidates_per_forward = 3


def test_sweep_sizes_its_batches_after_prepare(policy, tmp_path):
    objective = AutoBatchedTable()
    _sweep(policy, tmp_path, objective=objective)
    assert objective.batches == [3, 3]  # the base and 5 candidates, 3 at a time


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"candidates": [[1.0, 0.5, 0.2]]}, ValueError, r"vector 0 .* has length 3, expected 2"),
        ({"candidates": {"mode": "grid", "start": 1.0, "stop": 0.5}}, ValueError, "is empty"),
        ({"candidates": {"mode": "grid", "setp": 0.1}}, ValueError, r"unknown keys \['setp'\]"),
        ({"reference_point": [0.0, 0.0, 0.0]}, ValueError, r"must have 2 finite entries"),
        ({"reference_point": "median"}, ValueError, r"expected 'base' or a list of 2"),
        ({"save": "some"}, ValueError, r"extrapolation.save: expected one of"),
        ({"values": ["helpful", "humor"]}, ValueError, r"\['humor'\] have no trained vector"),
    ],
)
def test_bad_input_fails_before_any_work(policy, tmp_path, kw, error, message):
    objective = TableObjective()
    values = kw.pop("values", VALUES)
    kw.setdefault("candidates", CANDIDATES)
    with pytest.raises(error, match=message):
        extrapolate(policy, None, values, objective=objective, out_dir=tmp_path / "ext", **kw)
    assert objective.prepared == objective.calls == 0 and not (tmp_path / "ext").exists()


def test_hundred_candidate_grid_on_the_tiny_model(tmp_path):
    policy, backbone = make_policy()
    dm = make_datamodule(backbone.tokenizer, n_val=2)
    start = time.perf_counter()
    result = extrapolate(
        policy,
        dm,
        VALUES,
        {"mode": "grid"},
        ImplicitReward(beta=0.1),
        tmp_path / "ext",
        progress=False,
    )
    seconds = time.perf_counter() - start
    assert len(result.weights) == 100 and result.scored == 101  # the base too
    print(
        f"\n100-candidate grid: {result.candidates_per_s:.1f} candidates/s, {seconds:.1f} s all in"
    )


def test_callback_runs_in_fast_dev_run(toy_data, tmp_path):
    out = tmp_path / "run"
    cfg = compose(
        toy_overrides(
            toy_data, out, "+trainer.fast_dev_run=true", "extrapolation.candidates.step=0.3"
        )
    )
    metrics = train(cfg)
    manifest = json.loads((out / "extrapolation" / "pareto.json").read_text())
    assert len(manifest["rows"]) == 16  # S = {0.1, 0.4, 0.7, 1.0}, K = 2
    assert metrics["pareto/hypervolume"] == pytest.approx(manifest["hypervolume"])
    assert metrics["pareto/num_candidates"] == 16
    assert {"test/helpful", "test/harmless/margin"} <= set(manifest["rows"][0])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (its 3 x 3 grid swept, no report split) and train()'s metrics."""
    root = tmp_path_factory.mktemp("finished")
    data = {
        "helpful": write_hh_file(root / "helpful.jsonl.gz", 24, "Here is a full answer", "No."),
        "harmless": write_hh_file(root / "harmless.jsonl.gz", 24, "I cannot help.", "Sure!"),
    }
    extra = ["extrapolation.candidates.values=[-0.5,1.0,2.0]", "extrapolation.report_split=null"]
    metrics = train(compose(toy_overrides(data, root / "run", *extra)))
    return root / "run", metrics


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished run that a test may sweep into."""
    return Path(shutil.copytree(finished_run[0], tmp_path / "run"))


def _compose_sweep(overrides):
    """conf/sweep.yaml with overrides, as `python -m mva_lightning.sweep` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "mva_lightning" / "conf"), version_base="1.3"):
        return hydra_compose(config_name="sweep", overrides=list(overrides))


def _rerun(run_dir, *overrides):
    """What `python -m mva_lightning.sweep run_dir=RUN_DIR OVERRIDES` runs."""
    cfg = _compose_sweep([f"run_dir={run_dir}", *overrides])
    return rerun(cfg.run_dir, cfg.get("extrapolation"), cfg.device)


def test_short_run_logs_the_front(finished_run):
    out, metrics = finished_run
    assert metrics["pareto/num_candidates"] == 9 and "pareto/candidates_per_s" in metrics
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["pareto/hypervolume"] == pytest.approx(metrics["pareto/hypervolume"])
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "pareto/hypervolume" in header and "pareto/front_size" in header


def test_rerun_with_the_runs_own_settings_scores_nothing_new(run):
    first = json.loads((run / "extrapolation" / "pareto.json").read_text())
    checkpoints = sorted(p.name for p in (run / "extrapolation" / "checkpoints").iterdir())
    again = _rerun(run)
    assert (again.skipped, again.scored) == (10, 0)  # the base + 9, read back from disk
    assert again.on_front == [r["on_front"] for r in first["rows"]]
    assert again.hypervolume == first["hypervolume"] and again.rows() == first["rows"]
    assert sorted(p.name for p in (run / "extrapolation" / "checkpoints").iterdir()) == checkpoints
    assert read_manifest(run / "extrapolation") == again


def test_rerun_with_a_group_replaces_the_runs_settings(run):
    overrides = ["extrapolation=simplex", "extrapolation.candidates.step=0.5"]
    cfg = _compose_sweep([f"run_dir={run}", *overrides, "extrapolation.report_split=null"])
    node = OmegaConf.to_container(cfg.extrapolation)  # unresolved: resolved in the run's config
    assert node["candidates"]["mode"] == "simplex" and node["objective"]["beta"] == "${train.beta}"
    soup = rerun(cfg.run_dir, cfg.extrapolation, cfg.device)
    assert soup.weights == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert (soup.scored, soup.skipped) == (3, 1)  # the base is cached
    assert soup.objective["beta"] == 0.1  # the run's train.beta
    reported = _rerun(run, *overrides)  # simplex.yaml's own report_split: test
    assert reported.report_split == "test" and (reported.scored, reported.skipped) == (0, 4)
    assert "test/helpful" in reported.base_scores and any(reported.report)


def test_rerun_with_a_partial_node_patches_the_runs_settings(run):
    cfg = _compose_sweep([f"run_dir={run}", "+extrapolation.save=all"])
    assert OmegaConf.to_container(cfg.extrapolation) == {"save": "all"}
    again = rerun(cfg.run_dir, cfg.extrapolation, cfg.device)
    assert (again.skipped, again.scored) == (10, 0)  # the run's candidates and objective
    assert again.report_split is None  # the run's report_split=null kept
    assert len(list((run / "extrapolation" / "checkpoints").iterdir())) == 9


def test_sweep_settings_replace_patch_or_default():
    own = {"_target_": "A", "save": "front", "objective": {"_target_": "O", "beta": 0.1}}
    assert sweep_settings(own, None) == own
    assert sweep_settings(own, {"_target_": "B"}) == {"_target_": "B"}
    assert sweep_settings(own, {"save": "all"}) == {**own, "save": "all"}
    patched = sweep_settings(own, {"objective": {"beta": 0.5}})
    assert patched["objective"] == {"_target_": "O", "beta": 0.5}
    other = sweep_settings(own, {"objective": {"_target_": "G", "num_prompts": 4}})
    assert other["objective"] == {"_target_": "G", "num_prompts": 4}  # another class: replaced
    grid = sweep_settings(None, None)  # a run trained without a sweep: conf/extrapolation/grid
    assert grid["_target_"] == "mva_lightning.sweep.ExtrapolationCallback"
    assert grid["objective"]["beta"] == "${train.beta}"  # resolved later, in the run's config
    soup = sweep_settings({"candidates": {"mode": "simplex", "step": 0.1}}, None)
    assert soup["candidates"]["mode"] == "simplex" and soup["candidates"]["start"] == 0.1


def test_rerun_names_what_is_missing(run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such run folder"):
        rerun(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.yaml: no config.yaml"):
        rerun(tmp_path / "empty")
    shutil.rmtree(run / "adapters" / "harmless")
    with pytest.raises(FileNotFoundError, match=r"value vectors not found: .*adapters/harmless"):
        rerun(run)


def _command(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "mva_lightning.sweep", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_writes_only_into_the_run(run, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (run / "extrapolation" / "pareto.json").unlink()
    before = {p for p in run.rglob("*")}
    done = _command(cwd, f"run_dir={run}", "+extrapolation.save=all")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pareto/hypervolume=" in done.stdout
    assert f"manifest: {run / 'extrapolation' / 'pareto.json'}" in done.stdout
    assert read_manifest(run / "extrapolation").skipped == 10
    assert list(cwd.iterdir()) == []  # no outputs/, .hydra/ or log file from Hydra
    new = [p.relative_to(run) for p in run.rglob("*") if p not in before]
    assert Path("extrapolation/pareto.json") in new  # and checkpoints of the whole grid
    assert all(p.parts[0] == "extrapolation" for p in new), new

    failed = _command(cwd, f"run_dir={tmp_path / 'nowhere'}")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: no such run folder; expected a finished training "
        "run's output folder (config.yaml, adapters/<value>/ or a baseline's "
        "adapters/<shared adapter>/)"
    )
    assert list(cwd.iterdir()) == []


def test_callback_runs_once_training_is_finished_on_rank_zero(policy, tmp_path):
    from types import SimpleNamespace

    from mva_lightning.sweep import ExtrapolationCallback

    def fit_end(finished, rank_zero):
        callback = ExtrapolationCallback(CANDIDATES, TableObjective(), report_split=None)
        trainer = SimpleNamespace(
            is_global_zero=rank_zero,
            datamodule=None,
            default_root_dir=str(tmp_path),
            loggers=[],
            global_step=0,
            precision="32-true",
        )
        module = SimpleNamespace(policy=policy, values=VALUES, finished=finished)
        callback.on_fit_end(trainer, module)
        return callback.metrics()

    assert fit_end(finished=False, rank_zero=True) == {}  # stopped before its last stage
    assert fit_end(finished=True, rank_zero=False) == {}  # another rank
    assert fit_end(finished=True, rank_zero=True)["pareto/hypervolume"] == pytest.approx(0.52)


def test_callback_sends_metrics_table_plot_and_summary_to_the_loggers(policy, tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from mva_lightning.sweep import ExtrapolationCallback

    class FakeWandb(WandbLogger):  # records calls; never starts wandb
        def __init__(self):
            self.calls, self.run = [], SimpleNamespace(summary={})

        @property
        def experiment(self):
            return self.run

        def log_metrics(self, metrics, step=None):
            self.calls.append(("metrics", metrics, step))

        def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
            self.calls.append(("table", key, columns, data))

        def log_image(self, key, images, step=None, **kwargs):
            self.calls.append(("image", key, images))

        def save(self):
            pass

    callback = ExtrapolationCallback(CANDIDATES, TableObjective(), report_split=None)
    result = callback.run(policy, None, VALUES, tmp_path)
    logger = FakeWandb()
    trainer = SimpleNamespace(
        callback_metrics={}, loggers=[logger], default_root_dir=str(tmp_path), global_step=7
    )
    callback._log(trainer, result)
    (_, metrics, step), (_, key, columns, data), (_, image_key, images) = logger.calls
    assert step == 7 and metrics["pareto/hypervolume"] == pytest.approx(0.52)
    assert key == "pareto/table" and columns[:3] == ["w/helpful", "w/harmless", "helpful"]
    assert len(data) == 5 and data[0][:2] == [1.0, 0.0]
    assert image_key == "pareto/plot" and images == [str(tmp_path / "extrapolation" / "pareto.png")]
    assert logger.run.summary["pareto/front_size"] == 3
    assert callback.metrics()["pareto/hypervolume"] == pytest.approx(0.52)
    assert trainer.callback_metrics == {}  # train() reads callback.metrics() instead
    assert ExtrapolationCallback(CANDIDATES, TableObjective()).metrics() == {}  # not run yet


def test_every_score_carries_its_interval_and_the_base_is_chance(toy_data, tmp_path):
    out = tmp_path / "run"
    extra = ["extrapolation.candidates.values=[0.5,1.0]", "optimizer.lr=1e-3"]
    metrics = train(compose(toy_overrides(toy_data, out, *extra)))
    manifest = json.loads((out / "extrapolation" / "pareto.json").read_text())
    assert manifest["bootstrap"] == {"resamples": 1000, "level": 0.95, "seed": 60}
    base = manifest["base_scores"]
    for v in ("helpful", "harmless"):
        assert base[v] == 0.5 and base[f"{v}/ci"] == [0.5, 0.5]  # every margin 0: all ties
        n = base[f"{v}/n"]
        assert n >= 2 and base[f"test/{v}/n"] >= 2
        for row in manifest["rows"]:
            lo, hi = row[f"{v}/ci"]
            assert 0.0 <= lo <= row[v] <= hi <= 1.0 and row[f"{v}/n"] == n
            if row["on_front"]:
                assert row[f"test/{v}/ci"][0] <= row[f"test/{v}"] <= row[f"test/{v}/ci"][1]
        better = manifest["improvement"][v]
        assert better["difference"] == pytest.approx(better["best"] - better["base"])
        assert better["significant"] == (better["ci"][0] > 0 or better["ci"][1] < 0)
    lo, hi = manifest["hypervolume_ci"]
    assert lo <= hi and metrics["pareto/hypervolume_low"] == lo
    header = (out / "extrapolation" / "pareto.csv").read_text().splitlines()[0]
    assert "helpful/ci" in header and "harmless/n" in header
    again = rerun(out, {"report_split": "test"})  # every score read back: the same intervals
    assert again.scored == 0 and again.hypervolume_ci == manifest["hypervolume_ci"]
    assert again.intervals[0]["helpful/ci"] == manifest["rows"][0]["helpful/ci"]


def test_a_run_ends_with_its_summary_and_model_cards(toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(compose(toy_overrides(toy_data, out, "extrapolation.candidates.values=[0.5,1.0]")))
    manifest = json.loads((out / "extrapolation" / "pareto.json").read_text())
    text = (out / "summary.md").read_text()
    assert capsys.readouterr().out.rstrip().endswith(text.rstrip())  # the last words printed
    assert f"hypervolume {manifest['hypervolume']:.3g}" in text
    assert f"Pareto front: {manifest['front_size']} of {len(manifest['rows'])}" in text
    for value, imp in manifest["improvement"].items():  # the honesty table, one row a value
        word = "significant" if imp["significant"] else "no detectable difference"
        assert any(line.startswith(f"| {value} |") and word in line for line in text.splitlines())
    row = next(r for r in manifest["rows"] if r["on_front"])
    card = (out / row["checkpoint"] / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    assert f"| test/helpful | {row['test/helpful']:.4g} |" in card
    none = tmp_path / "none"
    train(compose(toy_overrides(toy_data, none, "extrapolation=none")))
    assert "no Pareto sweep" in (none / "summary.md").read_text()


def test_the_base_and_every_front_point_answer_held_out_prompts(toy_data, tmp_path):
    out = tmp_path / "run"
    extra = [
        "extrapolation.candidates.values=[0.5,1.0]",
        "extrapolation.samples.num_prompts=2",
        "extrapolation.samples.max_new_tokens=4",
    ]
    train(compose(toy_overrides(toy_data, out, *extra)))
    manifest = json.loads((out / "extrapolation" / "pareto.json").read_text())
    lines = (out / "extrapolation" / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    front = [[r["w/helpful"], r["w/harmless"]] for r in manifest["rows"] if r["on_front"]]
    assert len(records) == 2 * (1 + len(front))  # two prompts per point, the base first
    assert records[0]["w"] == [0.0, 0.0] and records[0]["base"] and not records[2]["base"]
    assert [r["w"] for r in records[2::2]] == front
    assert records[0]["prompt"] != records[1]["prompt"]
    assert all(isinstance(r["response"], str) for r in records)
    none = tmp_path / "none"
    train(compose(toy_overrides(toy_data, none, *extra[:1], "extrapolation.samples.num_prompts=0")))
    assert not (none / "extrapolation" / "samples.jsonl").exists()


class RatedObjective(TableObjective):
    """TABLE scores over three shared items, plus an indicator 'flag' counted on two of them:
    1 on both for candidates with w_harmless >= 1, else 0 (NaN on the third item)."""

    shared_items = True

    def score(self, policy, datamodule, values):
        from mva_lightning.sweep.objectives import Scores

        w = tuple(round(x, 6) + 0.0 for x in lora.get_weights(policy).values())
        a, b = TABLE[w]
        flag = 1.0 if w[1] >= 1.0 else 0.0
        per_item = {"helpful": [a] * 3, "harmless": [b] * 3, "flag": [flag, flag, float("nan")]}
        return Scores({"helpful": a, "harmless": b, "flag": flag}, per_item)

    def for_split(self, split):
        return RatedObjective(split=split)


def test_indicators_get_intervals_on_both_splits_and_never_move_the_front(policy, tmp_path):
    got = _sweep(policy, tmp_path / "x", objective=RatedObjective(), report_split="test")
    assert got.on_front == FRONT  # the indicator is no objective
    manifest = json.loads((tmp_path / "x" / "pareto.json").read_text())
    by_w = {(r["w/helpful"], r["w/harmless"]): r for r in manifest["rows"]}
    assert by_w[0.0, 1.0]["flag"] == 1.0 and by_w[0.0, 1.0]["flag/ci"] == [1.0, 1.0]
    assert by_w[1.0, 0.0]["flag/n"] == 2 and by_w[1.0, 0.0]["test/flag/ci"] == [0.0, 0.0]
    assert got.base_scores["flag"] == 0.0 and got.base_scores["test/flag/n"] == 2
    table = {tuple(r["w"]): r for r in manifest["behaviour"]["flag"]}  # the front on test
    assert list(table) == [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    assert table[0.0, 1.0]["difference"] == 1.0 and table[0.0, 1.0]["significant"]
    assert table[1.0, 0.0]["difference_ci"] == [0.0, 0.0] and not table[1.0, 0.0]["significant"]


def test_scores_under_mixed_precision_get_their_own_cache(policy, tmp_path):
    fp32 = _sweep(policy, tmp_path / "ext")
    with autocast("bf16-mixed", "cpu"):
        mixed = _sweep(policy, tmp_path / "ext")
    assert mixed.skipped == 0 and mixed.scored == fp32.scored  # nothing read from fp32's cache
    assert len(list((tmp_path / "ext" / "scores").iterdir())) == 2
    again = _sweep(policy, tmp_path / "ext")  # fp32 again: its own cache, every score read
    assert again.scored == 0 and again.skipped == fp32.scored
