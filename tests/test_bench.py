"""The benchmark scripts: their bookkeeping on hand-made numbers (fast), and each script run end
to end at a minimal size (slow; it must work, timings are not asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO
from omegaconf import OmegaConf

EXPERIMENTS = REPO / "experiments"
LN2 = math.log(2)


@pytest.fixture
def bench(monkeypatch):
    """The experiments' modules (scripts in a folder, imported as the scripts import them)."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import _bench_utils
    import bench_scaling
    import bench_train

    return _bench_utils, bench_train, bench_scaling


def test_step_clock_excludes_warmup_and_counts_tokens(bench):
    bu, _, _ = bench
    clock = bu.StepClock(warmup=1)
    clock.starts = [10.0, 12.0, 13.0]
    clock.ends = [12.0, 13.0, 14.0]  # warm-up step takes 2 s, then 1 s per step
    clock.cpu_ends = [3.0, 5.0, 7.0]
    clock.tokens = [100, 40, 60]
    clock.losses = [0.6931, 0.6, 0.5]
    s = clock.summary(t_ready=4.0)
    assert s["steps_per_s"] == pytest.approx(1.0) and s["timed_steps"] == 2
    assert s["response_tokens_per_s"] == pytest.approx(50.0)  # (40 + 60) / 2 s
    assert s["cpu_s_per_step"] == pytest.approx(2.0)
    assert s["setup_s"] == pytest.approx(6.0) and s["first_loss"] == 0.6931
    with pytest.raises(RuntimeError, match="warmup"):
        bu.StepClock(warmup=3).summary(0.0)


def _run(name, side, steps_per_s, rss, loss=LN2, **extra):
    return {
        "name": name,
        "side": side,
        "steps": 5,
        "steps_per_s": steps_per_s,
        "s_per_step": 1 / steps_per_s,
        "cpu_s_per_step": 2 / steps_per_s,
        "step_s_min": 0.9 / steps_per_s,
        "step_s_median": 1 / steps_per_s,
        "load_before": 1.0,
        "response_tokens_per_s": 100 * steps_per_s,
        "peak_rss_mib": rss,
        "setup_s": 1.0,
        "first_loss": loss,
        "last_loss": 0.5,
        **extra,
    }


def test_summary_takes_medians_and_compares_with_the_best_trl(bench):
    _, bt, _ = bench
    trl = {"tokens_match_ours": True, "lora_b_zero_init": True, "reference": "adapters disabled"}
    results = [
        _run("ours", "ours", 4.0, 500, lora_a_checksum=1.5),
        _run("ours", "ours", 2.0, 520, lora_a_checksum=1.5),
        _run("ours", "ours", 3.0, 510, lora_a_checksum=1.5),
        _run("trl/fp32", "trl", 1.0, 600, lora_a_checksum=1.5, **trl),
        _run("trl/fp32+precompute-ref", "trl", 1.5, 650, lora_a_checksum=1.5, **trl),
    ]
    summary = bt.summarise(results)
    ours = next(r for r in summary["rows"] if r["config"] == "ours")
    assert ours["steps_per_s"] == 3.0 and ours["peak_rss_mib"] == 510 and ours["runs"] == 3
    head = summary["headline"]
    assert head["best_trl"] == "trl/fp32+precompute-ref"
    assert head["speedup_vs_best_trl"] == pytest.approx(2.0)
    assert head["speedup_median_step"] == pytest.approx(2.0)
    assert head["peak_rss_ratio"] == pytest.approx(510 / 650)
    assert all(bt.checks(results).values())
    results[3]["first_loss"] = 0.7
    results[4]["tokens_match_ours"] = False
    bad = bt.checks(results)
    assert not bad["first_loss_is_ln2"] and not bad["tokens_match"]


def test_bench_pairs_fit_the_lengths_and_tokenise_alike(bench):
    from mva_lightning.model.backbones import byte_tokenizer

    _, bt, _ = bench
    tok = byte_tokenizer()
    spec = {"max_length": 64, "max_prompt_length": 32}
    rows = bt.make_pairs(tok, 6, spec["max_length"], spec["max_prompt_length"], seed=0)
    assert len(rows) == 6 and len({r["prompt"] for r in rows}) == 6
    for (p, c, r), row in zip(bt.our_token_ids(rows, tok, spec), rows, strict=True):
        assert len(p) <= 32 and len(p) + max(len(c), len(r)) <= 64  # nothing truncated
        assert c[-1] == r[-1] == tok.eos_token_id
        # Together (TRL) or apart (ours): the same ids.
        assert tok(row["prompt"] + row["chosen"])["input_ids"] == p + c[:-1]


