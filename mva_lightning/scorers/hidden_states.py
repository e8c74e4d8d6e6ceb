"""Frozen causal-LM features of (prompt, response) rows, for trained reward heads.

A reward head reads what a language model makes of the whole exchange, not two sentence
embeddings: the row is formatted with the model's chat template (the HH transcript's turns, then
the response as the assistant's turn), left-truncated to ``max_length`` tokens (the response and
the latest turns survive), and run through the first ``layer`` decoder layers. The features are
``[h_last, mean(h_response)]`` (``2 * hidden_size``): the hidden state of the final token and
the mean over the response's tokens, both after the model's final norm.

Without a chat template (a base model) the row is the raw transcript, a space, and the response.
The model is cut to its first ``layer`` layers (the rest is never computed), loaded once per
process and shared by every head that asks for the same model and layer; features are cached by
row, so two value heads scoring the same answers cost one forward pass.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from mva_lightning.data.collate import transcript_to_messages

_CACHES: dict[tuple, OrderedDict] = {}  # features by row, per (model, layer, length, loader)


@functools.cache
def _truncated_lm(model: str, layer: int):
    """(model, tokenizer) with only the first ``layer`` decoder layers, fp32, eval."""
    from mva_lightning.model.backbones import from_pretrained, smollm2

    backbone = smollm2() if model == "smollm2" else from_pretrained(model)
    lm, tok = backbone.model, backbone.tokenizer
    decoder = lm.get_decoder()
    total = len(decoder.layers)
    if not 1 <= layer <= total:
        raise ValueError(f"hidden-state features: layer must be in 1..{total} for {model}")
    decoder.layers = decoder.layers[:layer]
    lm.config.num_hidden_layers = layer
    return lm.eval(), tok


class HiddenStates:
    """``(prompts, responses) -> (N, 2 * hidden_size)`` features from a frozen causal LM.

    Args:
        model: ``smollm2`` (SmolLM2-135M-Instruct from PyPI) or a hub id / local folder.
        layer: How many decoder layers to run (the features are that layer's output, normed).
        max_length: Tokens kept per row, counted from the end.
        batch_size: Rows per forward pass (rows are length-sorted first).
        cache_size: Rows kept in the in-memory feature cache.
        progress: Show a progress bar.
        loader: ``(model, layer) -> (lm, tokenizer)``; tests pass a tiny model.
    """

    def __init__(
        self,
        model: str = "smollm2",
        layer: int = 16,
        max_length: int = 128,
        batch_size: int = 16,
        cache_size: int = 8192,
        progress: bool = False,
        loader=None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"hidden-state features: max_length must be >= 2, got {max_length}")
        self.model, self.layer, self.max_length = model, int(layer), int(max_length)
        self.batch_size, self.progress = int(batch_size), progress
        self._loader = loader or _truncated_lm
        # One cache per (model, layer, length, loader) in the process: every head reading the
        # same features (e.g. rm_helpful and rm_harmless scoring one sweep's answers) shares it.
        key = (model, self.layer, self.max_length, self._loader)
        self._cache: OrderedDict[str, torch.Tensor] = _CACHES.setdefault(key, OrderedDict())
        self._cache_size = int(cache_size)

    @property
    def dim(self) -> int:
        """Feature width, ``2 * hidden_size`` (loads the model on first use)."""
        lm, _ = self._loader(self.model, self.layer)
        return 2 * int(lm.config.hidden_size)

    def spec(self) -> dict:
        """What a saved head needs to rebuild the same features."""
        return {"model": self.model, "layer": self.layer, "max_length": self.max_length}

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Features of each (prompt, response) row, (N, 2 * hidden_size) fp32."""
        keys = [_key(p, r) for p, r in zip(prompts, responses, strict=True)]
        if not keys:
            return torch.zeros(0, 0)
        where = {k: i for i, k in enumerate(keys)}  # one row per distinct key
        missing = [k for k in where if k not in self._cache]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            feats = self._forward(
                [prompts[where[k]] for k in missing], [responses[where[k]] for k in missing]
            )
            fresh = dict(zip(missing, feats, strict=True))
        out = torch.stack([fresh[k] if k in fresh else self._cache[k] for k in keys])
        for k in where:  # most recent last; evict the oldest
            self._cache[k] = fresh[k] if k in fresh else self._cache.pop(k)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    # ------------------------------------------------------------------ internals

    def _tokenize(self, tok, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of the formatted row (left-truncated) and how many belong to the response.

        With a chat template: the transcript's turns, then the response as the assistant's
        turn. Without one (a base model): the raw transcript, a space, the response.
        """
        if getattr(tok, "chat_template", None):
            context = transcript_to_messages(prompt) or [{"role": "user", "content": prompt}]
            reply = {"role": "assistant", "content": response.strip()}
            full = _ids(tok.apply_chat_template([*context, reply], tokenize=True))
            head = _ids(tok.apply_chat_template(context, tokenize=True, add_generation_prompt=True))
        else:
            head = tok(prompt, add_special_tokens=False)["input_ids"]
            full = head + tok(" " + response.strip(), add_special_tokens=False)["input_ids"]
        n_response = max(1, len(full) - len(head))
        full = full[-self.max_length :]
        return full, min(n_response, len(full))

    @torch.inference_mode()
    def _forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        lm, tok = self._loader(self.model, self.layer)
        rows = [self._tokenize(tok, p, r) for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        out = torch.zeros(len(rows), 2 * lm.config.hidden_size)
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="reward features", unit="batch")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for idx in batches:
            width = max(len(rows[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            response = torch.zeros(len(idx), width)  # (B, T): 1 on response tokens
            for j, i in enumerate(idx):
                seq, n_resp = rows[i]
                ids[j, width - len(seq) :] = torch.tensor(seq)
                mask[j, width - len(seq) :] = 1
                response[j, width - n_resp :] = 1
            h = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            h = h[-1].float()  # (B, T, H): the last kept layer, after the final norm
            mean = (h * response[..., None]).sum(1) / response.sum(1, keepdim=True)
            out[idx] = torch.cat([h[:, -1], mean], dim=-1)
        return out


def _ids(encoded) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list or a mapping, by version."""
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


def _key(prompt: str, response: str) -> str:
    return hashlib.sha1(f"{len(prompt)}:{prompt}{response}".encode()).hexdigest()
