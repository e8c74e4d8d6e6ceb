"""Baselines (conf/method/, training/methods.py): configs run, DPO-LW / MODPO identities."""

import json
import shutil

import pytest
import torch
from conftest import REPO, compose, toy_overrides
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mva_lightning.train import train
from mva_lightning.training.losses import dpo_loss, modpo_margin
from mva_lightning.training.methods import FROZEN_PREFIX, method_inputs
from mva_lightning.training.module import MVAModule

METHODS = sorted(p.stem for p in (REPO / "mva_lightning" / "conf" / "method").glob("*.yaml"))
SHARED = {"dpo", "dpo_lw", "dpo_seqt", "modpo"}  # one adapter, `policy`, for every value


@pytest.fixture
def frozen_run(tmp_path):
    """A run folder's ``adapters/`` with a non-zero harmless vector (MODPO's margin source)."""
    from mva_lightning.model import lora
    from mva_lightning.model.backbones import tiny_llama

    cfg = compose(["model=tiny"])
    backbone = tiny_llama(**{k: v for k, v in cfg.model.loader.items() if k != "_target_"})
    policy = lora.add_value_vectors(backbone.model, ["harmless"], r=8, lora_alpha=16)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B.harmless" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    folder = tmp_path / "soup_run" / "adapters"
    lora.save_value_vectors(policy, folder, ["harmless"])
    return folder


def _adapter(run, name):
    return load_file(run / "adapters" / name / "adapter_model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_runs_a_fast_dev_run(method, toy_data, frozen_run, tmp_path):
    out = tmp_path / method
    extra = [f"method={method}", "+trainer.fast_dev_run=true", "callbacks=none"]
    extra.append("extrapolation.candidates.step=0.5")  # 4 grid / 3 simplex candidates
    if method == "modpo":
        extra.append(f"method.margin_from={frozen_run}")
    metrics = train(compose(toy_overrides(toy_data, out, *extra)))
    trained = sorted(p.name for p in (out / "adapters").iterdir())
    adapters = {"panacea": ["panacea"]}.get(method)  # one SVD-LoRA adapter, w its input
    assert trained == (adapters or (["policy"] if method in SHARED else ["harmless", "helpful"]))
    manifest = json.loads((out / "extrapolation" / "pareto.json").read_text())
    simplex = {"soup": 3, "mva_no_extrapolation": 3, "panacea": 3}
    expected = simplex.get(method, 1 if method in SHARED else 4)
    assert metrics["pareto/num_candidates"] == expected == len(manifest["rows"])
    assert {"helpful", "harmless"} <= set(manifest["rows"][0])  # scored on every value
    if method in SHARED:
        assert manifest["rows"][0]["w/policy"] == 1.0


def test_method_configs_override_only_what_differs():
    base = compose(["model=tiny"])
    assert base.method.name == "mva" and base.method.shared_adapter is None
    soup = compose(["model=tiny", "method=soup"])
    assert soup.mi.alpha == 0 and soup.extrapolation.candidates.mode == "simplex"
    assert soup.train == base.train and soup.model == base.model and soup.data == base.data
    seqt = compose(["model=tiny", "method=dpo_seqt"])
    assert seqt.train.schedule == "sequential" and seqt.method.shared_adapter == "policy"
    lw = compose(["model=tiny", "method=dpo_lw", "method.weights=[0.2,0.8]"])
    assert lw.train.schedule == "joint" and list(lw.method.weights) == [0.2, 0.8]
    assert compose(["model=tiny", "method=mva_orthogonal"]).mi.estimator._target_.endswith(
        "Orthogonal"
    )


def test_dpo_lw_one_hot_equals_single_value_dpo(toy_data, tmp_path):
    steps = ["trainer.max_steps=3", "extrapolation=none", "callbacks=none"]
    lw = tmp_path / "lw"
    train(compose(toy_overrides(toy_data, lw, "method=dpo_lw", "method.weights=[1.0,0.0]", *steps)))
    single = tmp_path / "single"
    overrides = [o for o in toy_overrides(toy_data, single) if not o.startswith("value")]
    single_overrides = [
        *overrides,
        "value=[helpful]",
        f"value.helpful.source.files=[{toy_data['helpful']}]",
        "mi=none",
        *steps,
    ]
    train(compose(single_overrides))
    a, b = _adapter(lw, "policy"), _adapter(single, "helpful")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(bool(t.abs().sum() > 0) for k, t in a.items() if "lora_B" in k)  # it trained
    other = tmp_path / "other"
    train(
        compose(toy_overrides(toy_data, other, "method=dpo_lw", "method.weights=[0.0,1.0]", *steps))
    )
    c = _adapter(other, "policy")
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_B" in k)  # the test can fail


def test_modpo_margin_hand_numbers_and_zero_weights():
    margins = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (J=2, B=2) r_j(y_w) - r_j(y_l)
    out = modpo_margin(margins, torch.tensor([0.5, 0.25]), own_weight=0.5)
    torch.testing.assert_close(out, torch.tensor([2.5, 4.0]))  # (0.5*1+0.25*3)/0.5, ...
    zero = modpo_margin(margins, torch.zeros(2), own_weight=1.0)
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -4.0])
    plain = dpo_loss(pc, pr, rc, rr, beta=0.1)
    with_margin = dpo_loss(pc, pr, rc, rr, beta=0.1 / 1.0, margin=zero)
    torch.testing.assert_close(with_margin.losses, plain.losses, rtol=0, atol=0)
    # w_k = 0.5, margin m: logits = (beta h - sum w_j dr_j) / w_k
    h = (pc - rc) - (pr - rr)
    m = modpo_margin(margins, torch.tensor([0.5, 0.25]), own_weight=0.5)
    expected = -torch.nn.functional.logsigmoid((0.1 * h - torch.tensor([1.25, 2.0])) / 0.5)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.1 / 0.5, margin=m).losses, expected)
    with pytest.raises(ValueError, match="own_weight"):
        modpo_margin(margins, torch.ones(2), own_weight=0.0)


