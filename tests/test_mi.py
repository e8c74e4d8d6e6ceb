"""MI penalties: hand-derived numbers, known answers, gradient routing, numerics, bad inputs."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from mva_lightning.mi import (
    HSIC,
    MINE,
    MIEstimate,
    Orthogonal,
    activation_features,
    estimate_mi,
    hsic,
    lora_features,
    median_sigma,
    rbf_kernel,
)
from mva_lightning.mi.mine import dv_bound
from mva_lightning.model.lora import LoraFactors

# ---------------------------------------------------------------- independent NumPy references


def np_hsic(x: np.ndarray, y: np.ndarray, sx: float, sy: float) -> float:
    """tr(K H L H) / n^2 with explicit loops for K, L and explicit matrices for H."""
    n = x.shape[0]
    gram_k = np.zeros((n, n))
    gram_l = np.zeros((n, n))
    for a in range(n):
        for b in range(n):
            gram_k[a, b] = math.exp(-np.sum((x[a] - x[b]) ** 2) / (2 * sx**2))
            gram_l[a, b] = math.exp(-np.sum((y[a] - y[b]) ** 2) / (2 * sy**2))
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(gram_k @ h @ gram_l @ h) / n**2)


def np_median_distance(x: np.ndarray) -> float:
    n = x.shape[0]
    return float(
        np.median([np.linalg.norm(x[a] - x[b]) for a in range(n) for b in range(a + 1, n)])
    )


def gaussians(n: int, d: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d independent pairs (x_k, y_k) with corr(x_k, y_k) = rho; I = -d/2 log(1 - rho^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    e = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho**2) * e


def make_factors(
    seed: int, modules=("q", "v"), r=4, d_in=6, d_out=5, grad=True
) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        a = torch.randn(r, d_in, generator=g).requires_grad_(grad)
        b = torch.randn(d_out, r, generator=g).requires_grad_(grad)
        out[m] = LoraFactors(A=a, B=b, scale=2.0)
    return out


# ---------------------------------------------------------------------------------------- HSIC


@pytest.mark.parametrize("sigma", [1.0, "median"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hsic_matches_numpy(sigma, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    y = 0.5 * x[:, :2] + rng.normal(size=(7, 2))
    sx = np_median_distance(x) if sigma == "median" else 1.0
    sy = np_median_distance(y) if sigma == "median" else 1.0
    expected = np_hsic(x, y, sx, sy)
    tx, ty = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    if sigma == "median":
        assert median_sigma(tx).item() == pytest.approx(sx, abs=1e-5)
        assert median_sigma(ty).item() == pytest.approx(sy, abs=1e-5)
    got = HSIC(features="activations", sigma=sigma)({"m": tx}, {"m": ty})
    assert isinstance(got, MIEstimate) and got.finite
    assert got.value.item() == pytest.approx(expected, abs=1e-5)
    assert hsic(tx, ty, sx, sy).item() == pytest.approx(expected, abs=1e-5)


def test_rbf_kernel_and_median_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])  # distances 5, 1, sqrt(18)
    k = rbf_kernel(x, 2.0)
    assert k[0, 1].item() == pytest.approx(math.exp(-25 / 8))
    assert k[0, 2].item() == pytest.approx(math.exp(-1 / 8))
    assert torch.allclose(k.diagonal(), torch.ones(3)) and torch.allclose(k, k.T)
    assert median_sigma(x).item() == pytest.approx(math.sqrt(18))  # median of {1, sqrt 18, 5}
    x4 = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # distances 1 3 7 2 6 4 -> median 3.5
    assert median_sigma(x4).item() == pytest.approx(3.5)
    assert median_sigma(torch.zeros(5, 3)).item() == 1.0  # all rows equal: fall back to 1


def test_hsic_sums_modules():
    g = torch.Generator().manual_seed(1)
    x = {m: torch.randn(6, 3, generator=g) for m in "ab"}
    y = {m: torch.randn(6, 2, generator=g) for m in "ab"}
    total = HSIC()(x, y).value
    assert total.item() == pytest.approx((hsic(x["a"], y["a"]) + hsic(x["b"], y["b"])).item())


def test_hsic_independent_near_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 1, generator=g)
    y_ind = torch.randn(500, 1, generator=g)
    y_dep = x + 0.1 * torch.randn(500, 1, generator=g)
    h_ind, h_dep = hsic(x, y_ind).item(), hsic(x, y_dep).item()
    assert 0 <= h_ind < 2e-3
    assert h_ind < 0.05 * h_dep


# ---------------------------------------------------------------------------------- orthogonal


def test_orthogonal_hand_value():
    a_i = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    a_j = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    # A_i A_j^T = [[1, 4], [1, -1]] -> 1 + 16 + 1 + 1 = 19
    assert Orthogonal()({"m": a_i}, {"m": a_j}).value.item() == pytest.approx(19.0)
    assert Orthogonal()({"m": a_i, "n": a_j}, {"m": a_j, "n": a_j}).value.item() == pytest.approx(
        19.0 + (2.0**2 + 2 * 2.0**2 + 5.0**2)  # A_j A_j^T = [[2, 2], [2, 5]] -> 37
    )
    # rows as samples: x^T y = [[1, 1, 0], [2, 0, 1], [0, 2, -1]] -> 12, / n^2 = 3
    assert Orthogonal("activations")({"m": a_i}, {"m": a_j}).value.item() == pytest.approx(3.0)
    ortho = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -2.0]])
    assert Orthogonal()({"m": torch.eye(3)[:2]}, {"m": ortho}).value.item() == 0.0


# -------------------------------------------------------------------------------------- MINE


@pytest.fixture
def one_thread():
    """Tiny MLP steps run faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GRID = [(rho, d) for rho in (0.5, 0.8, 0.95) for d in (1, 4)]
