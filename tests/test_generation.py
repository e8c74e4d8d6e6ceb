"""Batched generation: left padding changes nothing, order restored, eos stop, empty, errors."""

import pytest
import torch

from mva_lightning.model.backbones import tiny_llama
from mva_lightning.model.generation import generate, tokenize_prompts

PROMPTS = [
    "\n\nHuman: Tell me a joke.\n\nAssistant:",
    "A",
    "Hello there, how are",
    "xyz",
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
]


@pytest.fixture(scope="module")
def backbone():
    # A random init with large weights: greedy continuations depend on the whole prompt (the
    # default 0.02 init mostly repeats the last token, which would hide padding bugs).
    b = tiny_llama(seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return b


def test_left_padded_batch_equals_single_prompt_greedy(backbone):
    batched = generate(backbone.model, backbone.tokenizer, PROMPTS, max_new_tokens=10, batch_size=5)
    single = [
        generate(backbone.model, backbone.tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS
    ]
    assert batched == single
    assert len(set(single)) == len(PROMPTS)  # the continuations really differ per prompt


def test_order_is_restored_whatever_the_batch_size(backbone):
    a = generate(backbone.model, backbone.tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    b = generate(backbone.model, backbone.tokenizer, PROMPTS[::-1], max_new_tokens=6, batch_size=3)
    assert a == b[::-1]


def test_sampling_is_seeded(backbone):
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9)
    a = generate(backbone.model, backbone.tokenizer, PROMPTS[:2], seed=1, **kw)
    b = generate(backbone.model, backbone.tokenizer, PROMPTS[:2], seed=1, **kw)
    c = generate(backbone.model, backbone.tokenizer, PROMPTS[:2], seed=2, **kw)
    assert a == b and a != c


class _ForceEos:
    """Forward hook on the LM head: at decoding call ``at``, row ``row`` must emit eos."""

    def __init__(self, eos: int, at: int, row: int | None):
        self.eos, self.at, self.row, self.calls = eos, at, row, 0

    def __call__(self, _module, _args, logits):
        self.calls += 1
        if self.calls == self.at:
            logits = logits.clone()
            rows = slice(None) if self.row is None else self.row
            logits[rows, -1, self.eos] = 1e4
        return logits


def test_stops_at_eos_per_row_and_empty_is_empty_string(backbone):
    model, tok = backbone.model, backbone.tokenizer
    prompts = ["abc", "xyz"]  # equal lengths: the batch keeps this order
    hook = model.lm_head.register_forward_hook(_ForceEos(tok.eos_token_id, at=3, row=0))
    try:
        out = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    finally:
        hook.remove()
    two = generate(model, tok, prompts, max_new_tokens=2, batch_size=2)
    full = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    # row 0: two tokens, then eos (cut there); row 1: unaffected, all six tokens
    assert out[0] == two[0] and out[1] == full[1] and full[0] != two[0]

    hook = model.lm_head.register_forward_hook(_ForceEos(tok.eos_token_id, at=1, row=None))
    try:
        assert generate(model, tok, prompts, max_new_tokens=6) == ["", ""]
    finally:
        hook.remove()


def test_long_prompt_keeps_its_end_and_context_overflow_is_an_error(backbone):
    tok = backbone.tokenizer
    assert tokenize_prompts(tok, ["abcdef"], max_prompt_length=3) == [tok("def")["input_ids"]]
    too_long = "x" * 1020  # context 1024
    with pytest.raises(ValueError, match=r"prompt 1 has 1020 tokens.*context of 1024"):
        generate(backbone.model, tok, ["ok", too_long], max_new_tokens=8)
    out = generate(backbone.model, tok, ["ok", too_long], max_new_tokens=8, max_prompt_length=16)
    assert len(out) == 2
    assert generate(backbone.model, tok, []) == []
    # an empty prompt falls back to the bos token instead of crashing
    assert len(generate(backbone.model, tok, [""], max_new_tokens=3)) == 1


def test_prompt_weights_must_give_one_weight_per_prompt(backbone):
    with pytest.raises(ValueError, match=r"expected 5 weights per value, got \{'v': 2\}"):
        generate(backbone.model, backbone.tokenizer, PROMPTS, prompt_weights={"v": [1.0, 0.5]})