def test_modpo_margins_once_and_zero_weight_equals_dpo(toy_data, frozen_run, tmp_path, monkeypatch):
    calls = []
    original = MVAModule.precompute_margins

    def counting(self, value, split):
        calls.append((value, split))
        return original(self, value, split)

    monkeypatch.setattr(MVAModule, "precompute_margins", counting)
    steps = ["trainer.max_steps=4", "extrapolation=none", "callbacks=none"]
    modpo = tmp_path / "modpo"
    overrides = toy_overrides(
        toy_data,
        modpo,
        "method=modpo",
        f"method.margin_from={frozen_run}",
        "method.weights=[1.0,0.0]",
        *steps,
    )
    train(compose(overrides))
    assert sorted(calls) == [("helpful", "train"), ("helpful", "val")]  # once, not per step
    dpo = tmp_path / "dpo"
    train(compose(toy_overrides(toy_data, dpo, "method=dpo", "method.weights=[1.0,0.0]", *steps)))
    a, b = _adapter(modpo, "policy"), _adapter(dpo, "policy")
    for k in a:  # margin weights 0 and w_k = 1: the margin term vanishes, MODPO == DPO
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [p.name for p in (modpo / "adapters").iterdir()] == ["policy"]  # frozen not saved


def test_modpo_nonzero_margin_changes_training(toy_data, frozen_run, tmp_path):
    steps = ["trainer.max_steps=3", "extrapolation=none", "callbacks=none"]
    runs = {}
    for i, w in enumerate(("[1.0,0.0]", "[0.5,0.5]")):
        out = tmp_path / f"run{i}"
        overrides = toy_overrides(
            toy_data, out, "method=modpo", f"method.margin_from={frozen_run}", *steps
        )
        train(compose([*overrides, f"method.weights={w}"]))
        runs[w] = _adapter(out, "policy")
    a, b = runs.values()
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_B" in k)


def test_method_inputs_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"method.weights=\[1.0\]: expected 2 entries"):
        method_inputs(["helpful", "harmless"], weights=[1.0])
    with pytest.raises(ValueError, match=">= 0"):
        method_inputs(["helpful", "harmless"], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="margin_from=.*no adapter_model.safetensors"):
        method_inputs(["helpful", "harmless"], "modpo", "policy", [0.5, 0.5], tmp_path)
    with pytest.raises(ValueError, match="shared_adapter"):
        method_inputs(["helpful"], shared_adapter=FROZEN_PREFIX + "x")
    mva = method_inputs(["helpful", "harmless"])
    assert mva.adapters == {"helpful": "helpful", "harmless": "harmless"}
    assert mva.loss_weights == {"helpful": 1.0, "harmless": 1.0} and not mva.margin_weights


def test_shared_adapter_with_mi_penalty_is_refused(toy_data, tmp_path):
    cfg = compose(toy_overrides(toy_data, tmp_path, "method=dpo_lw", "mi=hsic"))
    with pytest.raises(ValueError, match="one adapter per value"):
        train(cfg)