# 800 Adam steps on 8000 samples: every grid point within 14 % (seeds 0-2), 4 s on a busy core
FIT = dict(steps=800, lr=3e-3, batch_size=512)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("rho", "d"),
    [(rho, d) if rho == 0.8 else pytest.param(rho, d, marks=pytest.mark.slow) for rho, d in GRID],
)
def test_mine_correlated_gaussians(rho, d):
    x, y = gaussians(8000, d, rho, seed=0)
    est = estimate_mi(MINE(d, d), x, y, seed=0, **FIT)
    true = -0.5 * d * math.log(1 - rho**2)
    assert abs(est - true) < 0.15 * true, (est, true)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("d", [1, 4])
def test_mine_independent_near_zero(d):
    x, y = gaussians(8000, d, 0.0, seed=1)
    est = estimate_mi(MINE(d, d), x, y, seed=1, **FIT)
    assert abs(est) < 0.05, est


def test_estimate_mi_leaves_estimator_and_rng_alone():
    head = MINE(2, 2)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    state = torch.get_rng_state()
    x, y = gaussians(300, 2, 0.5, seed=0)
    a = estimate_mi(head, x, y, steps=20, lr=1e-3, batch_size=64, seed=3)
    b = estimate_mi(head, x, y, steps=20, lr=1e-3, batch_size=64, seed=3)
    assert a == b  # seeded
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())


