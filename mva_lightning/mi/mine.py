"""MINE (Belghazi et al. 2018): a statistics network T_phi(u, v) as an auxiliary head.

Donsker-Varadhan lower bound on I(U; V), in nats:

    I >= E_joint[T(u, v)] - log E_marginal[exp T(u, v')],

with joint samples the paired rows (u_k, v_k) and marginal samples (u_k, v_pi(k)), v shuffled
across rows. The head maximises the bound (:meth:`MINE.head_loss`, its own optimizer, features
detached); the value vectors minimise alpha * bound (:meth:`MINE.forward`, gradient to the
features only). The gradient of the log term is biased on minibatches; MINE corrects it by
replacing the denominator E[exp T] of grad log E[exp T] = grad E[exp T] / E[exp T] with an
exponential moving average over steps (the buffer ``ema``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from mva_lightning.mi.base import MIEstimate, MIEstimator, check_pairs
from mva_lightning.model.lora import LoraFactors

log = logging.getLogger(__name__)


def dv_bound(t_joint: torch.Tensor, t_marg: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan bound mean(T_joint) - log mean(exp T_marg), stable in log space.

    Args:
        t_joint: (n,) statistics on paired samples.
        t_marg: (m,) statistics on shuffled (marginal) samples.

    Returns:
        0-dim tensor, nats.
    """
    log_mean_exp = torch.logsumexp(t_marg, dim=0) - math.log(t_marg.shape[0])
    return t_joint.mean() - log_mean_exp


