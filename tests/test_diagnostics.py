"""Interference diagnostics: hand-set cosines, MI known answers, files, loggers, the callback."""

from __future__ import annotations

import copy
import csv
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, toy_overrides
from safetensors.torch import load_file

from mva_lightning.diagnostics import interference
from mva_lightning.diagnostics.callback import InterferenceDiagnostics, wandb_payload
from mva_lightning.model import lora
from mva_lightning.train import train

VALUES = ["x", "y", "z"]


@pytest.fixture
def policy(base):
    """Three value vectors: y = 2 x (same direction), z = -x at q_proj, random elsewhere."""
    model = lora.add_value_vectors(copy.deepcopy(base.model), VALUES, r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(0)
    fa, fb, fc = (lora.lora_factors(model, v) for v in VALUES)
    with torch.no_grad():
        for m in fa:
            fa[m].B.normal_(generator=g)
            fb[m].A.copy_(fa[m].A)
            fb[m].B.copy_(2.0 * fa[m].B)
            if m.endswith("q_proj"):
                fc[m].A.copy_(fa[m].A)
                fc[m].B.copy_(-fa[m].B)
            else:
                fc[m].B.normal_(generator=g)
    return model


def test_cosine_table_hand_set(policy):
    pairs = interference.cosine_table(policy, VALUES)
    assert [(p.value_a, p.value_b) for p in pairs] == [("x", "y"), ("x", "z"), ("y", "z")]
    ab, ac, _ = pairs
    assert len(ab.cosine) == 8 and all(not m.startswith("base_model") for m in ab.cosine)
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in ab.cosine.values())
    q = [m for m in ac.cosine if m.endswith("q_proj")]
    assert len(q) == 2 and all(ac.cosine[m] == pytest.approx(-1.0, abs=1e-5) for m in q)
    others = [c for m, c in ac.cosine.items() if m not in q]
    assert all(abs(c) < 0.5 for c in others)  # independent random directions
    assert ac.mean_cosine == pytest.approx((-2.0 + sum(others)) / 8, abs=1e-6)
    assert ac.mean_abs_cosine == pytest.approx((2.0 + sum(abs(c) for c in others)) / 8, abs=1e-6)
    mat = interference.abs_cosine_matrix(pairs, VALUES)
    assert mat[0, 1] == mat[1, 0] == pytest.approx(1.0, abs=1e-5) and mat[2, 2] == 1.0
    with pytest.raises(ValueError, match="at least two values"):
        interference.cosine_table(policy, ["x"])


def test_base_projections_ignore_adapters_and_padding(policy):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0  # 3 padding tokens
    batch = {"input_ids": torch.randint(0, 250, (3, 10), generator=g), "attention_mask": mask}
    # the hidden states the plain base model feeds each adapted module, real tokens only
    hidden: dict[str, torch.Tensor] = {}
    layers = dict(lora.lora_layers(policy))
    hooks = [
        layer.register_forward_pre_hook(lambda _m, a, n=n: hidden.setdefault(n, a[0]))
        for n, layer in layers.items()
    ]
    with torch.no_grad(), lora.using_weights(policy, {}):
        policy(**batch)
    for h in hooks:
        h.remove()

    lora.set_weights(policy, {"x": 1.0, "z": -0.5})  # adapters on: must not matter
    proj = interference.base_projections(policy, VALUES, [batch])
    assert lora.get_weights(policy) == {"x": 1.0, "y": 0.0, "z": -0.5}  # restored
    assert set(proj) == set(VALUES) and all(len(p) == 8 for p in proj.values())
    for v in VALUES:
        for m, f in lora.lora_factors(policy, v).items():
            expected = hidden[m][mask.bool()] @ f.A.T  # (27, r): 30 tokens - 3 padding
            torch.testing.assert_close(proj[v][m], expected.detach())
    # with the adapter on, layer-1 inputs differ: the diagnostic reads the base model's
    m1 = next(m for m in hidden if "layers.1." in m)
    adapted: dict[str, torch.Tensor] = {}
    hook = layers[m1].register_forward_pre_hook(lambda _m, a: adapted.setdefault("h", a[0]))
    with torch.no_grad():
        policy(**batch)
    hook.remove()
    assert not torch.allclose(adapted["h"][mask.bool()], hidden[m1][mask.bool()])

    sub = interference.base_projections(policy, VALUES, [batch, batch], max_tokens=5)
    assert all(t.shape == (5, 4) for p in sub.values() for t in p.values())
    m0 = next(iter(hidden))
    # the same token rows for every value and module: y's A equals x's, so rows match exactly
    assert torch.equal(sub["x"][m0], sub["y"][m0])
    assert all(any(torch.equal(row, full) for full in proj["z"][m0]) for row in sub["z"][m0])
    with pytest.raises(ValueError, match="no batches"):
        interference.base_projections(policy, VALUES, [])


def test_activation_mi_known_answers():
    """Isotropic h: u = Q_1 h and v = Q_1 h (the same rows) share everything (large MI);
    v = Q_2 h with Q_2's rows orthogonal to Q_1's is independent of u (MI ~ 0)."""
    g = torch.Generator().manual_seed(2)
    u, same, indep = {}, {}, {}
    for m in ("q", "v"):
        h = torch.randn(1500, 64, generator=g)
        q, _ = torch.linalg.qr(torch.randn(64, 8, generator=g))  # orthonormal columns
        scale = 0.01 if m == "v" else 1.0  # standardisation makes the scale irrelevant
        u[m], same[m], indep[m] = h @ q[:, :4], scale * h @ q[:, :4], h @ q[:, 4:]
    mi_same, per_module = interference.activation_mi(u, same, steps=300)
    mi_indep, _ = interference.activation_mi(u, indep, steps=300)
    assert mi_same > 1.0 and per_module == {}
    assert abs(mi_indep) < 0.1, mi_indep
    _, per_module = interference.activation_mi(u, indep, steps=50, per_module=True)
    assert set(per_module) == {"q", "v"}
    with pytest.raises(ValueError, match="different modules"):
        interference.activation_mi({"q": u["q"]}, {"v": u["v"]})