def test_mine_head_loss_value_and_ema_correction():
    torch.manual_seed(0)
    head = MINE(2, 3, hidden=8, ema_rate=0.25)
    x = {"m": torch.randn(16, 2)}
    y = {"m": torch.randn(16, 3)}

    def manual_scores(seed):
        torch.manual_seed(seed)
        perm = torch.randperm(16)  # the one draw head_loss makes
        t_joint = head.net(torch.cat([x["m"], y["m"]], 1)).squeeze(-1)
        t_marg = head.net(torch.cat([x["m"], y["m"][perm]], 1)).squeeze(-1)
        return t_joint, t_marg

    # first call: ema := mean exp T_marg, the loss is minus the plain DV bound
    torch.manual_seed(5)
    loss = head.head_loss(x, y)
    t_joint, t_marg = manual_scores(5)
    mean_exp = t_marg.exp().mean()
    assert head.ema.item() == pytest.approx(mean_exp.item(), rel=1e-5)
    assert loss.item() == pytest.approx(-(t_joint.mean() - mean_exp.log()).item(), abs=1e-6)
    assert loss.item() == pytest.approx(-dv_bound(t_joint, t_marg).item(), abs=1e-6)

    # later call: grad = -(grad mean T_joint - grad mean exp T_marg / ema_new)
    head.ema.fill_(3.0)
    head.zero_grad()
    torch.manual_seed(6)
    head.head_loss(x, y).backward()
    got = [p.grad.clone() for p in head.net.parameters()]
    head.zero_grad()
    t_joint, t_marg = manual_scores(6)
    mean_exp = t_marg.exp().mean()
    ema_new = 0.75 * 3.0 + 0.25 * mean_exp.detach()
    assert head.ema.item() == pytest.approx(ema_new.item(), rel=1e-5)
    (-(t_joint.mean() - mean_exp / ema_new)).backward()
    for g, p in zip(got, head.net.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_mine_forward_leaves_head_grads_alone():
    head = MINE(3, 3)
    x = {"m": torch.randn(32, 3, requires_grad=True)}
    y = {"m": torch.randn(32, 3)}
    head(x, y).value.backward()
    assert x["m"].grad is not None and x["m"].grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters())


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_mine_divergence_is_flagged_not_nan(poison, caplog):
    torch.manual_seed(0)
    head = MINE(3, 3, clamp=float("inf"))
    y = {"m": torch.randn(32, 3)}
    if poison == "nan":
        x = torch.randn(32, 3)
        x[3, 1] = float("nan")
    else:
        x = torch.full((32, 3), 3e38)  # T ~ 1e37 per row: its mean overflows without the clamp
        clamped = MINE(3, 3)
        clamped.load_state_dict(head.state_dict())
        assert clamped({"m": x}, y).finite  # the default clamp keeps the same head finite
    x.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="mva_lightning.mi.mine"):
        est = head({"m": x}, y)
        assert not est.finite and est.value.item() == 0.0
        est.value.backward()
        assert torch.isfinite(x.grad).all()
        assert "MINE" in caplog.text
        caplog.clear()
        loss = head.head_loss({"m": x}, y)
        assert loss.item() == 0.0
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in head.parameters())
        assert head.ema.item() == 0.0  # a bad batch does not poison the moving average
        assert "non-finite" in caplog.text


# ------------------------------------------------------------------------ features and routing


def estimators_for(kind: str, r: int, d_in: int, d_out: int):
    width = {"lora_a": d_in, "activations": r}[kind]
    return [
        HSIC(kind, sigma=1.0),
        HSIC(kind, sigma="median"),
        Orthogonal(kind),
        MINE(width, width, hidden=16, features=kind),
    ]


@pytest.mark.parametrize("kind", ["lora_a", "activations"])
def test_gradient_reaches_value_i_only(kind):
    r, d_in, d_out = 4, 6, 5
    f_i = make_factors(0, r=r, d_in=d_in, d_out=d_out)
    f_j = make_factors(1, r=r, d_in=d_in, d_out=d_out)  # trainable elsewhere: must be detached
    h = {m: torch.randn(40, d_in, requires_grad=True) for m in f_i}
    for est in estimators_for(kind, r, d_in, d_out):
        for f in (*f_i.values(), *f_j.values()):
            f.A.grad = f.B.grad = None
        if kind == "activations":
            x, y = activation_features(h, f_i, f_j, max_samples=32, generator=None)
        else:
            x, y = lora_features(f_i, f_j, kind)
        out = est(x, y)
        assert out.finite and out.value.dim() == 0
        out.value.backward()
        for m in f_i:
            assert f_i[m].A.grad is not None and f_i[m].A.grad.abs().sum() > 0, (est, m)
            assert f_j[m].A.grad is None and f_j[m].B.grad is None, (est, m)
            assert h[m].grad is None


