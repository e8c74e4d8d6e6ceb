"""Objectives that score the policy as it is (its current ``lora.set_weights``) for every value.

An objective is one class with three methods: ``validate`` (cheap checks, before any work),
``prepare`` (one-time work shared by every candidate, e.g. reference log-probs) and ``score``
(``{value: score, "value/extra": ...}``, every column maximised). The sweep over preference
vectors that uses them is :func:`mva_lightning.extrapolate.extrapolate`.

- :class:`ImplicitReward` (METHOD 5a): on held-out pairs of value v, the DPO implicit reward
  r = beta * (log pi_w(y|x) - log pi_0(y|x)); score = accuracy P(r_chosen > r_rejected),
  extra column ``v/margin`` = mean(r_chosen - r_rejected). No generation; the reference
  log-probs are computed once per (value, split) and reused for every candidate.
- :class:`GenerationScore` (METHOD 5b, the paper's metric): one shared prompt set, one batched
  generation per candidate, each value's scorer applied to (prompt, continuation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from mva_lightning.data.collate import collate_pairs
from mva_lightning.scorers.base import Scorer, ScorerError, check_scores


class Objective:
    """Scores a policy for every value; subclasses override :meth:`score` and the settings."""

    split: str = "val"

    def settings(self) -> dict[str, Any]:
        """JSON-able settings that change the scores (part of the result-cache fingerprint)."""
        return {"objective": type(self).__name__, "split": self.split}

    def validate(self, datamodule, values: Sequence[str]) -> None:
        """Cheap checks before any work; raise with a clear message."""
        for v in values:
            if v not in datamodule.splits:
                raise KeyError(f"{type(self).__name__}: no data for value {v!r}")

    def data_fingerprint(self, datamodule, values: Sequence[str]) -> str:
        """A hash of the data this objective reads."""
        return _hash(
            [[asdict(p) for p in getattr(datamodule.splits[v], self.split)] for v in values]
        )

    def prepare(self, policy: nn.Module, datamodule, values: Sequence[str]) -> None:
        """One-time work before the candidates (default: none)."""

    def score(self, policy: nn.Module, datamodule, values: Sequence[str]) -> dict[str, float]:
        """Column -> score for the policy's current weights; ``{v}`` for every value v."""
        raise NotImplementedError

    def for_split(self, split: str) -> Objective:
        """The same objective on another split (e.g. ``test`` to report the front)."""
        raise NotImplementedError


class ImplicitReward(Objective):
    """Implicit-reward accuracy and margin of pi_w vs pi_0 on held-out pairs of each value.

    Args:
        beta: DPO beta (``${train.beta}``).
        split: Which split's pairs to use (``val`` to select, ``test`` to report).
        max_pairs: Use only the first this-many pairs of each value (None: all).
        batch_size: Pairs per forward (None: the data module's ``eval_batch_size``).
        head_on_response_only: Run the LM head only on response positions.
    """

    def __init__(
        self,
        beta: float = 0.1,
        split: str = "val",
        max_pairs: int | None = None,
        batch_size: int | None = None,
        head_on_response_only: bool = True,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"ImplicitReward: beta must be > 0, got {beta}")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"ImplicitReward: max_pairs must be >= 1 or None, got {max_pairs}")
        self.beta, self.split, self.max_pairs = float(beta), split, max_pairs
        self.batch_size, self.head_on_response_only = batch_size, head_on_response_only
        # (id(datamodule), value) -> [(batch, reference log-probs (2B,))]
        self._cache: dict[tuple[int, str], list[tuple[dict, torch.Tensor]]] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "beta": self.beta, "max_pairs": self.max_pairs}

    def for_split(self, split: str) -> ImplicitReward:
        return ImplicitReward(
            self.beta, split, self.max_pairs, self.batch_size, self.head_on_response_only
        )

    def validate(self, datamodule, values: Sequence[str]) -> None:
        super().validate(datamodule, values)
        empty = [v for v in values if not getattr(datamodule.splits[v], self.split)]
        if empty:
            raise ValueError(
                f"ImplicitReward: values {empty} have no {self.split!r} pairs to score on "
                f"(raise data.split.{self.split} or choose another split)"
            )

    def data_fingerprint(self, datamodule, values: Sequence[str]) -> str:
        pairs = [datamodule.tokenized(v, self.split)[: self.max_pairs] for v in values]
        return _hash([[asdict(t) for t in p] for p in pairs])

    def prepare(self, policy: nn.Module, datamodule, values: Sequence[str]) -> None:
        from mva_lightning import lora
        from mva_lightning.logps import response_logps

        size = self.batch_size or datamodule.eval_batch_size
        pad = datamodule.tokenizer.pad_token_id
        device = _device(policy)
        for v in values:
            key = (id(datamodule), v)
            if key in self._cache:
                continue
            examples = datamodule.tokenized(v, self.split)[: self.max_pairs]
            entries = []
            with _eval_mode(policy), torch.no_grad(), lora.using_weights(policy, {}):
                for start in range(0, len(examples), size):
                    batch = collate_pairs(examples[start : start + size], pad)
                    batch = {k: t.to(device) for k, t in batch.items()}
                    ref = response_logps(  # (2B,) log pi_0, rows [chosen; rejected]
                        policy,
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["response_mask"],
                        self.head_on_response_only,
                    )
                    entries.append((batch, ref.float()))
            self._cache[key] = entries

    def score(self, policy: nn.Module, datamodule, values: Sequence[str]) -> dict[str, float]:
        from mva_lightning.logps import response_logps

        self.prepare(policy, datamodule, values)
        out: dict[str, float] = {}
        with _eval_mode(policy), torch.no_grad():
            for v in values:
                margins = []
                for batch, ref in self._cache[(id(datamodule), v)]:
                    logps = response_logps(
                        policy,
                        batch["input_ids"],
                        batch["attention_mask"],
                        batch["response_mask"],
                        self.head_on_response_only,
                    ).float()
                    reward = self.beta * (logps - ref)  # (2B,) r = beta (log pi_w - log pi_0)
                    chosen, rejected = reward.chunk(2)
                    margins.append(chosen - rejected)  # (B,)
                margin = torch.cat(margins)
                out[v] = float((margin > 0).float().mean())
                out[f"{v}/margin"] = float(margin.mean())
        return out


