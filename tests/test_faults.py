"""Faults: a full disk during a write, a sweep killed with SIGKILL, a loss that turns NaN."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose, make_policy, toy_overrides
from safetensors.torch import load_file

import mva_lightning.training.module as module_mod
from mva_lightning.io import write_json
from mva_lightning.model import lora
from mva_lightning.train import train
from mva_lightning.training.export import SaveValueVectors


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ------------------------------------------------------------------------ a full disk
def test_disk_full_while_writing_a_file_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "extrapolation" / "pareto.json"
    write_json(target, {"rows": [1, 2], "hypervolume": 0.5})
    before = _listing(tmp_path)
    real_write_text = Path.write_text

    def half_then_full(self, text, *args, **kwargs):  # half the bytes land, then ENOSPC
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        _disk_full()

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError) as raised:
        write_json(target, {"rows": [3, 4, 5], "hypervolume": 0.9})
    assert raised.value.errno == errno.ENOSPC
    assert _listing(tmp_path) == before  # the old pareto.json, no temporary beside it
    monkeypatch.undo()

    monkeypatch.setattr(os, "replace", _disk_full)  # the rename itself fails
    with pytest.raises(OSError):
        write_json(target, {"rows": [3]})
    assert _listing(tmp_path) == before


def test_disk_full_while_writing_an_adapter_folder_keeps_the_previous_one(tmp_path, monkeypatch):
    import peft.peft_model

    policy, _ = make_policy()
    folder = tmp_path / "adapters"
    lora.save_value_vectors(policy, folder, ["helpful"])
    before = _listing(tmp_path)
    assert "adapters/helpful/adapter_model.safetensors" in before
    with torch.no_grad():  # a different vector, that must not land
        lora.adapter_parameters(policy, "helpful")[-1].add_(1.0)

    real_save = peft.peft_model.safe_save_file

    def half_then_full(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as fh:  # the file is cut short, then the disk is full
            fh.truncate(os.path.getsize(filename) // 2)
        _disk_full()

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_full)
    with pytest.raises(OSError) as raised:
        lora.save_value_vectors(policy, folder, ["helpful"])
    assert raised.value.errno == errno.ENOSPC
    assert _listing(tmp_path) == before  # the old adapter, no .helpful.*.tmp folder
    monkeypatch.undo()

    # the new folder is complete but the rename onto the old one fails: the old one stays
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> .helpful.old done; tmp -> helpful fails
            _disk_full()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        lora.save_value_vectors(policy, folder, ["helpful"])
    assert _listing(tmp_path) == before
    assert sorted(p.name for p in folder.iterdir()) == ["helpful"]  # no .old, no .tmp


# ------------------------------------------------------------- a sweep killed with SIGKILL
SWEEP = (
    # a 10 x 10 grid scored one candidate per forward: slow enough to be killed half-way
    "+extrapolation.candidates.values=[-1.0,-0.6,-0.2,0.2,0.4,0.6,0.8,1.0,1.2,1.4]",
    "+extrapolation.objective.candidates_per_forward=1",
    "+extrapolation.report_split=null",
    "+extrapolation.samples.num_prompts=0",
    "+extrapolation.bootstrap.resamples=50",
)
TIMING = {"seconds", "candidates_per_s", "scored", "skipped"}


def _rerun(run: Path):
    """What `python -m mva_lightning.sweep run_dir=RUN *SWEEP` runs, in this process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mva_lightning.sweep.cli import rerun

    conf = REPO / "mva_lightning" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose(config_name="sweep", overrides=[f"run_dir={run}", *SWEEP])
    return rerun(cfg.run_dir, cfg.get("extrapolation"), cfg.device)


def _manifest(run: Path) -> dict:
    data = json.loads((run / "extrapolation" / "pareto.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMING}


def _kill_when(proc: subprocess.Popen, scores: Path, n: int, timeout: float) -> threading.Thread:
    """A thread that SIGKILLs ``proc`` once ``n`` score files exist under ``scores``."""

    def watch():
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(scores.rglob("w_*.json"))) >= n:
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigkill_during_a_sweep_then_rerun_gives_the_same_front(toy_data, tmp_path):
    run = tmp_path / "run"
    train(compose(toy_overrides(toy_data, run, "extrapolation=none", "trainer.max_steps=2")))
    copy = Path(shutil.copytree(run, tmp_path / "copy"))

    command = [sys.executable, "-m", "mva_lightning.sweep", f"run_dir={run}", *SWEEP]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    try:
        # the base and 3 candidates scored: killed; meanwhile the uninterrupted sweep of the copy
        watcher = _kill_when(proc, run / "extrapolation" / "scores", 4, timeout=120)
        full = _rerun(copy)
        watcher.join()
    finally:
        proc.kill()  # no-op once killed
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it was killed"
    files = list((run / "extrapolation" / "scores").rglob("w_*.json"))
    written = len(files)
    assert 4 <= written < 101 and not (run / "extrapolation" / "pareto.json").exists()
    assert all("scores" in json.loads(f.read_text()) for f in files)  # none half-written
    # a kill inside a write may leave that write's temporary (never a partial score file)
    stray = set(run.rglob("*.tmp"))
    assert len(stray) <= 1, stray

    resumed = _rerun(run)  # read back what the killed sweep wrote, score the rest
    assert resumed.skipped == written and resumed.scored + resumed.skipped == 101
    assert (full.skipped, full.scored) == (0, 101) and len(full.weights) == 100
    got, want = _manifest(run), _manifest(copy)
    assert got == want  # rows (scores, front, checkpoints), hypervolume, intervals
    assert (run / "extrapolation" / "pareto.csv").read_text() == (
        copy / "extrapolation" / "pareto.csv"
    ).read_text()
    assert set(run.rglob("*.tmp")) <= stray  # the sweep itself left none


# ------------------------------------------------------------------------ a loss turns NaN
def _nan_from_call(monkeypatch, n: int, what: float = float("nan")) -> None:
    """The module's DPO loss turns ``what`` from its n-th training call on."""
    real, calls = module_mod.dpo_loss, []

    def dpo_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) >= n:
                out.loss = out.loss * what
        return out

    monkeypatch.setattr(module_mod, "dpo_loss", dpo_loss)