def test_scaling_ratios_against_expected(bench):
    _, _, bs = bench
    rows = [
        {"sweep": "values", "x": 1, "fit_s": 2.0, "expected": 1},
        {"sweep": "values", "x": 2, "fit_s": 4.4, "expected": 2},
        {"sweep": "candidates", "x": 9, "sweep_s": 1.0, "expected": 10},
        {"sweep": "candidates", "x": 25, "sweep_s": 2.6, "expected": 26},
    ]
    bs.add_ratios(rows)
    assert rows[1]["measured_ratio"] == pytest.approx(2.2) and rows[1]["expected_ratio"] == 2
    assert rows[1]["ratio_of_ratios"] == pytest.approx(1.1)
    assert rows[3]["time_s"] == 2.6 and rows[3]["expected_ratio"] == pytest.approx(2.6)


def _script(name, out, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(EXPERIMENTS / name), "--quick", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_train_runs_at_minimal_size(tmp_path):
    pytest.importorskip("trl")
    configs = "ours,bare/torch-loop,trl/fp32+precompute-ref,trl/fp32+precompute-ref+group-by-length"
    out = tmp_path / "bench_train.json"
    report = _script("bench_train.py", out, "--models", "tiny", "--reps", "1", "--configs", configs)
    tiny = report["models"]["tiny"]
    assert all(tiny["checks"].values()), tiny["checks"]  # same job on both sides
    names = {r["config"] for r in tiny["rows"]}
    assert names == set(configs.split(","))
    assert tiny["headline"]["speedup_vs_best_trl"] > 0


@pytest.mark.slow
def test_bench_scaling_runs_at_minimal_size(tmp_path):
    report = _script("bench_scaling.py", tmp_path / "bench_scaling.json")
    sweeps = {(r["sweep"], r["x"]) for r in report["rows"]}
    assert sweeps == {("values", 1), ("values", 2), ("values_hsic", 2), ("pairs", 4)} | {
        ("pairs", 8),
        ("candidates", 4),
        ("candidates", 9),
        ("sweep_processes", 1),
        ("sweep_processes", 2),
    }
    assert all(r["peak_rss_mib"] > 0 and r["time_s"] > 0 for r in report["rows"])
    # The sweep on 1 and 2 processes (gloo ranks): every candidate scored once, same scores.
    sharded = [r for r in report["rows"] if r["sweep"] == "sweep_processes"]
    assert sorted(r["processes"] for r in sharded) == [1, 2]
    assert all(r["same_front"] and r["scored"] == r["candidates"] + 1 == 5 for r in sharded)
    assert report["sweep_processes"]["2"]["same_front"]
    assert report["sweep_processes"]["2"]["candidates_per_s"] > 0


@pytest.mark.slow
def test_bench_extrapolation_runs_at_minimal_size(tmp_path):
    report = _script("bench_extrapolation.py", tmp_path / "bench_extrapolation.json")
    rows = {r["objective"]: r for r in report["rows"]}
    assert set(rows) == {"implicit", "generation"}
    for r in rows.values():
        assert r["candidates"] == 4 and r["paper_candidates_timed"] == 2
        assert r["ratio"] == pytest.approx(r["ours_candidates_per_s"] / r["paper_candidates_per_s"])
        # The paper path's time per candidate splits into its reloads and its scoring.
        total = r["paper_reload_s_per_candidate"] + r["paper_scoring_s_per_candidate"]
        assert total == pytest.approx(1 / r["paper_candidates_per_s"])
        scoring_ratio = r["paper_scoring_s_per_candidate"] / r["ours_s_per_candidate"]
        assert r["ratio_vs_paper_scoring"] == pytest.approx(scoring_ratio)


@pytest.mark.slow
def test_decorrelation_study_runs_at_minimal_size(tmp_path):
    out = tmp_path / "decorrelation_study.json"
    report = _script("decorrelation_study.py", out, "--workdir", str(tmp_path / "runs"))
    penalties = {r["penalty"] for r in report["rows"]}
    assert penalties == set(report["settings"]["penalties"]) | {"(untrained)"}
    # The tiny model on plain-text toy pairs, whatever the top-level default model is.
    configs = [OmegaConf.load(p) for p in (tmp_path / "runs").rglob("config.yaml")]
    assert configs and all(c.model.loader._target_.endswith("tiny_llama") for c in configs)
    assert not any(c.data.loader.chat_template for c in configs)
