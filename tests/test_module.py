"""The LightningModule: step-0 invariant, sequential freezing, reference after training."""

import copy
import math

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, tiny_module

from mva_lightning.data.datamodule import PreferenceDataModule
from mva_lightning.data.sources import PreferencePair, split_pairs
from mva_lightning.mi import HSIC
from mva_lightning.model import lora
from mva_lightning.training.module import MVAModule

VALUES = ["helpful", "harmless"]


def _setup(base, schedule="sequential", alpha=0.0, mi=None, lr=1e-2):
    return tiny_module(base, lr=lr, alpha=alpha, mi=mi, schedule=schedule)


_trainer = quiet_trainer


def test_step0_loss_is_ln2_and_rewards_zero(base):
    module, dm = _setup(base)
    trainer = _trainer(limit_train_batches=0)
    trainer.fit(module, datamodule=dm)  # attaches trainer; precomputes the reference
    batch = next(iter(dm.loader("helpful", "train")))
    out = module.dpo("helpful", batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert out.chosen_rewards.abs().max().item() < 1e-5
    assert out.rejected_rewards.abs().max().item() < 1e-5


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


class _StageSnapshots(L.Callback):
    """The policy's tensors when each stage begins and when training ends."""

    def __init__(self):
        self.snaps, self.fits = {}, 0

    def on_fit_start(self, trainer, pl_module):
        self.fits += 1

    def on_train_epoch_start(self, trainer, pl_module):
        self.snaps.setdefault(pl_module.stage, _snapshot(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.snaps["end"] = _snapshot(pl_module)


def test_one_fit_trains_the_stages_in_turn_each_changing_only_its_vector(base):
    module, dm = _setup(base, alpha=1.0, mi=HSIC(features="lora_a"))
    snaps = _StageSnapshots()
    limits = module.trainer_limits()
    assert limits == {"max_epochs": 2, "max_steps": -1}  # one epoch per stage, two stages
    _trainer(callbacks=[snaps], **limits).fit(module, datamodule=dm)
    assert snaps.fits == 1 and module.finished and module.stage == 1
    for value, (start, end) in {"helpful": (0, 1), "harmless": (1, "end")}.items():
        before, after = snaps.snaps[start], snaps.snaps[end]
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        own = {n for n in before if f".{value}." in n}
        # every tensor of the stage's vector that gets gradient (B, and A through B != 0)
        # changed; nothing else did
        assert changed and changed <= own
        assert {n for n in own if "lora_B" in n} <= changed


def test_steps_per_stage_cut_each_stage_short(base):
    policy = lora.add_value_vectors(copy.deepcopy(base.model), VALUES, r=4, lora_alpha=8)
    _, dm = _setup(base)
    module = MVAModule(
        policy,
        VALUES,
        optimizer=torch.optim.AdamW,
        alpha=0.0,
        epochs_per_stage=3,
        steps_per_stage=2,
    )
    assert module.trainer_limits() == {"max_epochs": 6, "max_steps": 4}
    trainer = _trainer(**module.trainer_limits())
    trainer.fit(module, datamodule=dm)
    assert module.finished and trainer.global_step == 4  # 2 steps in each of the 2 stages


def test_joint_schedule_trains_every_vector(base):
    module, dm = _setup(base, schedule="joint", alpha=1.0, mi=HSIC())
    before = _snapshot(module)
    _trainer(max_steps=2).fit(module, datamodule=dm)
    after = _snapshot(module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert module.stages == [VALUES]
    for v in VALUES:
        assert any(f".{v}." in n and "lora_B" in n for n in changed)
    assert all("lora_" in n for n in changed)


def test_reference_after_training_is_still_the_base(base):
    module, dm = _setup(base)
    _trainer(max_steps=4).fit(module, datamodule=dm)
    batch = next(iter(dm.loader("helpful", "val")))
    module.precompute_reference = False
    module.reference.clear()
    ref = module.reference_logps(batch)
    from mva_lightning.model.logps import response_logps

    plain = response_logps(
        base.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    )
    torch.testing.assert_close(ref, plain, atol=1e-5, rtol=1e-5)
    trained = module.policy_logps({"helpful": 1.0}, batch)
    assert not torch.allclose(trained, ref, atol=1e-4)


def test_negative_alpha_and_unknown_value_fail(base):
    policy = lora.add_value_vectors(copy.deepcopy(base.model), VALUES, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        MVAModule(policy, VALUES, optimizer=torch.optim.AdamW, alpha=-1.0)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        MVAModule(policy, ["helpful", "humor"], optimizer=torch.optim.AdamW)


def test_checkpoint_holds_adapters_only(base, tmp_path):
    module, dm = _setup(base)
    trainer = _trainer(max_steps=1)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    # the first epoch (one step) completed stage 0: the checkpoint resumes in stage 1
    assert ckpt["mva"] == {
        "stage": 1,
        "stage_start_epoch": 1,
        "stage_start_step": 1,
        "finished": False,
        "values": VALUES,
        "schedule": "sequential",
    }


def test_training_batches_are_length_buckets_by_default(base):
    lengths = [3, 30] * 16  # words per response: two clearly separated lengths
    pairs = [PreferencePair(f"q {i}?", "w " * n, "no") for i, n in enumerate(lengths)]
    splits = {"helpful": split_pairs(pairs, 0.0, 0.0, 0)}
    padding = {}
    for bucket in (True, False):
        dm = PreferenceDataModule(
            splits, base.tokenizer, batch_size=4, max_length=256, bucket_by_length=bucket
        )
        batches = list(dm.loader("helpful", "train", shuffle=True))
        padded = sum(int(b["attention_mask"].numel()) for b in batches)
        padding[bucket] = padded - sum(int(b["attention_mask"].sum()) for b in batches)
    assert PreferenceDataModule(splits, base.tokenizer).bucket_by_length
    assert padding[True] < padding[False] / 2


def test_reference_pass_runs_at_the_trainers_precision(base):
    """Under bf16-mixed the cached reference is computed as the policy's log-probs are, so the
    step-0 loss is ln 2 there too (an fp32 reference would differ by bf16 rounding)."""
    module, dm = _setup(base)
    trainer = _trainer(limit_train_batches=0, precision="bf16-mixed")
    trainer.fit(module, datamodule=dm)  # attaches the trainer
    module.precompute_reference_logps("helpful", "train")  # what a stage's start runs
    batch = next(iter(dm.loader("helpful", "train")))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning wraps training_step in
        out = module.dpo("helpful", batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    fp32 = module.reference_logps(batch)  # outside autocast
    cached = module.cached_reference_logps("helpful", "train", batch)
    assert not torch.allclose(fp32, cached.float(), atol=1e-4)  # bf16 rounding is visible
