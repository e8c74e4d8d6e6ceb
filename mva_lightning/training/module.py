"""The LightningModule: multi-value DPO on value vectors, with an MI penalty between them.

The policy is the base model with one LoRA adapter per value (:mod:`mva_lightning.model.lora`). The
reference is the same model with every adapter off (w = 0), or a separate frozen copy when the
config asks for one. Training runs in stages (:attr:`MVAModule.stages`): the ``sequential``
schedule (paper) has one stage per value, training theta_k with theta_1..theta_{k-1} frozen;
the ``joint`` schedule trains every value vector in one stage.

Optimisation is manual (``automatic_optimization = False``) because the MINE estimator's
statistics network is an adversary: each step first updates the head with its own optimizer on
detached features (maximising its bound), then the value vectors take a step on
sum_v L_DPO(theta_v) + alpha * sum_pairs MI.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from mva_lightning.mi import MIEstimator, NoMI, activation_features, lora_features
from mva_lightning.model import lora
from mva_lightning.model.logps import response_logps, share_prompt_pays
from mva_lightning.training.losses import DPOOutput, dpo_loss, modpo_margin, split_chosen_rejected

log = logging.getLogger(__name__)

SCHEDULES = ("sequential", "joint")
_TRAINED_STATE = ("lora_A", "lora_B", "mi_heads.")


def stages_for(values: Sequence[str], schedule: str) -> list[list[str]]:
    """Values trained in each stage: one per stage (sequential) or all at once (joint)."""
    if schedule == "sequential":
        return [[v] for v in values]
    if schedule == "joint":
        return [list(values)]
    raise ValueError(f"train.schedule: expected one of {SCHEDULES}, got {schedule!r}")


def mi_pairs(values: Sequence[str], stage: Sequence[str]) -> list[tuple[str, str]]:
    """(trainable i, other j) pairs penalised in a stage.

    Sequential: (v_k, v_j) for every earlier value j. Joint: every unordered pair (i < j).
    """
    if len(stage) == 1:
        k = values.index(stage[0])
        return [(stage[0], values[j]) for j in range(k)]
    return [(stage[a], stage[b]) for a in range(len(stage)) for b in range(a + 1, len(stage))]


class MVAModule(L.LightningModule):
    """Multi-value DPO with a mutual-information penalty between value vectors.

    Args:
        policy: Base model with one LoRA adapter per value (:func:`lora.add_value_vectors`).
        values: Value names, in training order.
        optimizer: Partial optimizer, called with the trainable parameters.
        beta: DPO beta.
        alpha: Weight of the MI penalty (0 disables it).
        mi: MI estimator; one copy per penalised pair (MINE heads are per pair).
        schedule: ``sequential`` or ``joint``.
        mi_optimizer: Partial optimizer for estimators with a statistics network.
        scheduler: Optional partial LR scheduler for the policy optimizer (stepped per update).
        reference_model: A separate frozen reference; ``None`` uses the policy at w = 0.
        precompute_reference: Compute reference log-probs once per stage and reuse them.
        head_on_response_only: Run the LM head only on response positions.
        share_prompt: Run each pair as one packed row, its prompt once for both responses
            (same log-probs; see :mod:`mva_lightning.model.logps`): True, False or "auto" (on where
            the model's attention takes a 4D mask). Off while MI activation features are
            captured.
        label_smoothing: Conservative-DPO epsilon.
        accumulate_grad_batches: Batches per optimizer step.
        gradient_clip_val: Max gradient norm (None: no clipping).
        mi_max_samples: Cap on activation samples per module fed to the estimator.
        adapters: Value -> the LoRA adapter it trains (default: one adapter named after each
            value, MVA). Baselines map every value to one shared adapter (DPO-LW, DPO-SeqT).
        loss_weights: Value -> weight of its DPO loss (default 1 each). Values of weight 0
            are not trained (their stages are dropped).
        margin_weights: MODPO: frozen adapter -> w_j; the trained values' DPO logits get the
            margin (1/w_k) sum_j w_j (r_j(y_w) - r_j(y_l)), precomputed once per split.
        margin_own_weight: MODPO's w_k (the trained value's weight): logits scaled by 1/w_k.
    """

    def __init__(
        self,
        policy: nn.Module,
        values: Sequence[str],
        optimizer: Callable,
        beta: float = 0.1,
        alpha: float = 10.0,
        mi: MIEstimator | None = None,
        schedule: str = "sequential",
        mi_optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        reference_model: nn.Module | None = None,
        precompute_reference: bool = True,
        head_on_response_only: bool = True,
        share_prompt: bool | str = "auto",
        label_smoothing: float = 0.0,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        mi_max_samples: int = 2048,
        adapters: Mapping[str, str] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        margin_weights: Mapping[str, float] | None = None,
        margin_own_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"mi.alpha must be >= 0, got {alpha}")
        for name, given in (("adapters", adapters), ("loss_weights", loss_weights)):
            unknown = sorted(set(given or {}) - set(values))
            if unknown:
                raise ValueError(f"{name}: {unknown} are not values of this run ({list(values)})")
        if not margin_own_weight > 0:
            raise ValueError(
                f"margin_own_weight (MODPO's w_k) must be > 0, got {margin_own_weight}"
            )
        self.adapters = {v: (adapters or {}).get(v, v) for v in values}
        self.loss_weights = {v: float((loss_weights or {}).get(v, 1.0)) for v in values}
        self.margin_weights = {k: float(w) for k, w in (margin_weights or {}).items()}
        self.margin_own_weight = float(margin_own_weight)
        self.values = list(values)
        needed = [*self.adapter_names, *self.margin_weights]
        missing = [a for a in needed if a not in lora.value_names(policy)]
        if missing:
            raise ValueError(f"{missing} have no LoRA adapter in the policy (adapters: {needed})")
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold adapters and heads only, not the base
        self.save_hyperparameters(
            {
                "values": list(values),
                "beta": beta,
                "alpha": alpha,
                "schedule": schedule,
                "label_smoothing": label_smoothing,
                "mi": type(mi or NoMI()).__name__,
            }
        )
        self.policy = policy
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.requires_grad_(False).eval()
        self.beta, self.alpha, self.label_smoothing = beta, alpha, label_smoothing
        self.schedule = schedule
        weighted = [
            [v for v in s if self.loss_weights[v] != 0] for s in stages_for(values, schedule)
        ]
        self.stages = [s for s in weighted if s]  # a value of loss weight 0 is not trained
        if not self.stages:
            raise ValueError(f"loss_weights {self.loss_weights}: every value has weight 0")
        self.stage = 0
        self.optimizer_factory, self.mi_optimizer_factory = optimizer, mi_optimizer
        self.scheduler_factory = scheduler
        self.precompute_reference = precompute_reference
        self.head_on_response_only = head_on_response_only
        self.share_prompt = share_prompt_pays(policy, share_prompt)
        self._capturing = False  # capture_inputs needs one forward over the whole batch
        self._log_now = True  # this training step's metrics are logged (see _logging_step)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.mi_max_samples = mi_max_samples
        self.estimator = mi if (mi is not None and alpha > 0) else NoMI()
        shared = len(self.adapter_names) < len(self.values)
        if shared and not isinstance(self.estimator, NoMI):
            raise ValueError(
                f"adapters {self.adapters}: the MI penalty needs one adapter per value; "
                "use mi=none with a shared adapter"
            )
        self.estimator.check_factors(lora.lora_factors(policy, self.adapter_names[0]))
        all_pairs = {p for s in self.stages for p in mi_pairs(self.values, s)}
        if self.estimator.has_head:
            self.mi_heads = nn.ModuleDict(
                {_pair_key(p): copy.deepcopy(self.estimator) for p in sorted(all_pairs)}
            )
        self._reference_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._margin_cache: dict[tuple[str, str], torch.Tensor] = {}  # MODPO margins (N,)
        self._mi_generator = torch.Generator().manual_seed(0)
        self.begin_stage(0)

    # ----------------------------------------------------------------- stages
    @property
    def adapter_names(self) -> list[str]:
        """The trained LoRA adapters, in value order (the values themselves for MVA)."""
        return list(dict.fromkeys(self.adapters[v] for v in self.values))

    def stage_adapters(self) -> list[str]:
        """Adapters trained in the current stage."""
        return list(dict.fromkeys(self.adapters[v] for v in self.stage_values))

    @property
    def stage_values(self) -> list[str]:
        """Values trained in the current stage."""
        return self.stages[self.stage]

    @property
    def stage_pairs(self) -> list[tuple[str, str]]:
        """MI pairs penalised in the current stage (none when alpha = 0)."""
        if isinstance(self.estimator, NoMI):
            return []
        return mi_pairs(self.values, self.stage_values)

    def begin_stage(self, stage: int) -> None:
        """Make the stage's value vectors (and only those) trainable."""
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"stage {stage} out of range; this schedule has {len(self.stages)}")
        self.stage = stage
        lora.set_trainable(self.policy, self.stage_adapters())
        self._reference_cache.clear()
        self._margin_cache.clear()
        if self.trainer_datamodule is not None:
            self.trainer_datamodule.active_values = self.stage_values

    @property
    def trainer_datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _estimator(self, pair: tuple[str, str]) -> MIEstimator:
        return self.mi_heads[_pair_key(pair)] if self.estimator.has_head else self.estimator

    # -------------------------------------------------------------- log-probs
    def policy_logps(self, value_weights: dict[str, float], batch: dict) -> torch.Tensor:
        """(2B,) log-probs of a [chosen; rejected] batch under W_0 + sum w_v delta W_v."""
        lora.set_weights(self.policy, value_weights)
        return response_logps(
            self.policy,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            self.head_on_response_only,
            share_prompt=self.share_prompt and not self._capturing,
        )

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        """(2B,) log-probs under the reference: the base model (w = 0) or the separate copy."""
        if self.reference_model is not None:
            return response_logps(
                self.reference_model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["response_mask"],
                self.head_on_response_only,
                share_prompt=self.share_prompt,
            )
        with lora.using_weights(self.policy, {}):
            return self.policy_logps({}, batch)

    def cached_reference_logps(self, value: str, split: str, batch: dict) -> torch.Tensor:
        """Reference log-probs from the per-stage cache when present, else computed now."""
        cached = self._reference_cache.get((value, split))
        if cached is None:
            return self.reference_logps(batch)
        rows = cached[batch["index"].to(cached.device)]  # (B, 2): chosen, rejected
        return torch.cat([rows[:, 0], rows[:, 1]]).to(self.device)

    def precompute_reference_logps(self, value: str, split: str) -> None:
        """Fill the cache for one value's split (one pass of the reference, no grad)."""
        dm = self.trainer_datamodule
        n = len(getattr(dm.splits[value], split))
        if n == 0:
            return
        out = torch.zeros(n, 2)
        was_training = self.policy.training
        self.policy.eval()
        loader = dm.loader(value, split)
        desc = f"reference log-probs [{value}/{split}]"
        for batch in tqdm(loader, desc=desc, leave=False, disable=not self._show_progress()):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            chosen, rejected = split_chosen_rejected(self.reference_logps(batch))
            out[batch["index"].cpu(), 0] = chosen.float().cpu()
            out[batch["index"].cpu(), 1] = rejected.float().cpu()
        self.policy.train(was_training)
        self._reference_cache[(value, split)] = out

    def _show_progress(self) -> bool:
        return self._trainer is not None and self.trainer.is_global_zero

    @torch.no_grad()
    def precompute_margins(self, value: str, split: str) -> None:
        """MODPO: the margin of every pair of one value's split, from the frozen vectors (once).

        r_j = beta * (log pi_j - log pi_0) for each frozen adapter j (policy pi_0 + theta_j);
        m = (1/w_k) sum_j w_j (r_j(y_w) - r_j(y_l)), shape (N,).
        """
        dm = self.trainer_datamodule
        n = len(getattr(dm.splits[value], split))
        out = torch.zeros(n)
        was_training = self.policy.training
        self.policy.eval()
        weights = torch.tensor(list(self.margin_weights.values()), device=self.device)  # (J,)
        for batch in dm.loader(value, split):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            ref_c, ref_r = split_chosen_rejected(self.reference_logps(batch))
            reward_margins = []
            for adapter in self.margin_weights:
                lc, lr = split_chosen_rejected(self.policy_logps({adapter: 1.0}, batch))
                reward_margins.append(self.beta * ((lc - ref_c) - (lr - ref_r)))  # (B,)
            m = modpo_margin(torch.stack(reward_margins), weights, self.margin_own_weight)
            out[batch["index"].cpu()] = m.float().cpu()
        self.policy.train(was_training)
        self._margin_cache[(value, split)] = out

    def _margin(self, value: str, split: str, batch: dict) -> torch.Tensor | None:
        if not self.margin_weights:
            return None
        if (value, split) not in self._margin_cache:
            self.precompute_margins(value, split)
        return self._margin_cache[(value, split)][batch["index"].cpu()].to(self.device)

    def dpo(self, value: str, batch: dict, split: str = "train") -> DPOOutput:
        """DPO loss of ``value``'s vector alone (policy pi_0 + theta_v) on its batch.

        With MODPO margins: logits (beta / w_k) * h - m (Zhou et al. 2023).
        """
        policy = self.policy_logps({self.adapters[value]: 1.0}, batch)
        reference = self.cached_reference_logps(value, split, batch)
        pc, pr = split_chosen_rejected(policy)
        rc, rr = split_chosen_rejected(reference)
        margin = self._margin(value, split, batch)
        beta = self.beta / self.margin_own_weight if margin is not None else self.beta
        return dpo_loss(
            pc, pr, rc, rr, beta=beta, label_smoothing=self.label_smoothing, margin=margin
        )

    # ---------------------------------------------------------------- MI term
    def mi_features(
        self, pair: tuple[str, str], inputs: dict[str, torch.Tensor] | None, detach_y: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Paired features of value vectors i and j for the penalty."""
        est = self._estimator(pair)
        a, b = self.adapters[pair[0]], self.adapters[pair[1]]
        fi, fj = lora.lora_factors(self.policy, a), lora.lora_factors(self.policy, b)
        if est.features == "activations":
            if inputs is None:
                raise RuntimeError("activation features need the inputs captured in the forward")
            return activation_features(
                inputs, fi, fj, self.mi_max_samples, self._mi_generator, detach_y=detach_y
            )
        return lora_features(fi, fj, est.features, detach_y=detach_y)

    def mi_penalty(
        self, captured: dict[str, dict[str, torch.Tensor]], train_heads: bool
    ) -> torch.Tensor:
        """sum over the stage's pairs of the MI estimate (grad to the trainable vectors)."""
        total = torch.zeros((), device=self.device)
        joint = len(self.stage_values) > 1
        for pair in self.stage_pairs:
            est = self._estimator(pair)
            x, y = self.mi_features(pair, captured.get(pair[0]), detach_y=not joint)
            if est.has_head and train_heads:
                self._head_step(est, x, y)
            estimate = est(x, y)
            # a diverged estimate (inf/NaN, flagged or not) is dropped: it must not reach .grad
            if not (estimate.finite and bool(torch.isfinite(estimate.value))):
                log.warning("MI estimate for %s is not finite; penalty skipped this step", pair)
                self.log("train/mi_skipped", 1.0)
                continue
            total = total + estimate.value
            if self._log_now:
                self.log(f"train/mi/{pair[0]}-{pair[1]}", estimate.value.detach())
        return total

    def _head_step(self, est: MIEstimator, x: dict, y: dict) -> None:
        # The raw torch optimizer: Lightning counts every LightningOptimizer.step() as a global
        # step, so head updates would eat into max_steps and shift checkpoint/log intervals.
        head_opt = self._optimizers()[1].optimizer
        detached_x = {k: t.detach() for k, t in x.items()}
        detached_y = {k: t.detach() for k, t in y.items()}
        for _ in range(est.head_steps):  # the adversary catches up before the policy moves
            head_opt.zero_grad()
            loss = est.head_loss(detached_x, detached_y)
            loss.backward()  # plain backward: the head is not in the DDP-reduced policy graph
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for p in est.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
            head_opt.step()

    @contextlib.contextmanager
    def capture_inputs(self, enabled: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Record the hidden state entering each LoRA layer during a forward (for MI features)."""
        store: dict[str, torch.Tensor] = {}
        handles = []
        if enabled:
            for name, layer in lora.lora_layers(self.policy):

                def hook(_module, args, _name=name):
                    store[_name] = args[0]

                handles.append(layer.register_forward_pre_hook(hook))
        self._capturing = enabled
        try:
            yield store
        finally:
            self._capturing = False
            for h in handles:
                h.remove()

    # --------------------------------------------------------------- training
    def _optimizers(self):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[0], (opts[1] if len(opts) > 1 else None)

    def training_step(self, batch: dict[str, dict], batch_idx: int) -> torch.Tensor:
        policy_opt, _ = self._optimizers()
        needs_inputs = any(self._estimator(p).features == "activations" for p in self.stage_pairs)
        penalised = {p[0] for p in self.stage_pairs}
        captured: dict[str, dict[str, torch.Tensor]] = {}
        dpo_total = torch.zeros((), device=self.device)
        self._log_now = self._logging_step()
        for value in self.stage_values:
            with self.capture_inputs(needs_inputs and value in penalised) as inputs:
                out = self.dpo(value, batch[value], "train")
            if inputs:
                mask = batch[value]["attention_mask"].bool()  # (2B, T) real tokens
                captured[value] = {m: h[mask] for m, h in inputs.items()}  # (N, d_in)
            dpo_total = dpo_total + self.loss_weights[value] * out.loss  # DPO-LW: sum w_v L_v
            n = batch[value]["index"].numel()
            for key, val in out.metrics().items() if self._log_now else ():
                self.log(f"train/{value}/{key}", val, batch_size=n, prog_bar=key == "loss")
        is_update = (batch_idx + 1) % self.accumulate_grad_batches == 0
        mi = self.mi_penalty(captured, train_heads=is_update) if self.stage_pairs else None
        loss = dpo_total + (self.alpha * mi if mi is not None else 0.0)
        self.manual_backward(loss / self.accumulate_grad_batches)
        if is_update:
            if self.gradient_clip_val:
                self.clip_gradients(policy_opt, self.gradient_clip_val, "norm")
            policy_opt.step()
            policy_opt.zero_grad()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                (scheduler[0] if isinstance(scheduler, list) else scheduler).step()
        if self._log_now:
            self.log("train/loss", loss.detach(), prog_bar=True)
            if mi is not None:
                self.log("train/mi", mi.detach(), prog_bar=True)
        return loss.detach()

    def _logging_step(self) -> bool:
        """Whether the Trainer writes this step's metrics.

        Lightning's rule: every ``log_every_n_steps`` steps, or when stopping. Other steps skip
        ``self.log``, whose per-call cost is a visible share of a step for small models
        (experiments/bench_train.py).
        """
        trainer = self._trainer
        if trainer is None:
            return True
        every = max(1, trainer.log_every_n_steps)
        return (trainer.global_step + 1) % every == 0 or bool(trainer.should_stop)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        values = [v for v in self.stage_values if self.trainer_datamodule.splits[v].val]
        value = values[dataloader_idx]
        out = self.dpo(value, batch, "val")
        for key, val in out.metrics().items():
            self.log(
                f"val/{value}/{key}",
                val,
                batch_size=batch["index"].numel(),
                add_dataloader_idx=False,
                sync_dist=True,
            )

    def setup(self, stage: str) -> None:
        # Before configure_optimizers: the stage's vectors must be trainable (and only they).
        if self.trainer_datamodule is not None:
            self.trainer_datamodule.active_values = self.stage_values
        lora.set_trainable(self.policy, self.stage_adapters())

    def on_fit_start(self) -> None:
        if self.precompute_reference and self.trainer_datamodule is not None:
            for value in self.stage_values:
                for split in ("train", "val"):
                    if (value, split) not in self._reference_cache:
                        self.precompute_reference_logps(value, split)
        if self.margin_weights and self.trainer_datamodule is not None:
            for value in self.stage_values:  # MODPO: once per split, before the first step
                for split in ("train", "val"):
                    if (value, split) not in self._margin_cache:
                        self.precompute_margins(value, split)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"stage {self.stage}: no trainable parameters")
        optimizers = [self.optimizer_factory(params)]
        heads = [self._estimator(p) for p in self.stage_pairs if self._estimator(p).has_head]
        if heads:
            if self.mi_optimizer_factory is None:
                raise ValueError("the MI estimator has a statistics network: set mi.optimizer")
            optimizers.append(self.mi_optimizer_factory([p for h in heads for p in h.parameters()]))
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.scheduler_factory(optimizers[0])]

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep only what was trained: adapters and MI heads, never the frozen base.
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if _is_trained(k)}
        checkpoint["mva"] = {"stage": self.stage, "values": self.values, "schedule": self.schedule}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("mva")
        if meta is None:
            raise ValueError("not an mva_lightning checkpoint (no 'mva' entry)")
        if meta["values"] != self.values or meta["schedule"] != self.schedule:
            raise ValueError(
                f"checkpoint trained values {meta['values']} ({meta['schedule']}); this run "
                f"has {self.values} ({self.schedule})"
            )
        expected = {k for k in self.state_dict() if _is_trained(k)}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[0]}")


def _pair_key(pair: tuple[str, str]) -> str:
    return f"{pair[0]}__{pair[1]}"


def _is_trained(key: str) -> bool:
    return any(tag in key for tag in _TRAINED_STATE)


def initial_loss() -> float:
    """DPO loss at zero-init LoRA B (policy == reference): ln 2."""
    return math.log(2.0)