@pytest.fixture
def compare(monkeypatch):
    """experiments/compare_methods.py, imported as the script imports its folder."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import compare_methods

    return compare_methods


def test_weight_sweep_covers_every_value(compare):
    assert compare.weight_sweep(2) == [[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]]
    sweep = compare.weight_sweep(3)
    assert len(sweep) == 3 and all(abs(sum(w) - 1) < 1e-3 and len(w) == 3 for w in sweep)
    assert [max(range(3), key=w.__getitem__) for w in sweep] == [0, 1, 2]  # each leads once


def test_soup_reuses_the_no_mi_training_with_simplex_candidates(compare, tmp_path):
    rows = compare.main(
        ["--setting", "tiny", "--seeds", "1", "--methods", "soup", "mva_no_mi"]
        + ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    )
    by = {r["method"]: r for r in rows}
    assert by["soup"]["trained_with"] == "mva_no_mi" and by["soup"]["runs_mean"] == 0
    assert by["mva_no_mi"]["runs_mean"] == 1
    seed = json.loads((tmp_path / "out" / "tiny.json").read_text())["per_seed"][0]
    soup, grid = seed["soup"]["points"], seed["mva_no_mi"]["points"]
    assert len(soup) == 11 and len(grid) == 100  # the simplex on a 0.1 lattice; S^2, |S| = 10
    # Same vectors, same evaluator: a w on both lists gets the same scores.
    pareto_json = tmp_path / "work" / "seed0" / "mva_no_mi"
    simplex = json.loads((pareto_json / "extrapolation_soup" / "pareto.json").read_text())
    full = json.loads((pareto_json / "extrapolation" / "pareto.json").read_text())
    values = simplex["values"]

    def w(row):
        return tuple(row[f"w/{v}"] for v in values)

    shared = {w(r): r for r in full["rows"]}
    common = [r for r in simplex["rows"] if w(r) in shared]
    assert common, "the grid and the simplex share w = (0.5, 0.5) at least"
    for r in common:
        for v in values:
            assert r[v] == pytest.approx(shared[w(r)][v], abs=1e-6)
    assert (tmp_path / "out" / "tiny_seed0.png").is_file()
    for r in rows:  # paired resamples of the held-out pairs: an interval for every method
        lo, hi = r["hypervolume_ci"]
        assert lo <= r["hypervolume_resampled_mean"] <= hi
    # A rerun reuses the finished runs (an interrupted comparison resumes) and gives the table.
    adapters = pareto_json / "adapters"
    mtime = max(f.stat().st_mtime for f in adapters.rglob("*") if f.is_file())
    again = compare.main(
        ["--setting", "tiny", "--seeds", "1", "--methods", "soup", "mva_no_mi"]
        + ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    )
    assert max(f.stat().st_mtime for f in adapters.rglob("*") if f.is_file()) == mtime
    assert [r["hypervolume_mean"] for r in again] == [r["hypervolume_mean"] for r in rows]
    assert [r["seconds_mean"] for r in again] == [r["seconds_mean"] for r in rows]
    # ... but not one whose resolved config differs, e.g. made under other config defaults.
    cfg = OmegaConf.load(pareto_json / "config.yaml")
    assert compare.finished(pareto_json, cfg)
    cfg.data.loader.bucket_by_length = not cfg.data.loader.bucket_by_length
    assert not compare.finished(pareto_json, cfg)


def test_mod_reuses_the_no_mi_training_and_combines_at_decoding_time(compare, tmp_path):
    rows = compare.main(
        ["--setting", "tiny", "--seeds", "1", "--methods", "mod", "mva_no_mi"]
        + ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
        + ["--override", "extrapolation.candidates.values=[0.0,1.0]"]  # w in {0, 1}^2: fast
    )
    by = {r["method"]: r for r in rows}
    assert by["mod"]["trained_with"] == "mva_no_mi" and by["mod"]["runs_mean"] == 0
    assert by["mva_no_mi"]["runs_mean"] == 1
    run = tmp_path / "work" / "seed0" / "mva_no_mi"
    mod = json.loads((run / "extrapolation_mod" / "pareto.json").read_text())
    merged = json.loads((run / "extrapolation" / "pareto.json").read_text())
    assert mod["objective"]["objective"] == "ImplicitReward"  # the tiny setting's objective
    assert mod["objective"]["combination"] == "decoding"
    assert "combination" not in merged["objective"]
    values = mod["values"]

    def w(row):
        return tuple(row[f"w/{v}"] for v in values)

    assert sorted(map(w, mod["rows"])) == sorted(map(w, merged["rows"]))  # the same candidates
    assert mod["base_scores"] == merged["base_scores"]  # w = 0: the base either way
    by_w = {w(r): r for r in merged["rows"]}
    for row in mod["rows"]:
        if sum(w(row)) == 1.0:  # one value alone: the same model both ways
            for v in values:
                assert row[f"{v}/margin"] == pytest.approx(by_w[w(row)][f"{v}/margin"], abs=1e-5)
    both = by_w[(1.0, 1.0)]
    (mod_both,) = [r for r in mod["rows"] if w(r) == (1.0, 1.0)]
    assert mod_both[f"{values[0]}/margin"] != pytest.approx(both[f"{values[0]}/margin"])


def test_paired_difference_of_identical_methods_is_zero_and_a_coin_flip(compare):
    base = {"a": [0.5] * 6, "b": [0.5] * 6}
    cand = [{"a": [1, 0, 1, 1, 0.5, 1], "b": [0, 1, 0.5, 1, 1, 0]}]
    hvs = compare.resampled_hypervolumes(
        {"mva": cand, "soup": list(cand)}, base, ["a", "b"], False, seed=0, resamples=200
    )
    assert hvs["mva"] == hvs["soup"] and len(hvs["mva"]) == 200
    per_seed = [{"values": ["a", "b"], **{m: {"hypervolume_resamples": hvs[m]} for m in hvs}}]
    paired = compare._paired(per_seed, "soup", "mva")
    assert paired["mva_minus_this_ci"] == [0.0, 0.0] and paired["mva_minus_this_mean"] == 0.0
    assert paired["mva_wins_share"] == 0.5 and not paired["significant"]
    better = [{"a": [1.0] * 6, "b": [1.0] * 6}]  # dominates everything on every resample
    hvs = compare.resampled_hypervolumes(
        {"mva": better, "soup": cand}, base, ["a", "b"], False, seed=0, resamples=200
    )
    per_seed = [{"values": ["a", "b"], **{m: {"hypervolume_resamples": hvs[m]} for m in hvs}}]
    paired = compare._paired(per_seed, "soup", "mva")
    assert paired["significant"] and paired["mva_minus_this_ci"][0] > 0
    assert paired["mva_wins_share"] == 1.0


def test_values_outside_the_embedded_setting_is_a_clear_error(compare):
    with pytest.raises(SystemExit, match="--values picks embedded values"):
        compare.main(["--setting", "tiny", "--values", "helpful"])


def test_compare_methods_runs_every_method_config_and_asks_for_real_data(compare, tmp_path):
    assert "mva" in METHODS and sorted(compare.METHODS) == METHODS
    with pytest.raises(SystemExit, match="needs --data-dir.*helpful-base-test.jsonl.gz"):
        compare.main(["--setting", "hh"])
    with pytest.raises(SystemExit, match="missing helpful-base-test.jsonl.gz"):
        compare.main(["--setting", "hh", "--data-dir", str(tmp_path)])


def test_hh_setting_scores_every_candidate_two_ways_at_smoke_size(compare, tmp_path):
    """--setting hh composes +experiment=hh_study and scores each method's candidates by
    generation and by implicit-reward accuracy on the held-out pairs (tiny model, toy pairs in
    the HH-RLHF file layout, a cheap scorer in place of the reward models)."""
    hh = tmp_path / "hh"
    hh.mkdir()
    for value, path in compare.toy_files(tmp_path / "toy", n=48).items():
        shutil.copy(path, hh / compare.HH_FILES[value])
    out = tmp_path / "out"
    smoke = [
        "model=tiny",
        "trainer.max_epochs=1",
        "data.loader.chat_template=false",
        "data.loader.max_length=64",
        "data.loader.max_prompt_length=40",
        "scorer@value.helpful.scorer=sentiment",
        "scorer@value.harmless.scorer=sentiment",
        "extrapolation.objective.max_new_tokens=4",
        "extrapolation.candidates.values=[0.0,1.0]",
    ]
    rows = compare.main(
        ["--setting", "hh", "--data-dir", str(hh), "--seeds", "1", "--methods", "mva", "dpo"]
        + ["--out", str(out), "--work", str(tmp_path / "work"), "--override", *smoke]
    )
    assert sorted((r["scoring"], r["method"]) for r in rows) == [
        ("generation", "dpo"),
        ("generation", "mva"),
        ("pairs", "dpo"),
        ("pairs", "mva"),
    ]
    pairs = json.loads((out / "hh_pairs.json").read_text())["per_seed"][0]
    assert pairs["reference"] == [0.5, 0.5]  # the base: every margin 0, a tie counts half
    assert len(pairs["mva"]["points"]) == 4 and len(pairs["dpo"]["points"]) == 2
    run = tmp_path / "work" / "seed0" / "mva"
    manifest = json.loads((run / "extrapolation_pairs" / "pareto.json").read_text())
    assert manifest["objective"]["objective"] == "ImplicitReward"
    generation = json.loads((run / "extrapolation" / "pareto.json").read_text())
    assert generation["objective"]["objective"] == "GenerationScore"
    for name in ("hh_generation", "hh_pairs"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}_seed0.png").is_file()
    config = OmegaConf.load(run / "config.yaml")
    assert config.data.split.seed == 0 and config.data.split.by_prompt  # the fixed study split
