"""Resuming inside an epoch: a run killed at any step and resumed from its last step checkpoint
(``train.checkpoint_every_n_steps``) ends with the very adapters, bit for bit, of a run that
was never interrupted.

What makes it exact: the train loaders are resumable (Lightning saves their position in the
checkpoint and the resumed epoch yields only the batches not yet trained on), the module saves
the random states (LoRA dropout, the MI penalty's generators) and fills its reference cache on a
resume, and a checkpoint written at the last batch of an epoch carries the stage switch that
Lightning skips when it resumes from there.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import compose, make_datamodule, toy_overrides, write_hh_file
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from mva_lightning.data.datamodule import (
    EpochShuffleSampler,
    LengthBucketSampler,
    ResumableDataLoader,
)
from mva_lightning.train import train

VALUES = ("helpful", "harmless")
# 20 train pairs per value (24 toy pairs, 2 test, 2 val), 4 a batch: 5 steps an epoch, 2 epochs a
# stage, 20 steps in all (sequential) or 10 (joint). LoRA dropout on: the resumed run must draw
# the uninterrupted run's random numbers.
COMMON = (
    "trainer.max_epochs=2",
    "optimizer.lr=1e-3",
    "extrapolation=none",
    "callbacks=none",
    "model.lora.lora_dropout=0.1",
)
VARIANTS = {
    "hsic": (),
    # MINE: statistics networks with their optimizer, its own shuffling generator, and the
    # activation subsampling generator (max_samples below the tokens of a batch)
    "mine": ("mi=mine", "mi.estimator.hidden=16", "mi.estimator.head_steps=2", "mi.max_samples=64"),
    "joint": ("train.schedule=joint",),  # one stage, both values' loaders in every batch
}


class CrashAtStep(L.Callback):
    """Raise when the batch after optimizer step ``step`` starts: a run killed there, whose last
    checkpoint is the last multiple of ``train.checkpoint_every_n_steps`` up to ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _adapters(run):
    return {v: load_file(run / "adapters" / v / "adapter_model.safetensors") for v in VALUES}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {  # conftest's toy_data, shared by this module's runs
        "helpful": write_hh_file(root / "helpful.jsonl.gz", 24, "Here is a full answer", "No."),
        "harmless": write_hh_file(root / "harmless.jsonl.gz", 24, "I cannot help.", "Sure!"),
    }


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """variant -> the adapters of its uninterrupted run (each variant trained once)."""
    runs = {}

    def get(variant):
        if variant not in runs:
            out = tmp_path_factory.mktemp(f"full_{variant}")
            train(compose(toy_overrides(data, out, *COMMON, *VARIANTS[variant])))
            runs[variant] = _adapters(out)
        return runs[variant]

    return get


@pytest.mark.parametrize(
    ("variant", "every", "crash", "saved"),
    [
        ("hsic", 2, 3, 2),  # inside the first epoch
        ("hsic", 2, 11, 10),  # the last batch of stage 0: the stage switch is pending
        ("hsic", 2, 13, 12),  # inside stage 1, after the switch
        ("hsic", 5, 6, 5),  # the last batch of an epoch inside a stage
        ("mine", 2, 13, 12),  # inside stage 1, where the MI penalty draws its random numbers
        ("mine", 3, 17, 15),  # the last batch of stage 1's first epoch
        ("joint", 2, 3, 2),  # two resumable loaders at once
        ("joint", 3, 7, 6),
    ],
)
def test_killed_mid_epoch_resumes_to_the_same_adapters(
    variant, every, crash, saved, data, uninterrupted, tmp_path, caplog
):
    common = [*COMMON, *VARIANTS[variant], f"train.checkpoint_every_n_steps={every}"]
    killed = tmp_path / "killed"
    kill = [
        "+callbacks.crash._target_=test_resume_mid_epoch.CrashAtStep",
        f"+callbacks.crash.step={crash}",
    ]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose(toy_overrides(data, killed, *common, *kill)))
    last = killed / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == saved
    # Lightning saved the loaders' positions: the sampled indices already trained on
    positions = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert len(positions) == (2 if variant == "joint" else 1)
    assert all(p["consumed"] > 0 for p in positions)

    resumed = tmp_path / "resumed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose(toy_overrides(data, resumed, *common, f"ckpt_path={last}")))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert "resumed at fit epoch" not in caplog.text  # the module's check of where it resumed

    want, got = uninterrupted(variant), _adapters(resumed)
    for v in VALUES:
        assert want[v].keys() == got[v].keys()
        differ = [k for k in want[v] if not torch.equal(want[v][k], got[v][k])]
        assert not differ, f"{v}: {len(differ)} tensors differ from the uninterrupted run"
        assert any(t.abs().sum() > 0 for k, t in want[v].items() if "lora_B" in k)


