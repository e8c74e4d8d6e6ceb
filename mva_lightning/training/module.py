"""The LightningModule: multi-value DPO on value vectors, with an MI penalty between them.

The policy is the base model with one LoRA adapter per value (:mod:`mva_lightning.model.lora`).
The reference is the same model with every adapter off (w = 0), or a separate frozen copy when
the config asks for one. A run is one ``Trainer.fit``: the stages of :mod:`.stages` follow each
other inside it, and the module switches the trained value vector at each boundary (the
``sequential`` schedule trains theta_k with theta_1..theta_{k-1} frozen; ``joint`` trains every
value vector in one stage).

The module owns its collaborators: a :class:`~.reference.PairCache` of reference log-probs (and
MODPO margins), and an :class:`~.mi_penalty.MIPenalty` (None without a penalty). Optimisation
is manual (``automatic_optimization = False``) because MINE's statistics networks are
adversaries: each step first updates a pair's network with its own optimizer on detached
features, then the value vectors take a step on sum_v L_DPO(theta_v) + alpha * sum_pairs MI.

One optimizer holds every trained adapter. A stage's loss only reaches its own vectors (the
others are inactive or detached), Adam skips parameters without a gradient, and the optimizer
state of a stage's vectors is cleared when the stage begins, so each stage optimises exactly as
a fresh optimizer over its vectors would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from mva_lightning.mi import MIEstimator
from mva_lightning.model import lora, panacea
from mva_lightning.model.logps import response_logps, share_prompt_pays
from mva_lightning.model.precision import autocast
from mva_lightning.training.losses import (
    DPOOutput,
    dpo_loss,
    modpo_margin,
    split_chosen_rejected,
)
from mva_lightning.training.mi_penalty import MIPenalty, is_enabled, train_head
from mva_lightning.training.reference import PairCache, as_logps, reference_rows
from mva_lightning.training.stages import StagePlan, mi_pairs, stages_for

log = logging.getLogger(__name__)

PANACEA_ADAPTER = "panacea"  # Panacea's folder under the run's adapters/
_TRAINED_STATE = ("lora_A", "lora_B", "mi_penalty.heads.", "panacea_")


class MVAModule(L.LightningModule):
    """Multi-value DPO with a mutual-information penalty between value vectors.

    Args:
        policy: Base model with one LoRA adapter per value (:func:`lora.add_value_vectors`).
        values: Value names, in training order.
        optimizer: Partial optimizer, called with the trainable parameters.
        beta: DPO beta.
        alpha: Weight of the MI penalty (0: no penalty).
        mi: MI estimator (None: no penalty); MINE gets one statistics network per pair.
        schedule: ``sequential`` or ``joint``.
        epochs_per_stage: Epochs each stage trains (``trainer.max_epochs`` counts per stage).
        steps_per_stage: Optimizer steps each stage takes at most (-1: no limit).
        mi_optimizer: Partial optimizer for estimators with a statistics network.
        scheduler: Optional partial LR scheduler for the policy optimizer (stepped per update,
            started afresh at every stage).
        reference_model: A separate frozen reference; ``None`` uses the policy at w = 0.
        precompute_reference: Compute reference log-probs once per stage and reuse them.
        head_on_response_only: Run the LM head only on response positions.
        share_prompt: Run each pair as one packed row, its prompt once for both responses
            (same log-probs; see :mod:`mva_lightning.model.logps`): True, False or "auto" (on
            where the model's attention takes a 4D mask). Off while MI activation features are
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
        panacea_settings: Panacea's settings (``aggregation``, ``ideal``; see
            :func:`~mva_lightning.training.methods.method_inputs`) for a policy from
            :func:`panacea.add_panacea`: each batch feeds a sampled preference w and minimises
            the aggregated loss; None for every other method.
        preference_seed: Panacea: seed of the per-step preference draws.
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
        epochs_per_stage: int = 1,
        steps_per_stage: int = -1,
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
        panacea_settings: Mapping | None = None,
        preference_seed: int = 0,
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
        self.panacea_settings = dict(panacea_settings) if panacea_settings is not None else None
        self.preference_seed = int(preference_seed)
        self._panacea_saved = False
        if self.panacea_settings is not None:
            _check_panacea(policy, self.values, schedule, is_enabled(mi, alpha), margin_weights)
        needed = [*self.adapter_names, *self.margin_weights]
        missing = [a for a in needed if a not in lora.value_names(policy)]
        if missing:
            raise ValueError(f"{missing} have no LoRA adapter in the policy (adapters: {needed})")
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold adapters and heads only, not the base
        penalised = is_enabled(mi, alpha)
        self.save_hyperparameters(
            {
                "values": list(values),
                "beta": beta,
                "alpha": alpha,
                "schedule": schedule,
                "label_smoothing": label_smoothing,
                "mi": type(mi).__name__ if penalised else "none",
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
        stages = [s for s in weighted if s]  # a value of loss weight 0 is not trained
        if not stages:
            raise ValueError(f"loss_weights {self.loss_weights}: every value has weight 0")
        self.plan = StagePlan(stages, epochs_per_stage, steps_per_stage)
        self.optimizer_factory, self.mi_optimizer_factory = optimizer, mi_optimizer
        self.scheduler_factory = scheduler
        self.precompute_reference = precompute_reference
        self.head_on_response_only = head_on_response_only
        self.share_prompt = share_prompt_pays(policy, share_prompt)
        self._capturing = False  # captured inputs need one forward over the whole batch
        self._log_now = True  # this training step's metrics are logged (see _logging_step)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.mi_penalty: MIPenalty | None = None
        if penalised:
            pairs = [p for s in stages for p in mi_pairs(self.values, s)]
            self.mi_penalty = MIPenalty(mi, alpha, pairs, self.adapters, mi_max_samples)
            self.mi_penalty.check(policy)
        self.reference = PairCache()  # (value, split) -> (N, 2) reference log-probs
        self.margins = PairCache()  # MODPO: (value, split) -> (N, 1) margins
        # Every trained adapter is trainable for the whole fit (distributed wrappers see one
        # fixed set); a stage's loss reaches only its own vectors.
        lora.set_trainable(policy, self.adapter_names)
        if self.panacea_settings is not None:
            panacea.set_trainable(policy)
        self.stage = 0
        self.stage_start_epoch = self.stage_start_step = 0
        self.finished = False
        self._reload_every = 0
        # Resuming (see on_save_checkpoint): the fit epoch whose end this module last handled,
        # whether a training batch is between its start and end hooks, and the random states
        # of a loaded checkpoint, put back when the first resumed batch starts.
        self._epoch_ended = -1
        self._in_batch = False
        self._resume_rng: dict | None = None
        self._resume_epoch: int | None = None

    # ----------------------------------------------------------------- stages
    @property
    def stages(self) -> list[list[str]]:
        """Values trained in each stage."""
        return self.plan.stages

    @property
    def adapter_names(self) -> list[str]:
        """The trained LoRA adapters, in value order (the values themselves for MVA; none for
        Panacea, whose one SVD-LoRA model the module saves itself)."""
        if self.panacea_settings is not None:
            return []
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
        """MI pairs penalised in the current stage (none without a penalty)."""
        if self.mi_penalty is None:
            return []
        return mi_pairs(self.values, self.stage_values)

    def trainer_limits(self) -> dict[str, int]:
        """``max_epochs`` / ``max_steps`` of a Trainer that runs every stage in one fit."""
        return {"max_epochs": self.plan.max_epochs, "max_steps": self.plan.max_steps}

    def begin_stage(self, stage: int, epoch: int = 0, step: int = 0) -> None:
        """Train the stage's value vectors from global ``epoch`` / ``step`` on.

        Clears the per-stage caches, points the data module at the stage's values (its shuffles
        count epochs from the stage's start) and starts the stage's optimizer state afresh.
        """
        if not 0 <= stage < len(self.stages):
            raise ValueError(f"stage {stage} out of range; this schedule has {len(self.stages)}")
        self.stage, self.stage_start_epoch, self.stage_start_step = stage, epoch, step
        self.reference.clear()
        self.margins.clear()
        dm = self.trainer_datamodule
        if dm is not None:
            dm.active_values = self.stage_values
            dm.epoch_offset = epoch
        if self._trainer is not None and self.trainer.optimizers:
            self._reset_stage_optimizers()

    def _reset_stage_optimizers(self) -> None:
        policy_opt, head_opt = self._raw_optimizers()
        fresh = {
            id(p) for a in self.stage_adapters() for p in lora.adapter_parameters(self.policy, a)
        }
        if self.mi_penalty is not None:
            fresh |= {id(p) for p in self.mi_penalty.head_parameters(self.stage_pairs)}
        for opt in (policy_opt, head_opt):
            if opt is None:
                continue
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in fresh:
                        opt.state.pop(p, None)
        if self.scheduler_factory is not None:  # the schedule restarts with the stage
            for group in policy_opt.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
            self.trainer.lr_scheduler_configs[0].scheduler = self.scheduler_factory(policy_opt)

    @property
    def trainer_datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _steps_in_stage(self) -> int:
        return self.global_step - self.stage_start_step

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
        with lora.using_weights(self.policy, {}), panacea.base_model(self.policy):
            return self.policy_logps({}, batch)

    def cached_reference_logps(self, value: str, split: str, batch: dict) -> torch.Tensor:
        """Reference log-probs from the per-stage cache when present, else computed now."""
        if (value, split) not in self.reference:
            return self.reference_logps(batch)
        return as_logps(self.reference.rows((value, split), batch["index"])).to(self.device)

    def precompute_reference_logps(self, value: str, split: str) -> None:
        """Fill the cache for one value's split (one pass of the reference, no grad)."""
        self._fill(self.reference, value, split, "reference log-probs", self._reference_rows, 2)

    def _reference_rows(self, batch: dict) -> torch.Tensor:
        return reference_rows(self.reference_logps(batch))  # (B, 2)

    def _fill(self, cache: PairCache, value: str, split: str, what: str, compute, width: int):
        dm = self.trainer_datamodule
        n = len(getattr(dm.splits[value], split))
        if n == 0:
            return
        was_training = self.policy.training
        self.policy.eval()
        desc = f"{what} [{value}/{split}]"
        batches = tqdm(
            dm.loader(value, split), desc=desc, leave=False, disable=not self._show_progress()
        )
        to_device = (self.transfer_batch_to_device(b, self.device, 0) for b in batches)
        # the training step's precision (Lightning does not wrap this hook's forwards)
        precision = self.trainer.precision if self._trainer is not None else None
        with autocast(precision, self.device.type):
            cache.fill((value, split), n, to_device, compute, width)
        self.policy.train(was_training)

    def _show_progress(self) -> bool:
        return self._trainer is not None and self.trainer.is_global_zero

    @torch.no_grad()
    def precompute_margins(self, value: str, split: str) -> None:
        """MODPO: the margin of every pair of one value's split, from the frozen vectors (once).

        r_j = beta * (log pi_j - log pi_0) for each frozen adapter j (policy pi_0 + theta_j);
        m = (1/w_k) sum_j w_j (r_j(y_w) - r_j(y_l)), shape (N,).
        """
        self._fill(self.margins, value, split, "MODPO margins", self._margin_rows, 1)

    def _margin_rows(self, batch: dict) -> torch.Tensor:
        weights = torch.tensor(list(self.margin_weights.values()), device=self.device)  # (J,)
        ref_c, ref_r = split_chosen_rejected(self.reference_logps(batch))
        reward_margins = []
        for adapter in self.margin_weights:
            lc, lr = split_chosen_rejected(self.policy_logps({adapter: 1.0}, batch))
            reward_margins.append(self.beta * ((lc - ref_c) - (lr - ref_r)))  # (B,)
        return modpo_margin(torch.stack(reward_margins), weights, self.margin_own_weight)

    def _margin(self, value: str, split: str, batch: dict) -> torch.Tensor | None:
        if not self.margin_weights:
            return None
        if (value, split) not in self.margins:
            self.precompute_margins(value, split)
        return self.margins.rows((value, split), batch["index"].cpu())[:, 0].to(self.device)

    def dpo(self, value: str, batch: dict, split: str = "train") -> DPOOutput:
        """DPO loss of ``value``'s vector alone (policy pi_0 + theta_v) on its batch.

        With MODPO margins: logits (beta / w_k) * h - m (Zhou et al. 2023). Panacea: the policy
        at the preference input its caller set.
        """
        weights = {} if self.panacea_settings is not None else {self.adapters[value]: 1.0}
        policy = self.policy_logps(weights, batch)
        reference = self.cached_reference_logps(value, split, batch)
        pc, pr = split_chosen_rejected(policy)
        rc, rr = split_chosen_rejected(reference)
        margin = self._margin(value, split, batch)
        beta = self.beta / self.margin_own_weight if margin is not None else self.beta
        return dpo_loss(
            pc, pr, rc, rr, beta=beta, label_smoothing=self.label_smoothing, margin=margin
        )

    # --------------------------------------------------------------- training
    def _raw_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
        # The raw torch optimizers: Lightning counts every LightningOptimizer.step() as a global
        # step, so head updates through the wrapper would eat into max_steps.
        opts = self.trainer.optimizers
        return opts[0], (opts[1] if len(opts) > 1 else None)

    def _optimizers(self):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[0], (opts[1] if len(opts) > 1 else None)

    def training_step(self, batch: dict[str, dict], batch_idx: int) -> torch.Tensor:
        policy_opt, _ = self._optimizers()
        pairs = self.stage_pairs
        needs_inputs = self.mi_penalty is not None and self.mi_penalty.needs_inputs(pairs)
        penalised = {p[0] for p in pairs}
        captured: dict[str, dict[str, torch.Tensor]] = {}
        dpo_total = torch.zeros((), device=self.device)
        dpo_losses: dict[str, torch.Tensor] = {}
        self._log_now = self._logging_step()
        preference = self._sample_preference(batch_idx)  # Panacea: this batch's w; else None
        panacea_losses = []
        for value in self.stage_values:
            with self.capturing_inputs(needs_inputs and value in penalised) as inputs:
                out = self.dpo(value, batch[value], "train")
            dpo_losses[value] = out.loss.detach()
            if inputs:
                mask = batch[value]["attention_mask"].bool()  # (2B, T) real tokens
                captured[value] = {m: h[mask] for m, h in inputs.items()}  # (N, d_in)
            if preference is None:
                dpo_total = dpo_total + self.loss_weights[value] * out.loss  # DPO-LW: sum w_v L_v
            else:
                panacea_losses.append(out.loss)
            n = batch[value]["index"].numel()
            for key, val in out.metrics().items() if self._log_now else ():
                self.log(f"train/{value}/{key}", val, batch_size=n, prog_bar=key == "loss")
        if preference is not None:  # Panacea: the aggregated loss at the sampled w
            dpo_total = self._aggregate(torch.stack(panacea_losses), preference)
        is_update = (batch_idx + 1) % self.accumulate_grad_batches == 0
        mi, skipped = self._mi_penalty(pairs, captured, is_update) if pairs else (None, [])
        loss = dpo_total + (self.alpha * mi if mi is not None else 0.0)
        self.manual_backward(loss / self.accumulate_grad_batches)
        # Before any update (one host sync, after backward is queued): NaN never reaches the
        # value vectors, so never the exported adapters. A diverged MI estimate is left out of
        # the loss but stops the run too.
        ok = torch.stack(
            [torch.isfinite(loss.detach()), torch.tensor(not skipped, device=loss.device)]
        )
        ok = ok.float()  # (2,): loss finite, every MI estimate finite
        if self.trainer.world_size > 1:  # every rank stops together (no rank left waiting)
            ok = self.trainer.strategy.reduce(ok, reduce_op="sum") / self.trainer.world_size
        loss_ok, mi_ok = ok.tolist()
        if mi_ok < 1.0:
            self._non_finite_mi(skipped)
        if loss_ok < 1.0:
            self._non_finite_loss(loss, dpo_losses, mi, batch_idx)
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

    def _non_finite_loss(
        self,
        loss: torch.Tensor,
        dpo_losses: Mapping[str, torch.Tensor],
        mi: torch.Tensor | None,
        batch_idx: int,
    ) -> None:
        """Stop the run on a NaN / inf loss, naming the step, the stage and each part's value."""
        parts = {f"dpo[{v}]": float(x) for v, x in dpo_losses.items()}
        if mi is not None:
            parts["mi"] = float(mi.detach())
        bad = [name for name, x in parts.items() if not math.isfinite(x)] or (
            ["their sum"] if not math.isfinite(float(loss.detach())) else ["another process's"]
        )
        shown = ", ".join(f"{name}={x:.6g}" for name, x in parts.items())
        raise FloatingPointError(
            f"non-finite training loss {float(loss.detach())} at step {self.global_step} "
            f"(epoch {self.current_epoch}, batch {batch_idx}) in stage {self.stage} "
            f"(values {self.stage_values}): {shown} (alpha={self.alpha:g}); non-finite: "
            f"{', '.join(bad)}. The value vectors were not updated with it; lower "
            "optimizer.lr or check the data"
        )

    @contextlib.contextmanager
    def capturing_inputs(self, enabled: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Module name -> the hidden state entering its LoRA layer in the enclosed forward (the
        MI penalty's activation features); packed prompt sharing is off meanwhile, so that the
        rows are the batch's own."""
        inputs: dict[str, torch.Tensor] = {}
        self._capturing = enabled
        try:
            with lora.capture_inputs(self.policy, inputs.__setitem__, enabled=enabled):
                yield inputs
        finally:
            self._capturing = False

    def _mi_penalty(self, pairs, captured, train_heads: bool) -> tuple[torch.Tensor, list]:
        """sum over the stage's pairs of the finite MI estimates (grad to the trainable
        vectors), and the pairs whose estimate was not finite (left out)."""
        head_step = None
        if train_heads and self.mi_penalty.has_heads:
            _, head_opt = self._raw_optimizers()

            def head_step(est, x, y):
                train_head(est, x, y, head_opt)

        joint = len(self.stage_values) > 1
        out = self.mi_penalty(self.policy, pairs, captured, not joint, head_step)
        if self._log_now and not out.skipped:
            for name, value in out.estimates.items():
                self.log(f"train/mi/{name}", value)
        return out.total, list(out.skipped)

    def _non_finite_mi(self, skipped: list) -> None:
        """Stop the run on a diverged MI estimate (here, or on another process)."""
        where = ", ".join(f"{i}-{j}" for i, j in skipped) or "another process's pair"
        raise FloatingPointError(
            f"non-finite MI estimate for {where} at step {self.global_step} (epoch "
            f"{self.current_epoch}) in stage {self.stage} (values {self.stage_values}); the "
            "value vectors were not updated with it; lower mi.alpha or optimizer.lr, or use "
            "a bounded estimator (mi=hsic)"
        )

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
        if self.panacea_settings is not None:  # Panacea: value v's loss at its own preference e_v
            panacea.set_preference(self.policy, [float(v == value) for v in self.values])
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
        dm = self.trainer_datamodule
        if dm is not None:
            dm.active_values = self.stage_values
            dm.epoch_offset = self.stage_start_epoch
        self._reload_every = self.trainer.reload_dataloaders_every_n_epochs  # the user's
        if self.trainer.fast_dev_run:  # Lightning's smoke run: n batches of every stage
            n = int(self.trainer.fast_dev_run)
            self.plan = StagePlan(self.stages, epochs=1, steps=n)
            self.trainer.fit_loop.max_epochs = self.plan.max_epochs
            self.trainer.fit_loop.epoch_loop.max_steps = self.plan.max_steps

    def on_train_start(self) -> None:
        # A fit resumed inside an epoch gets no on_train_epoch_start for it: fill the caches now.
        self._fill_stage_caches()
        if self._resume_epoch is not None and self.trainer.current_epoch != self._resume_epoch:
            log.warning(
                "resumed at fit epoch %d, expected %d: the resumed run may differ from an "
                "uninterrupted one",
                self.trainer.current_epoch,
                self._resume_epoch,
            )
        self._resume_epoch = None

    def on_train_epoch_start(self) -> None:
        self._fill_stage_caches()

    def _fill_stage_caches(self) -> None:
        # The stage's first epoch (or the first after a resume): caches that never change.
        dm = self.trainer_datamodule
        if dm is None:
            return
        for value in self.stage_values:
            for split in ("train", "val"):
                if self.precompute_reference and (value, split) not in self.reference:
                    self.precompute_reference_logps(value, split)
                if self.margin_weights and (value, split) not in self.margins:
                    self.precompute_margins(value, split)  # MODPO: once per split

    def on_train_batch_start(self, batch, batch_idx: int) -> int | None:
        if self._resume_rng is not None:  # the first batch after a resume
            _set_rng_states(self._resume_rng, self._rng_generators(), self.device)
            self._resume_rng = None
        if self.plan.step_limit_reached(self._steps_in_stage()):
            return -1  # the stage has taken its steps: skip the rest of this epoch
        self._in_batch = True
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._in_batch = False

    def on_train_epoch_end(self) -> None:
        self.trainer.reload_dataloaders_every_n_epochs = self._reload_every  # boundary done
        self._in_batch = False
        self._epoch_ended = self.current_epoch
        ended = self._end_epoch(self.current_epoch, self.global_step)
        if ended == "stage":
            # The next epoch reads the new stage's values: the Trainer rebuilds its train and
            # val loaders then (only then: each rebuild also starts a loader iterator).
            self.trainer.reload_dataloaders_every_n_epochs = 1
        elif ended == "fit":
            self.trainer.should_stop = True

    def _end_epoch(self, epoch: int, step: int) -> str | None:
        """End fit epoch ``epoch`` after ``step`` optimizer steps: when the stage is done,
        begin the next one (``"stage"``) or finish training (``"fit"``)."""
        epochs_in_stage = epoch + 1 - self.stage_start_epoch
        if not self.plan.stage_done(epochs_in_stage, step - self.stage_start_step):
            return None
        if self.stage + 1 < len(self.stages):
            self.begin_stage(self.stage + 1, epoch + 1, step)
            return "stage"
        self.finished = True
        return "fit"

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters")
        optimizers = [self.optimizer_factory(params)]
        if self.mi_penalty is not None and self.mi_penalty.has_heads:
            if self.mi_optimizer_factory is None:
                raise ValueError("the MI estimator has a statistics network: set mi.optimizer")
            # every pair's statistics network; a stage's loss reaches only its own pairs'
            optimizers.append(self.mi_optimizer_factory(list(self.mi_penalty.parameters())))
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.scheduler_factory(optimizers[0])]

    # ---------------------------------------------------------------- Panacea
    def _sample_preference(self, batch_idx: int) -> torch.Tensor | None:
        """Panacea: the batch's w ~ Dirichlet(1, ..., 1), keyed by (seed, batch count), fed to
        the policy; None for every other method."""
        if self.panacea_settings is None:
            return None
        accumulate = self.accumulate_grad_batches
        count = self.global_step * accumulate + batch_idx % accumulate
        w = panacea.sample_preference(self.preference_seed, count, len(self.values))  # (K,)
        panacea.set_preference(self.policy, w)
        return w

    def _aggregate(self, losses: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Panacea's loss of the (K,) per-value DPO losses at w (linear or Tchebycheff)."""
        ideal = self.panacea_settings.get("ideal")
        z = None if ideal is None else torch.tensor(ideal, device=losses.device)
        return panacea.aggregate(losses, w, self.panacea_settings.get("aggregation", "linear"), z)

    def on_train_end(self) -> None:
        self._save_panacea()

    def on_fit_end(self) -> None:
        self._save_panacea()  # a resumed fit that trained nothing gets no on_train_end

    def _save_panacea(self) -> None:
        """Panacea: ``<run>/adapters/panacea/`` once training finished (rank zero), as
        :class:`~mva_lightning.training.export.SaveValueVectors` writes the LoRA adapters."""
        if self.panacea_settings is None or self._panacea_saved or not self.finished:
            return
        self._panacea_saved = True
        if self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir) / "adapters" / PANACEA_ADAPTER
            panacea.save(self.policy, folder)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what was trained (adapters and MI heads, never the frozen base), plus what
        a resumed fit needs to continue exactly as an uninterrupted one.

        Lightning itself saves the optimizers, schedulers, loop counters and the train loaders'
        positions (:class:`~mva_lightning.data.datamodule.ResumableDataLoader`); it does not
        save random states. ``mva_resume`` holds them (``rng``: the global ones, for dropout,
        and the MI penalty's own generators) and where in the fit epoch the checkpoint was
        written. ``epoch_end_pending``: between the last batch of an epoch and the epoch's end,
        a point from which Lightning resumes at the next epoch without running
        ``on_train_epoch_end``: the stage switch (or the finish) that hook makes is made on
        load instead.
        """
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if _is_trained(k)}
        trainer = self._trainer
        epoch = self.current_epoch if trainer is not None else 0
        ended = self._epoch_ended == epoch
        pending = trainer is not None and self._in_batch and bool(trainer.is_last_batch)
        checkpoint["mva"] = {
            "stage": self.stage,
            "stage_start_epoch": self.stage_start_epoch,
            "stage_start_step": self.stage_start_step,
            "finished": self.finished,
            "values": self.values,
            "schedule": self.schedule,
        }
        checkpoint["mva_resume"] = {
            "epoch": epoch,
            "epoch_ended": ended,
            "epoch_end_pending": pending and not ended,
            "rng": _rng_states(self._rng_generators(), self.device),
        }

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
        self.begin_stage(
            int(meta["stage"]), int(meta["stage_start_epoch"]), int(meta["stage_start_step"])
        )
        self.finished = bool(meta.get("finished", False))
        resume = checkpoint.get("mva_resume") or {}  # absent from older checkpoints
        self._resume_epoch = None
        if "epoch" in resume:  # the fit epoch Lightning is expected to go on with
            epoch = int(resume["epoch"])
            if resume.get("epoch_end_pending"):  # Lightning goes on with the next epoch
                self._end_epoch(epoch, int(checkpoint.get("global_step", 0)))
            ended = resume.get("epoch_ended") or resume.get("epoch_end_pending")
            self._epoch_ended = epoch if ended else epoch - 1
            self._resume_epoch = epoch + 1 if ended else epoch
        self._resume_rng = resume.get("rng")

    def _rng_generators(self) -> dict[str, torch.Generator]:
        """The MI penalty's own random generators (MINE's marginal shuffles, activation
        subsampling), by attribute path: they advance with every training step."""
        found: dict[str, torch.Generator] = {}
        if self.mi_penalty is None:
            return found
        for name, module in self.mi_penalty.named_modules():
            for attr, value in vars(module).items():
                if isinstance(value, torch.Generator):
                    found[f"{name}.{attr}" if name else attr] = value
        return found


def _check_panacea(policy, values, schedule, penalised: bool, margin_weights) -> None:
    """Panacea trains one model on every value at once, without MI penalty or margins."""
    if not panacea.is_panacea(policy):
        raise ValueError("method.preference_input (Panacea) needs a policy from add_panacea")
    if panacea.preference_names(policy) != list(values):
        raise ValueError(
            f"Panacea policy preference {panacea.preference_names(policy)} != values {values}"
        )
    if schedule != "joint" or penalised or margin_weights:
        raise ValueError(
            "Panacea trains every value in one stage: train.schedule=joint, mi=none, no "
            f"method.margin_from (got schedule={schedule!r}, MI penalty={penalised})"
        )


def _is_trained(key: str) -> bool:
    return any(tag in key for tag in _TRAINED_STATE)


def _rng_states(generators: Mapping[str, torch.Generator], device: torch.device) -> dict:
    """The random states a training step draws from, as tensors and plain containers (the
    checkpoint is read back with ``weights_only=True``)."""
    import numpy as np

    np_state = np.random.get_state()
    version, words, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(words), "gauss": gauss},
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(
    states: Mapping, generators: Mapping[str, torch.Generator], device: torch.device
) -> None:
    """Put back the states of :func:`_rng_states`."""
    import numpy as np

    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    saved = states.get("generators", {})
    for name, generator in generators.items():
        if name in saved:
            generator.set_state(saved[name])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def initial_loss() -> float:
    """DPO loss at zero-init LoRA B (policy == reference): ln 2."""
    return math.log(2.0)
