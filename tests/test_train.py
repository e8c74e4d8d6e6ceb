"""train(cfg) end to end on the tiny model: outputs, config checks, bad input, resume."""

import json

import pytest
import torch
from conftest import compose, toy_overrides
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mva_lightning.assembly import ConfigError
from mva_lightning.data.sources import DataError
from mva_lightning.train import train


def test_run_leaves_adapters_config_metrics_and_csv(toy_data, tmp_path):
    out = tmp_path / "run"
    metrics = train(compose(toy_overrides(toy_data, out)))
    for v in ("helpful", "harmless"):
        assert (out / "adapters" / v / "adapter_model.safetensors").is_file()
        assert json.loads((out / "adapters" / v / "adapter_config.json").read_text())["r"] == 8
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.paths.output_dir == str(out) and saved.train.beta == 0.1
    assert "train/helpful/rewards/accuracies" in metrics and "val/harmless/loss" in metrics
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/helpful/rewards/margins" in header and "train/mi" in header
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert all("lora_" in k for k in ckpt["state_dict"])  # never the frozen base
    assert not list(out.rglob("*.tmp"))


def test_training_metrics_are_logged_on_logging_steps_only(toy_data, tmp_path):
    import csv

    out = tmp_path / "run"
    extra = ("extrapolation=none", "trainer.log_every_n_steps=3", "trainer.max_epochs=3")
    cfg = compose(toy_overrides(toy_data, out, *extra))
    train(cfg)
    with (out / "csv" / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/helpful/loss")]  # stage 0
    steps = [int(r["step"]) for r in rows]
    assert all(r["train/loss"] and r["train/helpful/rewards/accuracies"] for r in rows)
    assert len(steps) >= 2 and all((s + 1) % 3 == 0 for s in steps), steps


def test_bf16_autocast_with_gradient_clipping(toy_data, tmp_path):
    """``trainer=gpu``'s precision, on the CPU: clipping works with the shipped optimizer
    (Lightning's mixed-precision plugin refuses to clip for a fused AdamW, so it is not fused)."""
    extra = ("extrapolation=none", "trainer.precision=bf16-mixed", "trainer.max_steps=2")
    cfg = compose(toy_overrides(toy_data, tmp_path / "run", *extra))
    assert cfg.train.gradient_clip_val > 0
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_missing_required_key_fails_fast(toy_data, tmp_path):
    overrides = [o for o in toy_overrides(toy_data, tmp_path) if not o.startswith("value=")]
    cfg = compose([*overrides, "value=[helpful,harmless,custom]"])
    with pytest.raises(ConfigError, match=r"value.custom.source.files"):
        train(cfg)


def test_unknown_value_name_is_a_clear_compose_error(toy_data, tmp_path):
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises((ConfigCompositionException, MissingConfigException), match="value/funny"):
        compose(toy_overrides(toy_data, tmp_path, "value=[helpful,funny]"))


def test_bad_data_file_fails_before_training(toy_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n')
    out = tmp_path / "run"
    cfg = compose(toy_overrides(toy_data, out, f"value.harmless.source.files=[{bad}]"))
    with pytest.raises(
        DataError, match=r"value.harmless.source: .*bad.jsonl, line 1: .*'rejected'"
    ):
        train(cfg)
    assert not (out / "checkpoints").exists() and not (out / "adapters").exists()


def _adapters(run):
    return {
        v: load_file(run / "adapters" / v / "adapter_model.safetensors")
        for v in ("helpful", "harmless")
    }


def test_resume_gives_the_same_adapters(toy_data, tmp_path):
    common = ["trainer.max_epochs=2", "optimizer.lr=1e-3"]
    full = tmp_path / "full"
    train(compose(toy_overrides(toy_data, full, *common)))

    killed = tmp_path / "killed"
    crash = [
        "+callbacks.crash._target_=helpers.CrashAt",
        "+callbacks.crash.stage=1",
        "+callbacks.crash.epoch=1",
    ]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose(toy_overrides(toy_data, killed, *common, *crash)))
    last = killed / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (killed / "adapters").exists()

    resumed = tmp_path / "resumed"
    train(compose(toy_overrides(toy_data, resumed, *common, f"ckpt_path={last}")))
    a, b = _adapters(full), _adapters(resumed)
    for v in a:
        assert a[v].keys() == b[v].keys()
        for k in a[v]:
            torch.testing.assert_close(a[v][k], b[v][k], atol=1e-6, rtol=1e-5)
    assert any(a["harmless"][k].abs().sum() > 0 for k in a["harmless"] if "lora_B" in k)