def _zero_keeping_graph(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0 with a graph to ``tensors`` and zero gradient, even where they hold NaN or inf."""
    # nan_to_num's backward masks the non-finite entries, so no NaN reaches .grad
    return sum((torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).sum() for t in tensors)


class MINE(MIEstimator):
    """MINE-style statistics network T_phi(u, v) -> scalar, pooled over modules.

    All modules' samples are pooled: U = cat_m x[m] (n, dim_x), V = cat_m y[m] (n, dim_y), so
    every module must give features of the same widths (with ``activations``: the same rank r).

    Args:
        dim_x: Width of value i's features (e.g. r).
        dim_y: Width of value j's features.
        hidden: Width of the two hidden layers of T.
        features: ``activations`` (default: per-token u = A_i h, v = A_j h) or ``lora_a``.
        ema_rate: Weight of the newest minibatch in the moving average of E[exp T_marg].
        clamp: T outputs are clamped to [-clamp, clamp] (``float("inf")`` disables it).
        head_steps: Updates of T (on the same detached batch) per training step of the value
            vectors, so that the adversary keeps up with them.
        seed: Seeds the generator of the marginal shuffles (None: the global RNG). A training
            penalty sets it, so that its shuffles do not depend on how many other draws
            (e.g. data loader iterators) the global RNG served before.
    """

    def __init__(
        self,
        dim_x: int,
        dim_y: int,
        hidden: int = 64,
        features: str = "activations",
        ema_rate: float = 0.01,
        clamp: float = 20.0,
        head_steps: int = 1,
        seed: int | None = None,
    ) -> None:
        super().__init__(features)
        if dim_x < 1 or dim_y < 1 or hidden < 1:
            raise ValueError(f"MINE: dims must be >= 1, got {dim_x=}, {dim_y=}, {hidden=}")
        if not 0.0 < ema_rate <= 1.0:
            raise ValueError(f"MINE: ema_rate must be in (0, 1], got {ema_rate}")
        if not clamp > 0:
            raise ValueError(f"MINE: clamp must be > 0, got {clamp}")
        if head_steps < 1:
            raise ValueError(f"MINE: head_steps must be >= 1, got {head_steps}")
        self.head_steps = head_steps
        self.dim_x, self.dim_y, self.hidden = dim_x, dim_y, hidden
        self.ema_rate, self.clamp = ema_rate, clamp
        self.net = nn.Sequential(
            nn.Linear(dim_x + dim_y, hidden),
            nn.ELU(),
            nn.Linear(hidden, hidden),
            nn.ELU(),
            nn.Linear(hidden, 1),
        )
        # moving average of mean exp T_marg; 0 = not yet initialised (the true value is > 0)
        self.register_buffer("ema", torch.zeros(()))
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def check_factors(self, factors: Mapping[str, LoraFactors]) -> None:
        """The pooled features must have the head's widths at every module.

        ``activations`` gives r columns (A h), ``lora_a`` gives d_in columns.

        Raises:
            ValueError: naming the module, the width it gives and the config keys to set.
        """
        for m, f in factors.items():
            width = f.A.shape[0] if self.features == "activations" else f.A.shape[1]
            if width != self.dim_x or width != self.dim_y:
                raise ValueError(
                    f"mi.estimator: features={self.features!r} give {width} columns at {m} but "
                    f"the MINE head has dim_x={self.dim_x}, dim_y={self.dim_y}; set "
                    f"mi.estimator.dim_x=mi.estimator.dim_y={width} (MINE pools all modules, "
                    "so every adapted module must give the same width)"
                )

    def reset(self) -> None:
        """Re-initialise T's weights (from the global RNG) and forget the moving average."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        self.ema.zero_()

    def _pool(
        self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_pairs(x, y)
        if not x:
            raise ValueError("MINE: no modules given")
        for m in x:
            if x[m].dim() != 2 or y[m].dim() != 2:
                raise ValueError(f"MINE at {m}: features must be 2-D (n, d)")
            if x[m].shape[1] != self.dim_x or y[m].shape[1] != self.dim_y:
                raise ValueError(
                    f"MINE at {m}: feature widths ({x[m].shape[1]}, {y[m].shape[1]}) differ from "
                    f"the head's (dim_x={self.dim_x}, dim_y={self.dim_y}); pooling over modules "
                    "needs the same widths everywhere"
                )
        u = torch.cat([x[m] for m in x]).float()  # (n, dim_x), n = sum_m n_m
        v = torch.cat([y[m] for m in x]).float()  # (n, dim_y)
        if u.shape[0] < 2:
            raise ValueError(f"MINE: need at least 2 paired samples, got {u.shape[0]}")
        return u, v

    def _scores(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T on joint pairs (u_k, v_k) and marginal pairs (u_k, v_perm(k)); (n,) each."""
        n = u.shape[0]
        if self.generator is None:
            perm = torch.randperm(n, device=u.device)
        else:
            perm = torch.randperm(n, generator=self.generator).to(u.device)
        joint = torch.cat([u, v], dim=1)  # (n, dim_x + dim_y)
        marg = torch.cat([u, v[perm]], dim=1)  # (n, dim_x + dim_y), v shuffled across rows
        both = torch.cat([joint, marg])  # (2n, dim_x + dim_y): one pass through T
        t = self.net(both) if params is None else functional_call(self.net, params, (both,))
        t = t.squeeze(-1).clamp(-self.clamp, self.clamp)  # (2n,)
        return t[:n], t[n:]

    def forward(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> MIEstimate:
        """DV bound on the pooled features, nats; gradient flows to the features, not to T.

        Returns:
            MIEstimate with the bound, or with a graph-keeping 0 and ``finite=False`` when the
            bound is inf/NaN (a warning is logged; the caller skips the penalty).
        """
        u, v = self._pool(x, y)
        # T's weights enter as constants: the value vectors' backward leaves the head's .grad alone
        frozen = {k: p.detach() for k, p in self.net.named_parameters()}
        t_joint, t_marg = self._scores(u, v, frozen)
        value = dv_bound(t_joint, t_marg)
        if not torch.isfinite(value):
            log.warning("MINE: DV bound is %s; returning 0 (finite=False)", value.item())
            return MIEstimate(value=_zero_keeping_graph([u, v]), finite=False)
        return MIEstimate(value=value)

    def head_loss(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss for T: minus the DV bound, with the moving-average gradient correction.

        The value equals -bound; its gradient w.r.t. T's weights is
        -(grad mean T_joint - grad mean exp T_marg / ema). Updates ``ema`` (the first call sets
        it to the batch's mean exp T_marg). Never NaN: a non-finite batch gives a 0 that keeps
        the graph (zero gradient), leaves ``ema`` as it was and logs a warning.
        """
        u, v = self._pool(
            {m: t.detach() for m, t in x.items()}, {m: t.detach() for m, t in y.items()}
        )
        t_joint, t_marg = self._scores(u, v)
        log_mean_exp = torch.logsumexp(t_marg, dim=0) - math.log(t_marg.shape[0])  # log E[e^T]
        mean_exp = log_mean_exp.detach().exp()
        if not (torch.isfinite(t_joint.mean()) and torch.isfinite(mean_exp)):
            log.warning("MINE head: non-finite statistics (T exploded?); skipping this head step")
            return _zero_keeping_graph(list(self.net.parameters()))
        with torch.no_grad():
            if self.ema <= 0:
                self.ema.copy_(mean_exp)
            else:
                self.ema.mul_(1.0 - self.ema_rate).add_(self.ema_rate * mean_exp)
        # value log E[e^T]; gradient (E[e^T] / ema) * grad log E[e^T] = grad E[e^T] / ema
        lme = log_mean_exp.detach()
        log_term = lme + (log_mean_exp - lme) * (mean_exp / self.ema)
        return -(t_joint.mean() - log_term)

    def extra_repr(self) -> str:
        return f"features={self.features!r}, ema_rate={self.ema_rate}, clamp={self.clamp}"


def estimate_mi(
    estimator: MINE,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    n_evals: int = 5,
    num_threads: int | None = 1,
) -> float:
    """Train a fresh copy of ``estimator``'s head on samples (x, y) and return I in nats.

    ``estimator`` itself is left untouched (its architecture and settings are copied, its
    weights re-initialised from ``seed``); the global RNG state is restored afterwards.

    Args:
        estimator: A MINE head; only its configuration is used.
        x: (n, dim_x) samples, paired with
        y: (n, dim_y).
        steps: Adam steps on minibatches of ``batch_size`` rows drawn without replacement.
        lr: Adam learning rate.
        batch_size: Rows per step (capped at n).
        seed: Seeds T's init, the minibatches and the shuffles.
        n_evals: The DV bound on the full set is evaluated every ``max(1, steps // 50)`` steps;
            the last ``n_evals`` evaluations are averaged.
        num_threads: On the CPU, torch threads while the head trains (restored afterwards;
            None leaves them). Steps of a small MLP are latency-bound: on a loaded 2-core
            machine one thread was 30x faster than two.

    Returns:
        The DV estimate in nats (a float; inf/NaN only if every evaluation diverged).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"estimate_mi: expected (n, d) pairs, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if steps < 1 or n_evals < 1:
        raise ValueError(f"estimate_mi: steps and n_evals must be >= 1, got {steps}, {n_evals}")
    x, y = x.detach().float(), y.detach().float()
    threads = torch.get_num_threads()
    if num_threads is not None and x.device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        return _train_and_evaluate(estimator, x, y, steps, lr, batch_size, seed, n_evals)
    finally:
        torch.set_num_threads(threads)


def _train_and_evaluate(
    estimator: MINE,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    n_evals: int,
) -> float:
    n = x.shape[0]
    batch_size = min(batch_size, n)
    every = max(1, steps // 50)
    full_x, full_y = {"pooled": x}, {"pooled": y}
    evals: list[float] = []
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else None):
        torch.manual_seed(seed)
        head = copy.deepcopy(estimator).to(x.device)
        head.reset()
        head.train()
        opt = torch.optim.Adam(head.net.parameters(), lr=lr)
        for step in range(1, steps + 1):
            rows = torch.randperm(n, device=x.device)[:batch_size]
            loss = head.head_loss({"pooled": x[rows]}, {"pooled": y[rows]})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (steps - step) % every == 0 and (steps - step) // every < n_evals:
                with torch.no_grad():
                    est = head(full_x, full_y)
                if est.finite:
                    evals.append(est.value.item())
    return sum(evals) / len(evals) if evals else float("nan")
