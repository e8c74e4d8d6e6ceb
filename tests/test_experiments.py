"""Every experiment config composes and runs a fast_dev_run on the tiny model with local data."""

import json
from pathlib import Path

import pytest
from conftest import REPO, compose, real_data_file

from mva_lightning.train import train

CONF = REPO / "mva_lightning" / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
FAST = [
    "model=tiny",
    "trainer=cpu",
    "+trainer.fast_dev_run=true",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "data.loader.max_length=64",
    "data.loader.max_prompt_length=40",
    "data.loader.batch_size=2",
]
SWEEP = [
    "extrapolation.candidates.mode=explicit",
    "extrapolation.candidates.vectors=[[0.5,0.5],[1.0,1.5]]",
    "extrapolation.report_split=null",
]
GEN = ["extrapolation.objective.num_prompts=2", "extrapolation.objective.max_new_tokens=4"]


def _hh(value: str, part: str) -> list[str]:
    path = real_data_file("hh-rlhf", f"{part}-base-test.jsonl.gz")
    return [f"value.{value}.source.files=[{path}]", f"value.{value}.source.max_rows=60"]


def _overrides(name: str, tmp: Path) -> list[str]:
    common = [f"+experiment={name}", f"paths.output_dir={tmp / 'run'}", *FAST]
    offline = ["scorer@value.helpful.scorer=relevance", "scorer@value.harmless.scorer=harmlessness"]
    if name == "hh_2values":
        return (
            common + _hh("helpful", "helpful") + _hh("harmless", "harmless") + offline + SWEEP + GEN
        )
    if name == "hh_study":  # the reward models need SmolLM2: cheap scorers stand in
        return (
            common
            + _hh("helpful", "helpful")
            + _hh("harmless", "harmless")
            + offline
            + GEN
            + [
                "data.loader.chat_template=false",
                "extrapolation.candidates.values=[0.0,1.0]",
                "extrapolation.report_split=null",
            ]
        )
    if name == "hh_3values":
        humor_file = real_data_file("hh-rlhf", "helpful-base-test.jsonl.gz")
        three = SWEEP[:1] + ["extrapolation.candidates.vectors=[[0.5,0.5,0.5],[1,1,1.5]]", SWEEP[2]]
        return (
            common
            + _hh("helpful", "helpful")
            + _hh("harmless", "harmless")
            + offline
            + three
            + GEN
            + [
                "scorer@value.humor.scorer=sentiment",
                f"value.humor.source.source.files=[{humor_file}]",
                "value.humor.source.source.max_rows=60",
            ]
        )
    if name == "beavertails_2values":
        pku = real_data_file("pku-saferlhf", "sample-17.jsonl")
        return (
            common
            + SWEEP
            + GEN
            + [
                f"value.pku_helpful.source.files=[{pku}]",
                f"value.pku_harmless.source.files=[{pku}]",
                "scorer@value.pku_helpful.scorer=relevance",
                "scorer@value.pku_harmless.scorer=harmlessness",
                "data.split.test=0.2",
                "data.split.val=0.2",
                "data.split.by_prompt=false",
            ]
        )
    if name.startswith("embedded"):
        small = [
            f"value.{v}.source.{k}"
            for v in ("helpful", "harmless", "positive")
            for k in ("num_samples=2", "max_new_tokens=6", "margin=-1.0", "chat_template=false")
        ]
        return (
            common
            + small
            + [
                "data.loader.chat_template=false",
                "extrapolation.candidates.values=[0.0,1.0]",
                "extrapolation.report_split=null",
                *GEN,
            ]
        )
    raise AssertionError(f"no test overrides for experiment {name!r}: add them here")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_fast_dev_run(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MVA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    metrics = train(compose(_overrides(name, tmp_path)))
    assert (out / "config.yaml").is_file()
    cfg = compose(_overrides(name, tmp_path))
    for value in cfg.value:
        assert (out / "adapters" / value / "adapter_model.safetensors").is_file()
    assert (out / "extrapolation" / "pareto.csv").is_file()
    assert "pareto/hypervolume" in metrics


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_can_turn_its_sweep_off(name):
    """`+experiment=NAME extrapolation=none` composes, and train() then builds no sweep."""
    cfg = compose([f"+experiment={name}", "extrapolation=none"])
    node = cfg.get("extrapolation")
    assert node is None or "_target_" not in node  # what train() reads as "no sweep"
    assert "_target_" in compose([f"+experiment={name}"]).extrapolation


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_can_switch_to_the_implicit_reward_sweep(name):
    """`+experiment=NAME extrapolation=grid` gives the plain implicit-reward objective: an
    experiment's own sweep settings live in its extrapolation group option, not in keys that
    would leak into another objective."""
    plain = compose(["extrapolation=grid"]).extrapolation.objective
    objective = compose([f"+experiment={name}", "extrapolation=grid"]).extrapolation.objective
    assert objective._target_ == plain._target_
    assert set(objective) <= set(plain), sorted(set(objective) - set(plain))


def test_reward_model_script_asks_for_the_data_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import train_reward_model

    with pytest.raises(SystemExit):
        train_reward_model.parse_args([])
    assert "no file for helpful: pass --data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_reward_model.parse_args(["--data-dir", str(tmp_path)])
    assert "helpful-base-test.jsonl.gz: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_reward_model.parse_args(["--files", "funny=x.jsonl"])
    assert "expected VALUE=PATH" in capsys.readouterr().err


def test_reward_model_script_trains_saves_and_reports_on_the_study_split(monkeypatch, tmp_path):
    """The whole script on toy pairs in the HH-RLHF layout, with a tiny LM as the frozen
    encoder: the study's split, the ridge chosen by cross-validation, the heads written and
    loadable, held-out accuracy above chance with its interval."""
    import functools

    from mva_lightning.model.backbones import tiny_llama
    from mva_lightning.scorers import BradleyTerry, hidden_states

    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    monkeypatch.setenv("MVA_CACHE", str(tmp_path / "cache"))
    import compare_methods
    import train_reward_model

    @functools.cache
    def tiny(model, layer):
        backbone = tiny_llama(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
        return backbone.model.eval(), backbone.tokenizer  # no chat template: raw transcripts

    monkeypatch.setattr(hidden_states, "_truncated_lm", tiny)
    toy = compare_methods.toy_files(tmp_path / "toy", n=120)
    files = [f"{value}={path}" for value, path in toy.items()]
    rows = train_reward_model.main(
        ["--files", *files, "--model", "tiny", "--layer", "2", "--resamples", "200"]
        + ["--models-out", str(tmp_path / "rm"), "--out", str(tmp_path / "rm.json")]
    )
    heads = [r for r in rows if r["scorer"].startswith("SmolLM2")]
    assert [r["value"] for r in heads] == ["helpful", "harmless"]
    for row in heads:
        lo, hi = row["test"]["ci"]
        assert lo <= row["test"]["mean"] <= hi and row["test"]["n"] >= 10
        assert row["test"]["mean"] > 0.75 and row["l2"] in train_reward_model.L2_GRID
        assert set(row["cv_acc"]) == set(train_reward_model.L2_GRID)
    loaded = BradleyTerry.load(tmp_path / "rm" / "harmless", lm_loader=tiny)
    assert loaded.metrics["test_acc"] == heads[1]["test"]["mean"]
    prompt = "\n\nHuman: Tell me how to steal a car (1).\n\nAssistant:"
    refuse, comply = loaded(
        [prompt] * 2, [" I cannot help with that, sorry.", " Sure, first maps."]
    )
    assert refuse > comply  # harmless prefers the refusal on a risky prompt
    report = json.loads((tmp_path / "rm.json").read_text())
    assert str(tmp_path) not in report["command"] and report["files"]["helpful"]["sha256"]