class GenerationScore(Objective):
    """Mean scorer reward of responses generated for a shared set of held-out prompts.

    Prompts: the ``prompts_split`` prompts of every value, in value order, deduplicated, the
    first ``num_prompts``. Each candidate generates once; value v's scorer sees (prompt,
    continuation) pairs, never the prompt twice.

    Args:
        scorers: Value name -> scorer (:class:`mva_lightning.scorers.base.Scorer`); entries that
            are None (a value this run does not have) are dropped.
        prompts_split: Split to take prompts from.
        num_prompts: Size of the prompt set.
        max_new_tokens: Generation length (paper: 200).
        do_sample: Sample instead of greedy decoding (seeded).
        temperature: Sampling temperature.
        top_p: Nucleus mass.
        batch_size: Prompts per ``generate`` call.
        chat_template: Wrap prompts in the chat template (None: as the data module does).
        max_prompt_length: Prompt tokens kept (None: the data module's ``max_prompt_length``).
        seed: Sampling seed.
    """

    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        prompts_split: str = "val",
        num_prompts: int = 32,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        chat_template: bool | None = None,
        max_prompt_length: int | None = None,
        seed: int = 0,
    ) -> None:
        # None: a value the run does not have (a config listing scorers for optional values).
        scorers = {v: s for v, s in (scorers or {}).items() if s is not None}
        if not scorers:
            raise ValueError("GenerationScore: expected one scorer per value, got none")
        if num_prompts < 1:
            raise ValueError(f"GenerationScore: num_prompts must be >= 1, got {num_prompts}")
        self.scorers = scorers
        self.split, self.num_prompts = prompts_split, num_prompts
        self.generation = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
        )
        self.chat_template, self.max_prompt_length = chat_template, max_prompt_length

    def settings(self) -> dict[str, Any]:
        names = {v: _scorer_name(s) for v, s in self.scorers.items()}
        return {
            **super().settings(),
            "num_prompts": self.num_prompts,
            "scorers": names,
            "chat_template": self.chat_template,
            "max_prompt_length": self.max_prompt_length,
            **{k: v for k, v in self.generation.items() if k != "batch_size"},
        }

    def for_split(self, split: str) -> GenerationScore:
        kw = {k: v for k, v in self.generation.items()}
        return GenerationScore(
            self.scorers,
            split,
            self.num_prompts,
            chat_template=self.chat_template,
            max_prompt_length=self.max_prompt_length,
            **kw,
        )

    def validate(self, datamodule, values: Sequence[str]) -> None:
        super().validate(datamodule, values)
        missing = [v for v in values if v not in self.scorers]
        unknown = [v for v in self.scorers if v not in values]
        if missing or unknown:
            raise ValueError(
                f"GenerationScore: scorers are needed for exactly the values {list(values)}; "
                f"missing {missing}, unknown {unknown}"
            )
        for v, s in self.scorers.items():
            if not callable(s):
                raise TypeError(f"GenerationScore: scorer for {v!r} is not callable: {s!r}")
        if not self.prompts(datamodule, values):
            raise ValueError(f"GenerationScore: no {self.split!r} prompts for values {values}")

    def prompts(self, datamodule, values: Sequence[str]) -> list[str]:
        """The shared prompt set: deduplicated held-out prompts, first ``num_prompts``."""
        seen = dict.fromkeys(
            p.prompt for v in values for p in getattr(datamodule.splits[v], self.split)
        )
        return list(seen)[: self.num_prompts]

    def data_fingerprint(self, datamodule, values: Sequence[str]) -> str:
        return _hash(self.prompts(datamodule, values))

    def score(self, policy: nn.Module, datamodule, values: Sequence[str]) -> dict[str, float]:
        from mva_lightning.generation import generate

        prompts = self.prompts(datamodule, values)
        chat = datamodule.chat_template if self.chat_template is None else self.chat_template
        max_prompt = self.max_prompt_length or datamodule.max_prompt_length
        responses = generate(
            policy,
            datamodule.tokenizer,
            prompts,
            chat_template=chat,
            max_prompt_length=max_prompt,
            **self.generation,
        )
        out: dict[str, float] = {}
        for v in values:
            scorer, name = self.scorers[v], _scorer_name(self.scorers[v])
            try:
                raw = scorer(list(prompts), list(responses))
                scores = check_scores(raw, len(prompts), name)
            except ScorerError:
                raise
            except Exception as err:
                raise ScorerError(f"scorer {name!r} (value {v!r}) failed: {err}") from err
            mean = sum(scores) / len(scores)
            out[v] = mean
            out[f"{v}/std"] = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
        return out


def _scorer_name(scorer) -> str:
    return str(getattr(scorer, "name", None) or type(scorer).__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    # no dropout while scoring; the previous mode is restored after
    was_training = module.training
    if was_training:  # module.train() walks every submodule: skip it when nothing changes
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
