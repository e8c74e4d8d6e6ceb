"""Objectives that score the policy as it is (its current ``lora.set_weights``) for every value.

An objective is one class with three methods: ``validate`` (cheap checks, before any work),
``prepare`` (one-time work shared by every candidate, e.g. reference log-probs) and ``score``
(``{value: score, "value/extra": ...}``, every column maximised), plus ``score_many``, which
scores several preference vectors at once: both built-in objectives run up to
``candidates_per_forward`` of them in one batched forward (or one ``generate``), each row with
its own combination of value vectors (:func:`mva_lightning.model.lora.using_row_weights`).
The sweep over preference vectors that uses them is :func:`mva_lightning.sweep.sweep.extrapolate`.

Scores come as :class:`Scores`: the columns, and per value the per-pair or per-prompt scores
its column averages (what :mod:`mva_lightning.sweep.bootstrap` resamples for intervals).

- :class:`ImplicitReward` (docs/method.md §5a): on held-out pairs of value v, the DPO implicit
  reward r = beta * (log pi_w(y|x) - log pi_0(y|x)); score = accuracy, a pair counting 1 when
  r_chosen > r_rejected and 1/2 on a tie (so the base, whose margins are all 0, scores 0.5:
  chance), extra column ``v/margin`` = mean(r_chosen - r_rejected). No generation; the
  reference log-probs are computed once per (value, split) and reused for every candidate.
  pi_w is the merged model (``combination="weights"``) or the decoding-time combination
  (``"decoding"``, MOD: :func:`mva_lightning.model.logps.combined_response_logps`).
- :class:`GenerationScore` (docs/method.md §5b, the paper's metric): one shared prompt set, one
  batched generation for a batch of candidates, each value's scorer applied to (prompt,
  continuation). Candidates generate with merged weights (``combination="weights"``) or by
  decoding-time combination of the values' next-token log-probs (``"decoding"``, MOD:
  :mod:`mva_lightning.model.decoding`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from mva_lightning.data.collate import collate_pairs
from mva_lightning.io import fingerprint
from mva_lightning.model.precision import device_type, full_precision
from mva_lightning.scorers.base import Scorer, ScorerError, check_scores
from mva_lightning.training.reference import PairCache, as_logps, reference_rows


class Scores(dict):
    """Column -> score (a plain dict, every column maximised), and :attr:`per_item`: value ->
    the per-pair or per-prompt scores whose mean is its column (empty: no intervals)."""

    def __init__(
        self,
        columns: Mapping[str, float] | None = None,
        per_item: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        super().__init__(columns or {})
        self.per_item = {v: [float(x) for x in s] for v, s in (per_item or {}).items()}


COMBINATIONS = ("weights", "decoding")  # merged weights | MOD (decoding-time combination)


def check_combination(combination: str) -> None:
    """Raise ``ValueError`` unless ``combination`` is one of :data:`COMBINATIONS`."""
    if combination not in COMBINATIONS:
        raise ValueError(
            f"extrapolation.objective.combination: expected one of {list(COMBINATIONS)}, "
            f"got {combination!r}"
        )


def combination_settings(combination: str) -> dict[str, str]:
    """The ``combination`` entry of an objective's settings: recorded when not the default,
    so that earlier runs' score caches stay valid."""
    return {"combination": combination} if combination != "weights" else {}


def pair_credit(margins: torch.Tensor) -> torch.Tensor:
    """Per-pair accuracy credit: 1 if the margin is > 0, 1/2 on a tie (0), else 0."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


class Objective:
    """Scores a policy for every value; subclasses override :meth:`score` and the settings.

    ``shared_items``: every value's score averages over the same items (one prompt set scored
    by each value's scorer), so a bootstrap resamples them together.
    """

    split: str = "val"
    candidates_per_forward: int = 1
    shared_items: bool = False

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
        return fingerprint(
            [[asdict(p) for p in getattr(datamodule.splits[v], self.split)] for v in values]
        )

    def prepare(self, policy: nn.Module, datamodule, values: Sequence[str]) -> None:
        """One-time work before the candidates (default: none)."""

    def score(self, policy: nn.Module, datamodule, values: Sequence[str]) -> dict[str, float]:
        """Column -> score for the policy's current weights; ``{v}`` for every value v."""
        raise NotImplementedError

    def score_many(
        self,
        policy: nn.Module,
        datamodule,
        values: Sequence[str],
        weights: Sequence[Mapping[str, float]],
    ) -> list[dict[str, float]]:
        """:meth:`score` for each preference vector in ``weights`` (value name -> w_v).

        The default sets each in turn; subclasses batch up to ``candidates_per_forward``. The
        policy's weights are restored after.
        """
        from mva_lightning.model import lora

        out = []
        for w in weights:
            with lora.using_weights(policy, w):
                out.append(self.score(policy, datamodule, values))
        return out

    def for_split(self, split: str) -> Objective:
        """The same objective on another split (e.g. ``test`` to report the front)."""
        raise NotImplementedError


