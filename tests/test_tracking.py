"""W&B runs record the resolved config, a group per multirun sweep and method/setting tags."""

from __future__ import annotations

from conftest import compose

from mva_lightning import tracking


def test_a_single_run_records_the_resolved_config_and_tags():
    cfg = compose(["method=soup", "optimizer.lr=0.003", "paths.output_dir=out"])
    got = tracking.wandb_settings(cfg)
    assert got["config"]["optimizer"]["lr"] == 0.003
    assert got["config"]["seed"] == cfg.seed and "model" in got["config"]
    assert got["group"] == "default"
    assert "method:soup" in got["tags"] and "setting:default" in got["tags"]


def test_multirun_jobs_share_a_group_and_explicit_settings_win(monkeypatch):
    runtime = ({"experiment": "hh_2values", "model": "tiny"}, "multirun/2026-12-01/10-00-00")
    monkeypatch.setattr(tracking, "_hydra_runtime", lambda: runtime)
    got = tracking.wandb_settings(compose(["paths.output_dir=out"]))
    assert got["group"] == "hh_2values/2026-12-01_10-00-00"
    assert "setting:hh_2values" in got["tags"] and "model:tiny" in got["tags"]
    mine = tracking.wandb_settings(
        compose(["logger.wandb.group=g", "logger.wandb.tags=[a]", "paths.output_dir=out"])
    )
    assert mine["group"] == "g" and mine["tags"] == ["a"]


def test_the_wandb_logger_takes_them(tmp_path):
    from hydra.utils import instantiate

    cfg = compose([f"paths.output_dir={tmp_path}"])
    logger = instantiate(cfg.logger.wandb, _partial_=True)(**tracking.wandb_settings(cfg))
    assert logger._wandb_init["group"] == "default"
    assert logger._wandb_init["config"]["optimizer"]["lr"] == cfg.optimizer.lr
