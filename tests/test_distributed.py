"""Distributed training: 2-process DDP on CPU (gloo) reproduces the single-process adapters, and
its sweep, sharded over the ranks, the single-process pareto.json; the GPU strategy configs
(FSDP, DeepSpeed ZeRO-2) compose and build."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose, toy_overrides
from hydra.utils import instantiate
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from mva_lightning.data.datamodule import EpochShuffleSampler, LengthBucketSampler
from mva_lightning.train import train

VALUES = ("helpful", "harmless")
# 20 train pairs per value (24 toy pairs, 2 test, 2 val): 5 steps of a global batch of 4.
COMMON = ("optimizer.lr=1e-3", "callbacks=none", "extrapolation=none", "trainer.max_epochs=2")


def _adapters(run):
    return {v: load_file(run / "adapters" / v / "adapter_model.safetensors") for v in VALUES}


def _ddp(toy_data, out, cwd, *extra, check: bool = True):
    """``python -m mva_lightning trainer=ddp ...``: Lightning relaunches the command for rank 1."""
    cmd = [sys.executable, "-m", "mva_lightning", "trainer=ddp"]
    cmd += toy_overrides(toy_data, out, *COMMON, *extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow  # two 2-process runs, each stopped early
@pytest.mark.parametrize(
    "what,step,message",
    [("loss", 2, "non-finite training loss"), ("mi", 12, "non-finite MI estimate")],
)
def test_a_fault_on_one_rank_stops_every_rank_at_that_step(toy_data, tmp_path, what, step, message):
    # Rank 1 alone diverges; the finite flags are reduced, so rank 0 stops at the same step
    # instead of waiting forever in the next collective, and nothing is exported.
    out = tmp_path / "ddp"
    inject = [
        "mi=hsic",
        "+callbacks.fault._target_=helpers.BreakOnRank",
        "+callbacks.fault.rank=1",
        f"+callbacks.fault.step={step}",
        f"+callbacks.fault.what={what}",
    ]
    proc = _ddp(toy_data, out, tmp_path, "data.loader.batch_size=2", *inject, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert f"{message}" in text and f"at step {step} " in text, text[-4000:]
    assert "another process" in text, text[-4000:]  # rank 0 names whose fault stopped it
    assert not list(out.rglob("*.safetensors"))  # no value vector written


@pytest.mark.slow  # about 40 s on an idle 2-core machine, 100+ s on a loaded one
def test_ddp_two_processes_match_single_process(toy_data, tmp_path):
    # Same global batch: 1 process x 4 pairs vs 2 processes x 2 pairs. DPO losses are means over
    # pairs and DDP averages gradients, so the updates agree; Lightning's DistributedSampler
    # wrapper gives rank r the indices r, r + 2, ... of the same seeded permutation.
    single = tmp_path / "single"
    train(compose(toy_overrides(toy_data, single, *COMMON, "data.loader.batch_size=4")))
    ddp = tmp_path / "ddp"
    proc = _ddp(toy_data, ddp, tmp_path, "data.loader.batch_size=2")
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # rank 1 really ran

    a, b = _adapters(single), _adapters(ddp)
    for v in VALUES:
        assert a[v].keys() == b[v].keys()
        for k in a[v]:
            torch.testing.assert_close(b[v][k], a[v][k], atol=2e-5, rtol=1e-4)
        moved = [k for k in a[v] if "lora_B" in k and a[v][k].abs().sum() > 0]
        assert moved, f"{v}: training left every lora_B at zero; the comparison would be vacuous"
    # Rank zero alone writes: one set of outputs, no temporary leftovers, no per-rank copies.
    assert (ddp / "metrics.json").is_file() and (ddp / "config.yaml").is_file()
    checkpoints = sorted(p.name for p in (ddp / "checkpoints").iterdir())  # one folder per run
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2, checkpoints  # last + latest
    assert not list(ddp.rglob("*.tmp")) and not list(tmp_path.rglob("*rank_1*"))


# A short sweep: three explicit candidates and the base, implicit-reward accuracy (grid's
# objective), the front reported on test, intervals from 200 resamples, no generated samples.
SWEEP = (
    "extrapolation=grid",
    "extrapolation.candidates.mode=explicit",
    "extrapolation.candidates.vectors=[[0.5,0.5],[1.0,1.5],[1.5,0.5]]",
    "extrapolation.bootstrap.resamples=200",
    "extrapolation.samples.num_prompts=0",
)
TIMING = {"seconds", "candidates_per_s", "scored", "skipped"}


def _pareto(run, subdir: str) -> dict:
    """``<run>/<subdir>/pareto.json`` without timing, checkpoint paths as under extrapolation/."""
    text = (run / subdir / "pareto.json").read_text()
    data = json.loads(text.replace(f'"{subdir}/checkpoints/', '"extrapolation/checkpoints/'))
    return {k: v for k, v in data.items() if k not in TIMING}


def _assert_close(got, want, where: str = "pareto.json") -> None:
    """Equal JSON, numbers up to float rounding (batches of other sizes round differently)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.mark.slow  # one 2-process training run with its sweep, then two one-process sweeps