def test_lora_features_shapes_and_values():
    f_i, f_j = make_factors(0, grad=False), make_factors(1, grad=False)
    x, y = lora_features(f_i, f_j, "lora_a")
    assert torch.equal(x["q"], f_i["q"].A) and torch.equal(y["v"], f_j["v"].A)
    assert x["q"].shape == (4, 6)  # (r, d_in)


def test_activation_features_subsample_keeps_pairs():
    f_i = make_factors(0, grad=False)
    f_j = {m: LoraFactors(A=f.A.clone(), B=f.B, scale=f.scale) for m, f in f_i.items()}
    h = {m: torch.randn(50, 6) for m in f_i}
    x, y = activation_features(
        h, f_i, f_j, max_samples=20, generator=torch.Generator().manual_seed(0)
    )
    assert x["q"].shape == (20, 4) and torch.equal(x["q"], y["q"])  # same rows for x and y
    full = h["q"] @ f_i["q"].A.T  # (50, 4)
    assert all(any(torch.allclose(row, f) for f in full) for row in x["q"])
    x2, _ = activation_features(h, f_i, f_j, 20, torch.Generator().manual_seed(0))
    assert torch.equal(x["q"], x2["q"])
    x3, _ = activation_features(h, f_i, f_j, max_samples=100)
    assert torch.allclose(x3["q"], full)


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("cls", [HSIC, Orthogonal])
def test_unknown_features_named(cls):
    with pytest.raises(ValueError, match="bogus"):
        cls(features="bogus")
    with pytest.raises(ValueError, match="bogus"):
        MINE(2, 2, features="bogus")


def test_delta_w_features_are_rejected():
    # removed: delta W = s B A is 0 at init (B = 0), so its dependence and gradient are 0
    allowed = r"expected one of \('lora_a', 'activations'\), got 'delta_w'"
    for make in (
        lambda: HSIC(features="delta_w"),
        lambda: Orthogonal(features="delta_w"),
        lambda: MINE(6, 6, features="delta_w"),
    ):
        with pytest.raises(ValueError, match=allowed):
            make()
    f_i, f_j = make_factors(0, grad=False), make_factors(1, grad=False)
    with pytest.raises(ValueError, match="'delta_w'"):
        lora_features(f_i, f_j, "delta_w")


def test_bad_inputs_raise_clear_errors():
    f_i, f_j = make_factors(0, grad=False), make_factors(1, grad=False)
    with pytest.raises(ValueError, match="bogus"):
        lora_features(f_i, f_j, "bogus")
    with pytest.raises(ValueError, match="activation_features"):
        lora_features(f_i, f_j, "activations")
    with pytest.raises(ValueError, match="different modules"):
        lora_features(f_i, make_factors(1, modules=("q",), grad=False), "lora_a")
    with pytest.raises(ValueError, match="without LoRA factors"):
        activation_features({"k": torch.randn(3, 6)}, f_i, f_j, 10)
    with pytest.raises(ValueError, match="hidden states"):
        activation_features({"q": torch.randn(3, 7)}, f_i, f_j, 10)
    with pytest.raises(ValueError, match="median"):
        HSIC(sigma="mean")
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    for est in (HSIC(), Orthogonal(), MINE(3, 3)):
        with pytest.raises(ValueError, match="different modules"):
            est({"q": a}, {"v": a})
        with pytest.raises(ValueError, match="4 vs 5 samples"):
            est({"q": a}, {"q": b})
    with pytest.raises(ValueError, match="same widths"):
        MINE(3, 3)({"q": a, "v": torch.randn(4, 2)}, {"q": a, "v": torch.randn(4, 3)})