def test_tables_scalars_and_heatmap(policy, tmp_path):
    pairs = interference.interference(policy, VALUES, projections=None)
    assert all(p.mi is None for p in pairs)
    pairs[0].mi = 0.25
    rows = interference.table_rows(pairs)
    assert len(rows) == 3 * (8 + 1) and list(rows[0]) == [
        "value_a",
        "value_b",
        "module",
        "cosine",
        "mi",
    ]
    total = rows[8]
    assert total["module"] == interference.ALL_MODULES and total["mi"] == 0.25
    assert total["cosine"] == pytest.approx(pairs[0].mean_cosine)
    scalars = interference.scalars(pairs)
    assert scalars["diagnostics/cos/x-y"] == pytest.approx(1.0, abs=1e-5)
    assert scalars["diagnostics/mi/x-y"] == 0.25 and "diagnostics/mi/x-z" not in scalars
    summary = interference.summary(pairs, VALUES)
    assert json.loads(json.dumps(summary))["pairs"][1]["mi"] is None  # strict JSON, no NaN
    png = interference.plot_heatmap(pairs, VALUES, tmp_path / "d" / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob("*.tmp"))


def test_callback_waits_for_the_last_stage(tmp_path):
    cb = InterferenceDiagnostics(dirpath=str(tmp_path / "diag"))
    module = SimpleNamespace(finished=False, values=["x", "y"])
    trainer = SimpleNamespace(is_global_zero=True)
    cb.on_fit_end(trainer, module)  # fit stopped before its last stage: nothing (no policy used)
    assert not (tmp_path / "diag").exists() and cb.metrics() == {}
    module.finished = True
    cb.on_fit_end(SimpleNamespace(is_global_zero=False), module)  # not rank zero
    assert not (tmp_path / "diag").exists()
    with pytest.raises(ValueError, match="max_batches"):
        InterferenceDiagnostics(max_batches=-1)
    with pytest.raises(ValueError, match="diagnostics.split"):
        InterferenceDiagnostics(split="dev")


class WandbLogger:  # named like Lightning's: the callback recognises W&B by class name
    def __init__(self):
        self.logged, self.metrics = [], []

    @property
    def experiment(self):
        return SimpleNamespace(log=self.logged.append)

    def log_metrics(self, metrics, step):
        self.metrics.append((metrics, step))

    def save(self):
        pass


def test_wandb_gets_a_table_and_an_image(policy, tmp_path):
    import wandb

    cb = InterferenceDiagnostics()
    cb.pairs = interference.interference(policy, VALUES, projections=None)
    png = interference.plot_heatmap(cb.pairs, VALUES, tmp_path / "h.png")
    payload = wandb_payload(cb.pairs, png)
    table = payload["diagnostics/interference"]
    assert isinstance(table, wandb.Table) and len(table.data) == 27
    assert table.columns == ["value_a", "value_b", "module", "cosine", "mi"]
    assert isinstance(payload["diagnostics/cosine_heatmap"], wandb.Image)
    logger = WandbLogger()
    trainer = SimpleNamespace(loggers=[logger], global_step=7, callback_metrics={})
    cb._log(trainer, interference.scalars(cb.pairs), png)
    assert logger.metrics[0][1] == 7 and "diagnostics/cos/x-y" in logger.metrics[0][0]
    assert set(logger.logged[0]) == {"diagnostics/interference", "diagnostics/cosine_heatmap"}
    assert trainer.callback_metrics == {}  # results stay on the callback; train() collects them
    assert cb.metrics()["diagnostics/cos/y-z"] == pytest.approx(
        interference.scalars(cb.pairs)["diagnostics/cos/y-z"]
    )


def test_run_writes_diagnostics(toy_data, tmp_path):
    out = tmp_path / "run"
    extra = [
        "+trainer.limit_train_batches=3",
        "~extrapolation",
        "callbacks.diagnostics.mine_steps=50",
    ]
    metrics = train(compose(toy_overrides(toy_data, out, *extra)))
    folder = out / "diagnostics"
    rows = list(csv.DictReader((folder / "interference.csv").open()))
    assert len(rows) == 9 and rows[-1]["module"] == interference.ALL_MODULES
    summary = json.loads((folder / "interference.json").read_text())
    pair = summary["pairs"][0]
    assert (pair["value_a"], pair["value_b"]) == ("helpful", "harmless")
    assert (folder / "cosine_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["diagnostics/cos/helpful-harmless"] == pytest.approx(pair["mean_cosine"])
    assert metrics["diagnostics/mi/helpful-harmless"] == pytest.approx(pair["mi"])
    assert "diagnostics/cos/helpful-harmless" in (out / "csv" / "metrics.csv").read_text()
    # cosine recomputed by hand from the saved adapter files: s B A, flattened
    files = {
        v: load_file(out / "adapters" / v / "adapter_model.safetensors")
        for v in ("helpful", "harmless")
    }
    module = next(iter(pair["cosine"]))  # e.g. model.layers.0.self_attn.q_proj
    key = f"base_model.model.{module}"
    dw = {v: files[v][f"{key}.lora_B.weight"] @ files[v][f"{key}.lora_A.weight"] for v in files}
    cos = torch.nn.functional.cosine_similarity(
        dw["helpful"].flatten(), dw["harmless"].flatten(), 0
    )
    assert pair["cosine"][module] == pytest.approx(cos.item(), abs=1e-5)