def test_ddp_sweep_shards_candidates_and_matches_one_process(toy_data, tmp_path):
    from mva_lightning.sweep.cli import rerun

    run = tmp_path / "ddp"
    proc = _ddp(toy_data, run, tmp_path, "data.loader.batch_size=2", *SWEEP)
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # rank 1 really ran
    # Each rank scored its share into its own cache (the base and candidate 2 on rank 0, 1 and
    # 3 on rank 1, for the selection); rank zero alone wrote the manifest and checkpoints.
    ddp = json.loads((run / "extrapolation" / "pareto.json").read_text())
    selection = run / "extrapolation" / "scores" / ddp["fingerprint"]
    shares = {p.name: sorted(f.name for f in p.glob("w_*.json")) for p in selection.iterdir()}
    assert shares == {
        "rank0": ["w_0.0_0.0.json", "w_1.0_1.5.json"],
        "rank1": ["w_0.5_0.5.json", "w_1.5_0.5.json"],
    }
    assert (ddp["scored"], ddp["skipped"]) == (4, 0) and ddp["hypervolume_ci"]
    assert not list(run.rglob("*.tmp"))

    # One process sweeping the same adapters (as saved) into another folder: the same results.
    single = rerun(run, {"output_subdir": "single"})
    assert (single.scored, single.skipped) == (4, 0)
    _assert_close(_pareto(run, "extrapolation"), _pareto(run, "single"))
    # One process resuming the sharded sweep reads every rank's cache: nothing scored again.
    resumed = rerun(run)
    assert (resumed.scored, resumed.skipped) == (0, 4)
    _assert_close(_pareto(run, "extrapolation"), _pareto(run, "single"))


def test_epoch_shuffle_shards_are_the_single_process_batches():
    one = EpochShuffleSampler(12, seed=5)
    ranks = [EpochShuffleSampler(12, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for s in (one, *ranks):
        s.set_epoch(1)
    order, (r0, r1) = list(one), [list(s) for s in ranks]
    assert len(r0) == len(r1) == len(ranks[0]) == 6
    for step in range(3):  # global batch 4 = 2 devices x 2 pairs
        assert sorted(r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2]) == sorted(
            order[4 * step : 4 * step + 4]
        )
    # A DistributedSampler: Lightning keeps it under DDP instead of wrapping (and reshuffling) it.
    assert isinstance(ranks[0], DistributedSampler)
    # Uneven sizes are padded like DistributedSampler: every rank runs the same steps.
    odd = [list(EpochShuffleSampler(5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 3 and set(odd[0] + odd[1]) == set(range(5))


def test_length_buckets_split_across_devices_like_one_device():
    lengths = [7, 3, 9, 1, 4, 8, 2, 6, 5, 10, 11, 12]
    one = LengthBucketSampler(lengths, batch_size=4, seed=3, window=2)
    batches = one.batches()
    assert sorted(i for b in batches for i in b) == list(range(12))
    order = list(one)
    # Two devices, 2 pairs each: rank r takes indices r, r + 2, ... (DistributedSamplerWrapper).
    rank0, rank1 = order[0::2], order[1::2]
    for step, batch in enumerate(batches):
        assert sorted(rank0[2 * step : 2 * step + 2] + rank1[2 * step : 2 * step + 2]) == sorted(
            batch
        )


def test_length_buckets_are_runs_of_the_length_order():
    lengths = [7, 3, 9, 1, 4, 8, 2, 6, 5, 10, 11, 12]
    by_length = sorted(range(12), key=lambda i: lengths[i])
    runs = {frozenset(by_length[k : k + 4]) for k in (0, 4, 8)}
    # One window spanning every example: the batches are consecutive runs of the length order.
    batches = LengthBucketSampler(lengths, batch_size=4, seed=3, window=3).batches()
    assert {frozenset(b) for b in batches} == runs
    # Other seeds shuffle the batches, never their make-up; and every epoch reshuffles.
    sampler = LengthBucketSampler(lengths, batch_size=4, seed=4, window=3)
    assert {frozenset(b) for b in sampler.batches()} == runs
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_strategy_configs_compose(name, tmp_path):
    cfg = compose([f"trainer={name}", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.devices not in (None, 1)
    assert cfg.trainer.strategy._target_.startswith("lightning.pytorch.strategies.")


def test_fsdp_strategy_builds_and_wraps_lora_apart(tmp_path):
    from mva_lightning.model import lora
    from mva_lightning.model.backbones import tiny_llama

    cfg = compose(["model=tiny", "trainer=fsdp", f"paths.output_dir={tmp_path}"])
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs["use_orig_params"] is True
    policy = lora.add_value_vectors(tiny_llama().model, list(VALUES))
    names = {m: n for n, m in policy.named_modules()}
    # Which modules FSDP would make units of (torch's policy hook; no process group needed).
    units = [names[m] for m in strategy.kwargs["auto_wrap_policy"]._run_policy(policy, set(), {})]
    layers = [u for u in units if u.endswith(("layers.0", "layers.1"))]
    factors = [u for u in units if ".lora_A." in u or ".lora_B." in u]
    assert len(layers) == 2 and len(units) == len(layers) + len(factors)
    # Every LoRA factor of every value, trainable or not, is a unit of its own: no unit mixes
    # frozen base weights with value-vector weights (litgpt#1417).
    expected = {  # "...q_proj.lora_A.helpful": the nn.Linear of one factor of one value
        n for n, _ in policy.named_modules() if n.split(".")[-2:-1] in (["lora_A"], ["lora_B"])
    }
    assert set(factors) == expected
    assert len(factors) == 2 * 4 * 2 * len(VALUES)  # layers x (q, k, v, o) x (A, B) x values