class ImplicitReward(Objective):
    """Implicit-reward accuracy and margin of pi_w vs pi_0 on held-out pairs of each value.

    Args:
        beta: DPO beta (``${train.beta}``).
        split: Which split's pairs to use (``val`` to select, ``test`` to report).
        max_pairs: Use only the first this-many pairs of each value (None: all).
        batch_size: Pairs per forward and candidate (None: the data module's
            ``eval_batch_size``).
        head_on_response_only: Run the LM head only on response positions.
        share_prompt: Each pair as one packed row (:mod:`mva_lightning.model.logps`): True, False or
            "auto".
        candidates_per_forward: Preference vectors scored in one forward by
            :meth:`score_many` (rows and memory grow with it; the scores do not change), or
            ``"auto"``: as many as fit ``tokens_per_forward`` tokens in one forward (at least 1,
            at most :data:`MAX_AUTO_CANDIDATES`), from the longest prepared batch.
        tokens_per_forward: The token budget of ``"auto"`` (padded tokens of the stacked rows;
            activations, and the LM head's log-softmax over the response tokens, grow with it).
        combination: What pi_w is: ``"weights"``, the merged weights W_0 + sum_v w_v delta W_v;
            ``"decoding"``, the decoding-time combination (MOD), log pi_w(y|x) = sum over
            response tokens of log softmax(sum_v w_v log pi_v)[y_t]
            (:func:`mva_lightning.model.logps.combined_response_logps`; K rows per pair, K times
            the forward cost). The reference pi_0 is the base model either way.
    """

    def __init__(
        self,
        beta: float = 0.1,
        split: str = "val",
        max_pairs: int | None = None,
        batch_size: int | None = None,
        head_on_response_only: bool = True,
        share_prompt: bool | str = "auto",
        candidates_per_forward: int | str = "auto",
        combination: str = "weights",
        tokens_per_forward: int = 16384,
    ) -> None:
        check_combination(combination)
        if not beta > 0:
            raise ValueError(f"ImplicitReward: beta must be > 0, got {beta}")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"ImplicitReward: max_pairs must be >= 1 or None, got {max_pairs}")
        _check_candidates_per_forward(type(self).__name__, candidates_per_forward, auto=True)
        if not (isinstance(tokens_per_forward, int) and tokens_per_forward >= 1):
            raise ValueError(
                f"ImplicitReward: tokens_per_forward must be an integer >= 1, "
                f"got {tokens_per_forward!r}"
            )
        self.beta, self.split, self.max_pairs = float(beta), split, max_pairs
        self.batch_size, self.head_on_response_only = batch_size, head_on_response_only
        self.share_prompt, self._per_forward = share_prompt, candidates_per_forward
        self.combination, self.tokens_per_forward = combination, tokens_per_forward
        # (id(datamodule), value) -> its collated pairs, and their reference log-probs (one
        # cache class with the training module's: mva_lightning.training.reference)
        self._batches: dict[tuple[int, str], list[dict]] = {}
        self._reference = PairCache()
        self._models_per_row = 1  # the decoding-time combination: one row per value vector

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "beta": self.beta,
            "max_pairs": self.max_pairs,
            "ties": "half",  # a tie counts 1/2 (the base scores 0.5)
            **combination_settings(self.combination),
        }

    def for_split(self, split: str) -> ImplicitReward:
        return ImplicitReward(
            self.beta,
            split,
            self.max_pairs,
            self.batch_size,
            self.head_on_response_only,
            self.share_prompt,
            self._per_forward,
            self.combination,
            self.tokens_per_forward,
        )

    @property
    def candidates_per_forward(self) -> int:
        """Preference vectors per forward: the set number, or ``"auto"``'s choice.

        ``"auto"``: ``tokens_per_forward`` // the padded tokens one candidate adds to the
        longest batch prepared so far (its ``(2B, T)`` rows, times K for the decoding-time
        combination), clamped to 1 .. :data:`MAX_AUTO_CANDIDATES`; 1 before :meth:`prepare`.
        """
        if self._per_forward != "auto":
            return self._per_forward
        sizes = [b["input_ids"].numel() for batches in self._batches.values() for b in batches]
        if not sizes:
            return 1
        per_candidate = max(sizes) * max(1, self._models_per_row)
        return max(1, min(MAX_AUTO_CANDIDATES, self.tokens_per_forward // per_candidate))

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
        return fingerprint([[asdict(t) for t in p] for p in pairs])

    def prepare(self, policy: nn.Module, datamodule, values: Sequence[str]) -> None:
        from mva_lightning.model import lora

        size = self.batch_size or datamodule.eval_batch_size
        pad = datamodule.tokenizer.pad_token_id
        device = _device(policy)
        if self.combination == "decoding":
            self._models_per_row = len(lora.value_names(policy))

        def base_rows(batch: dict) -> torch.Tensor:  # pi_0: the base, whatever the combination
            return reference_rows(self._logps(policy, batch, combined=False))  # (B, 2)

        for v in values:
            key = (id(datamodule), v)
            if key in self._reference:
                continue
            examples = datamodule.tokenized(v, self.split)[: self.max_pairs]
            batches = []
            for start in range(0, len(examples), size):
                batch = collate_pairs(examples[start : start + size], pad)
                batches.append({k: t.to(device) for k, t in batch.items()})
            with _eval_mode(policy), torch.no_grad(), lora.using_weights(policy, {}):
                self._reference.fill(key, len(examples), batches, base_rows)  # pi_0, (N, 2)
            self._batches[key] = batches

    def score(self, policy: nn.Module, datamodule, values: Sequence[str]) -> dict[str, float]:
        from mva_lightning.model import lora

        return self.score_many(policy, datamodule, values, [lora.get_weights(policy)])[0]

    def score_many(
        self,
        policy: nn.Module,
        datamodule,
        values: Sequence[str],
        weights: Sequence[Mapping[str, float]],
    ) -> list[dict[str, float]]:
        """Scores of many preference vectors, their pairs stacked into one forward per batch."""
        self.prepare(policy, datamodule, values)
        out = [Scores() for _ in weights]
        with _eval_mode(policy), torch.no_grad():
            for v in values:
                key = (id(datamodule), v)
                margins = [  # (C, B) per batch
                    self._margins(policy, batch, self._reference_logps(key, batch), weights)
                    for batch in self._batches[key]
                ]
                for row, margin in zip(out, torch.cat(margins, dim=1), strict=True):
                    credit = pair_credit(margin)  # (N,) 1, 1/2 or 0 per pair
                    row[v] = float(credit.mean())
                    row[f"{v}/margin"] = float(margin.mean())
                    row.per_item[v] = credit.tolist()
        return out

    def _reference_logps(self, key: tuple[int, str], batch: dict) -> torch.Tensor:
        """(2B,) cached [chosen; rejected] reference log-probs of a batch, on its device."""
        rows = self._reference.rows(key, batch["index"])
        return as_logps(rows).to(batch["input_ids"].device)

    def _margins(self, policy, batch: dict, ref: torch.Tensor, weights) -> torch.Tensor:
        """(C, B) r_chosen - r_rejected of C preference vectors on one [chosen; rejected] batch."""
        from mva_lightning.model import lora

        c, b = len(weights), batch["input_ids"].shape[0] // 2
        if c == 1:
            with lora.using_weights(policy, weights[0]):
                logps = self._logps(policy, batch)
        else:  # rows [chosen of w_1..w_C; rejected of w_1..w_C]: pair j = c * B + i
            keys = ("input_ids", "attention_mask", "response_mask")
            stacked = {k: _repeat_pairs(batch[k], c) for k in keys}
            logps = self._logps(policy, stacked, lora.stack_weights(weights, b))
        reward = self.beta * (logps.float().view(2, c, b) - ref.view(2, 1, b))
        return reward[0] - reward[1]

    def _logps(self, policy, batch: dict, pair_weights=None, combined=None) -> torch.Tensor:
        """(2B,) log pi_w of a batch (``combined``: MOD's; None: as the combination says)."""
        from mva_lightning.model.logps import (
            combined_response_logps,
            response_logps,
            share_prompt_pays,
        )

        if combined is None:
            combined = self.combination == "decoding"
        logps = combined_response_logps if combined else response_logps
        return logps(
            policy,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            self.head_on_response_only,
            share_prompt=share_prompt_pays(policy, self.share_prompt),
            pair_weights=pair_weights,
        )


def _repeat_pairs(rows: torch.Tensor, copies: int) -> torch.Tensor:
    """(2B, T) [chosen; rejected] -> (2CB, T) [chosen x C; rejected x C]."""
    two_b, width = rows.shape
    halves = rows.view(2, 1, two_b // 2, width).expand(2, copies, two_b // 2, width)
    return halves.reshape(2 * copies * (two_b // 2), width)


# "auto" stacks at most this many preference vectors per forward: short rows would otherwise
# stack hundreds, and beyond it a forward is no faster per candidate (SmolLM2 on a CPU core:
# 64 and 101 per forward cost the same per candidate).
MAX_AUTO_CANDIDATES = 64


def _check_candidates_per_forward(owner: str, n: int | str, auto: bool = False) -> None:
    if auto and n == "auto":
        return
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        expected = 'an integer >= 1 or "auto"' if auto else "an integer >= 1"
        raise ValueError(f"{owner}: candidates_per_forward must be {expected}, got {n!r}")


class GenerationScore(Objective):
    """Mean scorer reward of responses generated for a shared set of held-out prompts.

    Prompts: the ``prompts_split`` rows of ``prompts_file`` when one is given (a prompt file of
    :mod:`mva_lightning.data.prompts`, held out by its ``split`` column), else the
    ``prompts_split`` prompts of every value's pairs, in value order, deduplicated; the first
    ``num_prompts`` of them. Each candidate generates once; value v's scorer sees (prompt,
    continuation) pairs, never the prompt twice.

    Indicators are behaviours measured on the same generations that are reported but never
    optimised (e.g. :class:`mva_lightning.scorers.refusal.RefusalRate`): a callable
    ``(prompts, responses) -> one float per prompt``, NaN where the prompt does not count. Column
    ``<name>`` is the mean over the prompts that count; it gets an interval like the values.

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
        candidates_per_forward: Preference vectors generated for in one ``generate`` call by
            :meth:`score_many` (``batch_size`` prompts each). Greedy decoding only: sampled
            candidates run one at a time, so that a candidate's samples never depend on which
            others share its batch.
        prompts_file: A prompt file to take the held-out prompts from (``pkg://`` allowed); None:
            the data module's held-out pairs.
        indicators: Name -> indicator (see above), reported for every candidate.
        combination: How a candidate w generates: ``"weights"``, with the merged weights
            W_0 + sum_v w_v delta W_v; ``"decoding"``, token by token from
            sum_v w_v log pi_v (MOD, :func:`mva_lightning.model.decoding.generate_combined`),
            which costs K rows per prompt and token (K times the forward cost of ``weights``).
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
        candidates_per_forward: int = 8,
        prompts_file: str | None = None,
        indicators: Mapping[str, Any] | None = None,
        combination: str = "weights",
    ) -> None:
        check_combination(combination)
        # None: a value the run does not have (a config listing scorers for optional values).
        scorers = {v: s for v, s in (scorers or {}).items() if s is not None}
        if not scorers:
            raise ValueError("GenerationScore: expected one scorer per value, got none")
        if num_prompts < 1:
            raise ValueError(f"GenerationScore: num_prompts must be >= 1, got {num_prompts}")
        _check_candidates_per_forward(type(self).__name__, candidates_per_forward)
        self.scorers = scorers
        self._per_forward = candidates_per_forward
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
        self.prompts_file = prompts_file
        self.combination = combination
        self._file_prompts: list[str] | None = None
        self.indicators = {k: f for k, f in (indicators or {}).items() if f is not None}
        clash = sorted(set(self.indicators) & set(scorers))
        if clash:
            raise ValueError(f"GenerationScore: indicators {clash} have the names of values")

    shared_items = True  # every value's scorer reads the same prompts

    @property
    def candidates_per_forward(self) -> int:
        return 1 if self.generation["do_sample"] else self._per_forward

    def settings(self) -> dict[str, Any]:
        names = {v: _scorer_name(s) for v, s in self.scorers.items()}
        return {
            **super().settings(),
            "num_prompts": self.num_prompts,
            "scorers": names,
            "chat_template": self.chat_template,
            "max_prompt_length": self.max_prompt_length,
            **{k: v for k, v in self.generation.items() if k != "batch_size"},
            **({"prompts_file": self.prompts_file} if self.prompts_file else {}),
            **combination_settings(self.combination),
            **(
                {"indicators": {k: _scorer_name(f) for k, f in self.indicators.items()}}
                if self.indicators
                else {}
            ),
        }

    def for_split(self, split: str) -> GenerationScore:
        kw = {k: v for k, v in self.generation.items()}
        return GenerationScore(
            self.scorers,
            split,
            self.num_prompts,
            chat_template=self.chat_template,
            max_prompt_length=self.max_prompt_length,
            candidates_per_forward=self._per_forward,
            prompts_file=self.prompts_file,
            indicators=self.indicators,
            combination=self.combination,
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
        for name, f in self.indicators.items():
            if not callable(f):
                raise TypeError(f"GenerationScore: indicator {name!r} is not callable: {f!r}")
        prompts = self.prompts(datamodule, values)
        if not prompts:
            raise ValueError(f"GenerationScore: no {self.split!r} prompts for values {values}")
        if self.prompts_file is not None and self.split != "train":
            seen = {p.prompt for v in values for p in datamodule.splits[v].train}
            leaked = [p for p in prompts if p in seen]
            if leaked:
                raise ValueError(
                    f"GenerationScore: {len(leaked)} {self.split!r} prompts of "
                    f"{self.prompts_file} are training prompts too (first: {leaked[0]!r}); "
                    f"expected held-out prompts"
                )

    def prompts(self, datamodule, values: Sequence[str]) -> list[str]:
        """The shared prompt set: deduplicated held-out prompts, first ``num_prompts``."""
        if self.prompts_file is not None:  # read once per objective, not once per batch
            if self._file_prompts is None:
                from mva_lightning.data.prompts import load_prompts

                self._file_prompts = load_prompts(self.prompts_file, split=self.split)
            seen = dict.fromkeys(self._file_prompts)
        else:
            seen = dict.fromkeys(
                p.prompt for v in values for p in getattr(datamodule.splits[v], self.split)
            )
        return list(seen)[: self.num_prompts]

    def data_fingerprint(self, datamodule, values: Sequence[str]) -> str:
        return fingerprint(self.prompts(datamodule, values))

    def score(self, policy: nn.Module, datamodule, values: Sequence[str]) -> dict[str, float]:
        from mva_lightning.model import lora

        # decoding combines the value vectors itself: it needs w, not merged weights
        weights = [lora.get_weights(policy)] if self.combination == "decoding" else None
        return self._generate_and_score(policy, datamodule, values, weights)[0]

    def score_many(
        self,
        policy: nn.Module,
        datamodule,
        values: Sequence[str],
        weights: Sequence[Mapping[str, float]],
    ) -> list[dict[str, float]]:
        """Scores of many preference vectors: the prompt set once per vector, one ``generate``."""
        merged = self.combination == "weights"
        if merged and (len(weights) == 1 or self.candidates_per_forward == 1):
            return super().score_many(policy, datamodule, values, weights)
        return self._generate_and_score(policy, datamodule, values, weights)

    def _generate_and_score(self, policy, datamodule, values, weights) -> list[dict[str, float]]:
        from mva_lightning.model import lora
        from mva_lightning.model.decoding import generate_combined
        from mva_lightning.model.generation import generate

        prompts = self.prompts(datamodule, values)
        n, c = len(prompts), 1 if weights is None else len(weights)
        chat = datamodule.chat_template if self.chat_template is None else self.chat_template
        max_prompt = self.max_prompt_length or datamodule.max_prompt_length
        settings = {**self.generation, "batch_size": self.generation["batch_size"] * c}
        # Prompt block k generates with w_k (merged weights, or combined log-probs: MOD).
        per_prompt = None if weights is None else lora.stack_weights(weights, n)
        decode = generate_combined if self.combination == "decoding" else generate
        responses = decode(
            policy,
            datamodule.tokenizer,
            list(prompts) * c,
            chat_template=chat,
            max_prompt_length=max_prompt,
            prompt_weights=per_prompt,
            **settings,
        )
        out = [Scores() for _ in range(c)]
        for v in values:
            scorer, name = self.scorers[v], _scorer_name(self.scorers[v])
            try:  # one call for every candidate's responses
                with full_precision(device_type(policy)):  # a judge keeps its own precision
                    raw = scorer(list(prompts) * c, list(responses))
                scores = check_scores(raw, n * c, name)
            except ScorerError:
                raise
            except Exception as err:
                raise ScorerError(f"scorer {name!r} (value {v!r}) failed: {err}") from err
            for k, row in enumerate(out):
                block = scores[k * n : (k + 1) * n]
                mean = sum(block) / n
                row[v] = mean
                row[f"{v}/std"] = math.sqrt(sum((s - mean) ** 2 for s in block) / n)
                row.per_item[v] = list(block)  # one score per prompt
        for name, indicator in self.indicators.items():
            raw = indicator(list(prompts) * c, list(responses))
            if len(raw) != n * c:
                raise ScorerError(f"indicator {name!r} returned {len(raw)} values for {n * c}")
            for k, row in enumerate(out):
                block = [float(x) for x in raw[k * n : (k + 1) * n]]
                counted = [x for x in block if not math.isnan(x)]
                if counted:  # no prompt counts (e.g. no sensitive prompt): no column
                    row[name] = sum(counted) / len(counted)
                    row.per_item[name] = block
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
