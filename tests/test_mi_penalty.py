"""The MI penalty inside MVAModule and train(): head checkpointing, gradient routing, numerics,
config validation, and every estimator end to end on the tiny model."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import compose, quiet_trainer, tiny_module, toy_overrides

from mva_lightning.assembly import ConfigError, build, check_config, load_value_splits
from mva_lightning.mi import HSIC, MINE, Orthogonal
from mva_lightning.model import lora
from mva_lightning.train import train
from mva_lightning.training.mi_penalty import is_enabled

VALUES = ["helpful", "harmless"]
R = 4
PAIR_KEY = "harmless__helpful"  # MINE head of the pair (harmless trainable, helpful frozen)


def _setup(base, mi, alpha=1.0, schedule="sequential", lr=1e-2, steps_per_stage=-1):
    return tiny_module(
        base,
        r=R,
        max_length=48,
        max_prompt_length=24,
        lr=lr,
        alpha=alpha,
        mi=mi,
        schedule=schedule,
        mi_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        steps_per_stage=steps_per_stage,
    )


def _trainer(**kw):
    return quiet_trainer(**{"limit_val_batches": 0, **kw})


# ------------------------------------------------------------------- MINE head: save/restore


def test_mine_head_is_checkpointed_and_restored(base, tmp_path):
    module, dm = _setup(base, MINE(R, R, hidden=16, head_steps=2), steps_per_stage=3)
    head = module.mi_penalty.heads[PAIR_KEY]
    untouched = copy.deepcopy(head.state_dict())
    seen = {}

    class Watch(L.Callback):  # the head when stage 1 (harmless vs frozen helpful) begins
        def on_train_epoch_start(self, trainer, pl_module):
            if pl_module.stage == 1:
                seen.setdefault("ema", head.ema.item())

    trainer = _trainer(callbacks=[Watch()], **module.trainer_limits())
    trainer.fit(module, datamodule=dm)  # one fit: 3 steps of helpful, then 3 of harmless
    assert seen["ema"] == 0.0  # stage 0 has no pair: no head step
    assert module.finished and trainer.global_step == 6
    assert head.ema.item() > 0.0  # the moving average was set by the head steps
    assert not torch.equal(head.net[0].weight, untouched["net.0.weight"])  # the head trained
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=False)
    head_keys = {k for k in ckpt["state_dict"] if k.startswith("mi_penalty.heads.")}
    assert f"mi_penalty.heads.{PAIR_KEY}.ema" in head_keys
    assert f"mi_penalty.heads.{PAIR_KEY}.net.0.weight" in head_keys
    assert all("lora_" in k or k in head_keys for k in ckpt["state_dict"])  # no base, no copy
    assert len(ckpt["optimizer_states"]) == 2  # policy and head optimizers
    head_state = ckpt["optimizer_states"][1]["state"]
    assert {int(s["step"]) for s in head_state.values()} == {6}  # 3 steps x 2 head updates
    policy_state = ckpt["optimizer_states"][0]["state"]
    assert {int(s["step"]) for s in policy_state.values()} == {3}  # 3 per stage's vector

    torch.manual_seed(123)  # a different head init than the trained run had
    fresh, dm2 = _setup(base, MINE(R, R, hidden=16, head_steps=2), steps_per_stage=3)
    fresh_head = fresh.mi_penalty.heads[PAIR_KEY]
    assert not torch.equal(fresh_head.net[0].weight, head.net[0].weight)
    resumed = _trainer(**fresh.trainer_limits())  # already finished: restores, trains nothing
    resumed.fit(fresh, datamodule=dm2, ckpt_path=path)
    assert fresh.stage == 1 and fresh.finished and resumed.global_step == 6
    for k, v in head.state_dict().items():
        assert torch.equal(fresh_head.state_dict()[k], v), k
    assert fresh_head.ema.item() == head.ema.item()
    head_opt = resumed.optimizers[1]
    assert head_opt.state and all("exp_avg" in s for s in head_opt.state.values())
    for v in VALUES:
        for m, f in lora.lora_factors(module.policy, v).items():
            g = lora.lora_factors(fresh.policy, v)[m]
            assert torch.equal(f.A, g.A) and torch.equal(f.B, g.B)


# ------------------------------------------------------------------------ gradient routing

ESTIMATORS = {
    "hsic-lora_a": lambda: HSIC("lora_a"),
    "hsic-activations": lambda: HSIC("activations"),
    "orthogonal": lambda: Orthogonal("lora_a"),
    "mine": lambda: MINE(R, R, hidden=16),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_penalty_gradient_reaches_only_the_trainable_vector(base, name):
    module, dm = _setup(base, ESTIMATORS[name]())
    module.begin_stage(1)  # harmless trains, helpful is frozen
    g = torch.Generator().manual_seed(0)
    for v in VALUES:  # B != 0, as after training: the penalty must still leave B alone
        for f in lora.lora_factors(module.policy, v).values():
            f.B.data.normal_(generator=g)
    batch = next(iter(dm.loader("harmless", "train")))
    with module.capturing_inputs(True) as inputs:
        module.policy_logps({"harmless": 1.0}, batch)
    mask = batch["attention_mask"].bool()
    captured = {"harmless": {m: h[mask] for m, h in inputs.items()}}
    module.policy.zero_grad(set_to_none=True)
    penalty = module.mi_penalty(module.policy, module.stage_pairs, captured, detach_y=True).total
    assert penalty.dim() == 0 and torch.isfinite(penalty) and penalty.requires_grad
    (module.alpha * penalty).backward()

    grads = {n: p.grad for n, p in module.policy.named_parameters()}
    a_harmless = [n for n in grads if "lora_A.harmless" in n]
    assert len(a_harmless) == 8  # 2 layers x q/k/v/o
    for n in a_harmless:
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    for n, grad in grads.items():
        if ".helpful." in n or "lora_" not in n:  # the frozen vector and the base
            assert grad is None or not grad.any(), n
    b_harmless = [grads[n] for n in grads if "lora_B.harmless" in n]
    # every feature kind is read through A (lora_a, activations): B gets nothing from the penalty
    assert all(b is None or not b.any() for b in b_harmless)
    if name == "mine":  # the value vectors' backward leaves the head alone
        assert all(p.grad is None for p in module.mi_penalty.heads[PAIR_KEY].parameters())


# --------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", ["hsic-lora_a", "mine"])
def test_a_diverging_estimate_stops_the_run_naming_the_step(base, name):
    module, dm = _setup(base, ESTIMATORS[name]() if name != "mine" else MINE(R, R, hidden=16))
    module.begin_stage(1)
    for f in lora.lora_factors(module.policy, "helpful").values():
        f.A.data.fill_(float("inf"))  # the frozen vector's features explode: HSIC/T become NaN
    before = {
        n: p.detach().clone() for n, p in module.policy.named_parameters() if ".harmless." in n
    }
    with pytest.raises(
        FloatingPointError, match=r"non-finite MI estimate for harmless-helpful at step 0"
    ):
        _trainer(max_steps=2).fit(module, datamodule=dm)
    after = dict(module.policy.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # no update with it


def test_mine_width_mismatch_fails_before_training(base):
    with pytest.raises(ValueError, match=r"mi.estimator.dim_x=mi.estimator.dim_y=64"):
        _setup(base, MINE(R, R, features="lora_a"))  # lora_a rows have d_in = 64 columns


# ------------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["mi.alpha=-1"], r"mi.alpha must be a number >= 0, got -1"),
        (["mi.estimator.features=bogus"], r"mi.estimator.features: expected one of .*'bogus'"),
        (
            ["mi.estimator.features=delta_w"],  # removed: delta W = s B A is 0 at init (B = 0)
            r"expected one of \('lora_a', 'activations'\), got 'delta_w'",
        ),
        (["mi.estimator.sigma=0"], r"mi.estimator.sigma"),
        (["value=[helpful]"], r"mi.alpha > 0 needs at least two values .*use mi=none"),
        (["value=[helpful]", "mi=mine"], r"needs at least two values"),
    ],
)
def test_bad_mi_config_fails_before_anything_is_loaded(toy_data, tmp_path, extra, match):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        train(compose(_overrides(toy_data, out, *extra)))
    assert not out.exists()


def test_one_value_without_penalty_is_fine(toy_data, tmp_path):
    check_config(compose(_overrides(toy_data, tmp_path, "value=[helpful]", "mi=none")))
    check_config(compose(_overrides(toy_data, tmp_path, "value=[helpful]", "mi.alpha=0")))


def _overrides(toy_data, out, *extra):
    """toy_overrides without the harmless file when only helpful is selected."""
    ovr = toy_overrides(toy_data, out, *extra)
    if "value=[helpful]" in extra:
        ovr = [o for o in ovr if not o.startswith("value.harmless.")]
    return ovr


def test_mine_config_builds_one_head_per_pair(toy_data, tmp_path):
    cfg = compose(toy_overrides(toy_data, tmp_path, "mi=mine"))
    _, module, _ = build(cfg, load_value_splits(cfg))
    assert list(module.mi_penalty.heads) == [PAIR_KEY]
    head = module.mi_penalty.heads[PAIR_KEY]
    assert (head.dim_x, head.dim_y, head.features) == (8, 8, "activations")  # r of model=tiny
    assert module.mi_optimizer_factory is not None and module.alpha == cfg.mi.alpha


@pytest.mark.parametrize(
    "extra", [["mi=none"], ["mi.alpha=0"], ["method=soup"], ["mi=mine", "mi.alpha=0"]]
)
def test_no_penalty_is_one_thing(toy_data, tmp_path, extra):
    """mi=none (no estimator) and alpha = 0 build the same module: no penalty object at all."""
    cfg = compose(toy_overrides(toy_data, tmp_path, *extra))
    assert not is_enabled(cfg.mi.estimator, cfg.mi.alpha)
    _, module, _ = build(cfg, load_value_splits(cfg))
    assert module.mi_penalty is None and module.stage_pairs == []
    assert module.hparams["mi"] == "none"


def test_config_variants_compose(toy_data, tmp_path):
    variant = compose(toy_overrides(toy_data, tmp_path, "mi=hsic_activations")).mi
    spelled = compose(
        toy_overrides(toy_data, tmp_path, "mi.estimator.features=activations", "mi.max_samples=512")
    ).mi
    assert variant == spelled and variant.estimator.sigma == 1.0
    ortho = compose(toy_overrides(toy_data, tmp_path, "mi=orthogonal")).mi
    assert ortho.estimator._target_ == "mva_lightning.mi.Orthogonal" and ortho.alpha == 10.0


# ------------------------------------------------------------------------------- end to end

FAST = [
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "callbacks=none",
    "~extrapolation",
]


@pytest.mark.parametrize(
    "extra",
    [
        ["mi=mine"],
        ["mi=orthogonal"],
        ["mi=hsic_activations"],
    ],
    ids=["mine", "orthogonal", "hsic-activations"],
)
def test_estimator_runs_end_to_end(toy_data, tmp_path, extra):
    out = tmp_path / "run"
    metrics = train(compose(toy_overrides(toy_data, out, *FAST, *extra)))
    assert torch.isfinite(torch.tensor(metrics["train/mi"]))
    assert "train/mi/harmless-helpful" in metrics
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    heads = [k for k in ckpt["state_dict"] if k.startswith("mi_penalty.heads.")]
    if extra == ["mi=mine"]:
        assert f"mi_penalty.heads.{PAIR_KEY}.ema" in heads and ckpt["state_dict"][heads[0]].numel()
    else:
        assert not heads
    for v in VALUES:
        assert (out / "adapters" / v / "adapter_model.safetensors").is_file()