# ------------------------------------------------------------------------- resumable samplers
def _samplers(num_replicas: int, rank: int, epoch_offset: int = 0):
    lengths = [7, 3, 9, 1, 4, 8, 2, 6, 5, 10, 11, 12, 13]
    return [
        LengthBucketSampler(lengths, 4, 3, 2, num_replicas, rank, epoch_offset),
        EpochShuffleSampler(len(lengths), 3, num_replicas, rank, epoch_offset),
    ]


@pytest.mark.parametrize(("num_replicas", "rank"), [(1, 0), (2, 0), (2, 1)])
def test_sampler_resumes_after_the_indices_already_used(num_replicas, rank):
    for make in range(2):
        sampler = _samplers(num_replicas, rank, epoch_offset=1)[make]
        sampler.set_epoch(3)  # the fit's epoch 3 = the stage's epoch 2
        full = list(sampler)
        assert sampler.state_dict() == {"epoch": 3, "consumed": len(full)}
        for used in range(len(full)):
            it = iter(sampler)
            head = [next(it) for _ in range(used)]
            assert head == full[:used]
            state = sampler.state_dict()
            assert state == {"epoch": 3, "consumed": used}

            fresh = _samplers(num_replicas, rank, epoch_offset=1)[make]
            fresh.load_state_dict(state)
            fresh.set_epoch(3)  # Lightning, before the epoch runs
            assert fresh.state_dict() == state  # loaded, not yet iterated
            assert list(fresh) == full[used:]
            assert list(fresh) == full  # the skip is for the resumed pass only


def test_sampler_state_of_a_used_up_epoch_resumes_at_the_next():
    sampler, fresh = _samplers(2, 1)[0], _samplers(2, 1)[0]
    sampler.set_epoch(4)
    list(sampler)
    fresh.load_state_dict(sampler.state_dict())
    assert fresh.epoch == 5
    sampler.set_epoch(5)
    assert list(fresh) == list(sampler)


def test_sampler_skips_nothing_when_another_epoch_runs():
    sampler, fresh = _samplers(1, 0)[1], _samplers(1, 0)[1]
    sampler.set_epoch(2)
    fresh.load_state_dict({"epoch": 1, "consumed": 4})
    fresh.set_epoch(2)
    assert list(fresh) == list(sampler)


def test_loader_position_counts_batches_trained_on_not_prefetched():
    # Workers fetch ahead of training: the sampler has handed out more than the batches seen.
    lengths = list(range(1, 25))
    sampler = LengthBucketSampler(lengths, batch_size=4, seed=1)
    kw = dict(batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(0))
    sampler.set_epoch(2)
    full = [b.tolist() for b in DataLoader(list(range(24)), sampler=sampler, batch_size=4)]
    loader = ResumableDataLoader(list(range(24)), sampler=sampler, **kw)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(2)]
    assert seen == full[:2]
    state = loader.state_dict()
    assert state == {"epoch": 2, "consumed": 8} and sampler.consumed > 8
    del it

    other = LengthBucketSampler(lengths, batch_size=4, seed=1)
    resumed = ResumableDataLoader(list(range(24)), sampler=other, **kw)
    resumed.load_state_dict(state)
    other.set_epoch(2)
    assert [b.tolist() for b in resumed] == full[2:]
    assert resumed.state_dict() == {"epoch": 2, "consumed": 24}
    other.set_epoch(3)  # the next epoch, not yet iterated: nothing of it used
    assert resumed.state_dict() == other.state_dict() == {"epoch": 3, "consumed": 0}


def test_loaders_leave_the_global_rng_alone():
    """Starting a loader draws its workers' seed from the loader's own generator: the training
    steps' random numbers (dropout) do not depend on how many loaders a run has started."""
    from mva_lightning.model.backbones import byte_tokenizer

    dm = make_datamodule(byte_tokenizer())
    before = torch.get_rng_state()
    for shuffle in (True, False):
        for batch in dm.loader("helpful", "train", shuffle=shuffle):
            assert batch["input_ids"].numel()
    assert torch.equal(torch.get_rng_state(), before)