@pytest.mark.parametrize("what", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_run_naming_the_step(toy_data, tmp_path, monkeypatch, what):
    _nan_from_call(monkeypatch, 3, what)  # stage 0 (helpful) trains one value: step 2
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as raised:
        train(compose(toy_overrides(toy_data, out, "extrapolation=none")))
    message = str(raised.value)
    assert f"non-finite training loss {what}" in message
    assert "at step 2 " in message and "in stage 0 (values ['helpful'])" in message
    assert f"dpo[helpful]={what}" in message and "lower optimizer.lr" in message
    assert not list(out.rglob("*.safetensors"))  # no adapter written
    last = out / "checkpoints" / "last.ckpt"
    if last.exists():  # what was saved holds no NaN
        state = torch.load(last, weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values())


def test_export_refuses_adapters_holding_nan(tmp_path):
    policy, _ = make_policy()
    with torch.no_grad():
        lora.adapter_parameters(policy, "harmless")[0].view(-1)[0] = float("nan")

    class Module:  # what SaveValueVectors reads of the LightningModule
        adapter_names = ["helpful", "harmless"]
        finished = True

    Module.policy = policy

    class Trainer:
        is_global_zero = True

    callback = SaveValueVectors(tmp_path / "adapters")
    with pytest.raises(FloatingPointError, match=r"value vector 'harmless' has 1 non-finite"):
        callback.on_train_end(Trainer(), Module())
    assert not (tmp_path / "adapters").exists()  # not even the finite 'helpful'
    with torch.no_grad():
        lora.adapter_parameters(policy, "harmless")[0].view(-1)[0] = 0.0
    callback.on_train_end(Trainer(), Module())
    saved = load_file(tmp_path / "adapters" / "harmless" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


# ------------------------------- killed while computing reference log-probs or diagnostics
RESUME = (
    "mi=hsic",
    "trainer.max_epochs=2",
    "extrapolation.candidates.mode=explicit",
    "extrapolation.candidates.vectors=[[0.5,0.5],[1.0,1.5],[1.5,0.5]]",
    "extrapolation.report_split=null",
    "extrapolation.bootstrap.resamples=50",
)


def _crash_in(monkeypatch, where: str) -> None:
    """Raise where a run would be killed: stage 1's reference pass, or the diagnostics."""
    from mva_lightning.diagnostics.callback import InterferenceDiagnostics

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    if where == "diagnostics":
        monkeypatch.setattr(InterferenceDiagnostics, "on_fit_end", crash)
        return
    real = module_mod.MVAModule.precompute_reference_logps

    def reference(self, value, split):
        if value == "harmless" and split == "train":  # stage 1 starts: its reference pass
            crash()
        return real(self, value, split)

    monkeypatch.setattr(module_mod.MVAModule, "precompute_reference_logps", reference)


@pytest.mark.parametrize("where", ["reference", "diagnostics"])
def test_killed_during_reference_or_diagnostics_resumes_to_the_same_run(
    toy_data, tmp_path, monkeypatch, where
):
    want = tmp_path / "uninterrupted"
    train(compose(toy_overrides(toy_data, want, *RESUME)))
    run = tmp_path / "run"
    _crash_in(monkeypatch, where)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose(toy_overrides(toy_data, run, *RESUME)))
    monkeypatch.undo()
    adapters = run / "adapters" / "harmless" / "adapter_model.safetensors"
    assert adapters.is_file() == (where == "diagnostics")  # written as soon as training ends
    last = run / "checkpoints" / "last.ckpt"
    train(compose(toy_overrides(toy_data, run, *RESUME, f"ckpt_path={last}")))
    for value in ("helpful", "harmless"):
        a = load_file(want / "adapters" / value / "adapter_model.safetensors")
        b = load_file(run / "adapters" / value / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), value
    assert _manifest(run) == _manifest(want)
    assert (run / "diagnostics" / "interference.json").is_file()
