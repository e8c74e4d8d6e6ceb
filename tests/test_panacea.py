"""Panacea (method=panacea, mva_lightning/model/panacea.py): the SVD-LoRA layer, the seeded
preference sampler, the aggregated loss, and a tiny run that trains, sweeps, reloads for any w
and resumes from a checkpoint to the very weights of an uninterrupted run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import compose, toy_overrides, write_hh_file
from safetensors.torch import load_file

from mva_lightning.loading import load_policy, run_config
from mva_lightning.model import panacea
from mva_lightning.sweep.cli import rerun
from mva_lightning.train import train

IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119], [9, 8, 7, 6, 5, 4, 3, 2]])
TRAIN = [
    "method=panacea",
    "trainer.max_epochs=1",  # 5 steps (20 train pairs, 4 a batch)
    "optimizer.lr=1e-2",
    "callbacks=none",
    "train.checkpoint_every_n_steps=2",
]
SWEEP = [
    "extrapolation.candidates.step=0.5",  # the simplex: (0, 1), (0.5, 0.5), (1, 0)
    "extrapolation.bootstrap.resamples=20",
    "extrapolation.samples.num_prompts=1",
    "extrapolation.samples.max_new_tokens=2",
    "extrapolation.progress=false",
]


def _layer(lambda_init: float = 0.7, r: int = 3, k: int = 2) -> panacea.PanaceaLinear:
    base = torch.nn.Linear(6, 5)
    return panacea.PanaceaLinear(base, r, k, lambda_init, torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_all_singular_values_zero_is_the_base_layer_and_model(base):
    layer = _layer()
    x = torch.randn(2, 4, 6)  # (B, T, d_in)
    assert torch.all(layer.panacea_s == 0) and layer.panacea_lambda.item() == pytest.approx(0.7)
    layer.preference = torch.zeros(2)  # s = [s_shared = 0, lambda * 0]
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    layer.preference = None  # the adapter off
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)

    model = panacea.add_panacea(copy.deepcopy(base.model), ["helpful", "harmless"], r=4)
    assert len(panacea.panacea_layers(model)) == 8  # q, k, v, o of 2 layers
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(panacea.PARAMS)  # the base is frozen
    expected = _logits(base.model.eval())
    for w in ([0.0, 0.0], [0.3, 0.7], None):  # lambda_init = 0: the base for every w at init
        panacea.set_preference(model, w)
        torch.testing.assert_close(_logits(model.eval()), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 2"):
        panacea.set_preference(model, [1.0])


def test_forward_is_the_hand_computed_svd_update():
    layer = _layer(r=3, k=2)
    with torch.no_grad():
        layer.panacea_s.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.panacea_lambda.fill_(1.5)
    w = torch.tensor([0.25, 0.75])
    layer.preference = w
    x = torch.randn(3, 6)  # (N, d_in)
    s = torch.tensor([0.5, -1.0, 2.0, 1.5 * 0.25, 1.5 * 0.75])  # (r + K,)
    delta = layer.panacea_U @ torch.diag(s) @ layer.panacea_V.T  # (d_out, d_in)
    w0, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ w0.T + b + x @ delta.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(w), delta, rtol=1e-5, atol=1e-6)


def test_preference_sampler_is_seeded_resumable_and_on_the_simplex():
    draws = torch.stack([panacea.sample_preference(7, step, 3) for step in range(2000)])
    again = torch.stack([panacea.sample_preference(7, step, 3) for step in range(1000, 2000)])
    torch.testing.assert_close(draws[1000:], again, rtol=0, atol=0)  # a resume draws the same
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], panacea.sample_preference(8, 0, 3))  # the seed matters
    assert torch.all(draws >= 0)
    torch.testing.assert_close(draws.sum(1), torch.ones(2000))
    # Dirichlet(1, 1, 1): mean 1/3 per entry, variance (1/3)(2/3)/4 = 1/18
    torch.testing.assert_close(draws.mean(0), torch.full((3,), 1 / 3), atol=0.02, rtol=0)
    torch.testing.assert_close(draws.var(0), torch.full((3,), 1 / 18), atol=0.01, rtol=0)


def test_aggregated_losses_hand_numbers():
    losses, w = torch.tensor([0.6, 0.2]), torch.tensor([0.25, 0.75])
    linear = panacea.aggregate(losses, w, "linear")
    assert linear.item() == pytest.approx(0.25 * 0.6 + 0.75 * 0.2)
    assert panacea.aggregate(losses, w, "tchebycheff").item() == pytest.approx(0.15)
    z = torch.tensor([0.5, 0.0])
    assert panacea.aggregate(losses, w, "tchebycheff", z).item() == pytest.approx(0.15)
    with pytest.raises(ValueError, match="method.aggregation"):
        panacea.aggregate(losses, w, "max")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "helpful": write_hh_file(root / "helpful.jsonl.gz", 24, "Here is a full answer", "No."),
        "harmless": write_hh_file(root / "harmless.jsonl.gz", 24, "I cannot help.", "Sure!"),
    }


def _adapter(run):
    return load_file(run / "adapters" / "panacea" / panacea.WEIGHTS_FILE)


def test_tiny_run_trains_sweeps_reloads_and_resumes(data, tmp_path):
    from hydra.utils import instantiate
    from peft import PeftModel

    run = tmp_path / "run"
    metrics = train(compose(toy_overrides(data, run, *TRAIN, *SWEEP)))
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["panacea"]
    trained = _adapter(run)
    assert any(t.abs().sum() > 0 for k, t in trained.items() if k.endswith("panacea_s"))
    assert metrics["pareto/num_candidates"] == 3  # the simplex: Panacea's trained domain

    # The sweep fed each w as the preference input; its checkpoints hold the Panacea adapter,
    # w, and the exact plain-PEFT adapter of the model at w.
    manifest = json.loads((run / "extrapolation" / "pareto.json").read_text())
    assert manifest["adapters"] is None and manifest["values"] == ["helpful", "harmless"]
    cfg = run_config(run)
    base_logits = _logits(instantiate(cfg.model.loader).model.eval())
    rows = [r for r in manifest["rows"] if r["checkpoint"]]
    assert rows
    for row in rows:
        w = [row["w/helpful"], row["w/harmless"]]
        folder = run / row["checkpoint"]
        assert json.loads((folder / "preference.json").read_text())["w"] == w
        assert load_file(folder / panacea.WEIGHTS_FILE).keys() == trained.keys()
        model, _ = load_policy(run, w)
        assert panacea.get_preference(model) == pytest.approx(w) and not model.training
        saved = PeftModel.from_pretrained(instantiate(cfg.model.loader).model, folder).eval()
        torch.testing.assert_close(_logits(model), _logits(saved), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(_logits(model), base_logits, atol=1e-4)
    model, _ = load_policy(run, {"helpful": 0.2})  # any w, off the swept lattice too
    assert panacea.get_preference(model) == pytest.approx([0.2, 0.0])
    with panacea.using_preference(model, None):  # the adapter off: the base model
        torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)

    again = rerun(run, None, "cpu")  # every candidate read back from the run's cache
    assert (again.scored, again.skipped) == (0, len(manifest["rows"]) + 1)
    assert again.rows() == manifest["rows"]

    # Killed after step 3 (last checkpoint: step 2), resumed with ckpt_path=: same weights.
    killed = tmp_path / "killed"
    kill = [
        "+callbacks.crash._target_=test_resume_mid_epoch.CrashAtStep",
        "+callbacks.crash.step=3",
    ]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose(toy_overrides(data, killed, *TRAIN, "extrapolation=none", *kill)))
    last = killed / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2
    assert any(k.endswith("panacea_lambda") for k in ckpt["state_dict"])
    assert not any("base_layer" in k for k in ckpt["state_dict"])  # never the frozen base
    resumed = tmp_path / "resumed"
    train(compose(toy_overrides(data, resumed, *TRAIN, "extrapolation=none", f"ckpt_path={last}")))
    got = _adapter(resumed)
    assert got.keys() == trained.keys()
    differ = [k for k in trained if not torch.equal(trained[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run"


def test_training_starts_at_the_reference_and_checks_its_settings(base):
    from mva_lightning.training.module import MVAModule

    values = ["helpful", "harmless"]
    policy = panacea.add_panacea(copy.deepcopy(base.model), values, r=2)
    settings = {"aggregation": "linear", "ideal": None}
    module = MVAModule(
        policy,
        values,
        optimizer=torch.optim.AdamW,
        alpha=0.0,
        schedule="joint",
        panacea_settings=settings,
    )
    assert module.adapter_names == [] and module.stages == [values]
    batch = base.tokenizer(["hi there", "no"], return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    pair = {
        "input_ids": torch.cat([ids, ids]),
        "attention_mask": torch.cat([batch["attention_mask"]] * 2),
        "response_mask": torch.cat([batch["attention_mask"]] * 2),
        "index": torch.arange(2),
    }
    panacea.set_preference(policy, panacea.sample_preference(0, 0, 2))
    out = module.dpo("helpful", pair, "val")
    assert out.loss.item() == pytest.approx(math.log(2))  # lambda = 0, s = 0: policy = pi_0
    with pytest.raises(ValueError, match="schedule=joint"):
        MVAModule(policy, values, torch.optim.AdamW, alpha=0.0, panacea_settings=settings)
