"""Response log-probs: the packed shared-prompt forward and the compiled decoder."""

import pytest
import torch

from mva_lightning.data.collate import collate_pairs, tokenize_pair
from mva_lightning.data.sources import PreferencePair
from mva_lightning.model import backbones, lora
from mva_lightning.model.logps import response_logps, share_prompt_pays

PAIRS = [  # prompts of different lengths, responses of different lengths
    PreferencePair("Q: hi\nA:", " hello there", " no"),
    PreferencePair("Q: a longer question here?\nA:", " yes", " a much longer answer"),
    PreferencePair("Q: x\nA:", " y", " z"),
]


def _policy(attention: str):
    backbone = backbones.tiny_llama()
    backbone.model.set_attn_implementation(attention)
    batch = collate_pairs(
        [tokenize_pair(p, i, backbone.tokenizer, 64, 40) for i, p in enumerate(PAIRS)], 0
    )
    policy = lora.add_value_vectors(backbone.model, ["v"])
    lora.set_trainable(policy, ["v"])
    lora.set_weights(policy, {"v": 1.0})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, batch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_share_prompt_gives_the_plain_log_probs_and_gradients(attention):
    policy, batch = _policy(attention)
    args = (policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    out = {}
    for share in (False, True):
        policy.zero_grad(set_to_none=True)
        logps = response_logps(*args, share_prompt=share)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        out[share] = (logps.detach(), grads)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    assert out[True][1].keys() == out[False][1].keys() and out[True][1]
    for k, g in out[False][1].items():  # float rounding differs: compare at the grad's scale
        torch.testing.assert_close(out[True][1][k], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_share_prompt_sees_only_its_own_response():
    """Changing a chosen token moves the chosen log-prob only, never the rejected one."""
    policy, batch = _policy("sdpa")
    ids = batch["input_ids"].clone()
    args = (batch["attention_mask"], batch["response_mask"])
    with torch.no_grad():
        before = response_logps(policy, ids, *args, share_prompt=True)
        first = int(batch["response_mask"][1].int().argmax())  # pair 1's chosen response
        ids[1, first + 1] = (ids[1, first + 1] + 7) % 250 + 3
        after = response_logps(policy, ids, *args, share_prompt=True)
    changed = (after - before).abs() > 1e-6
    assert changed.tolist() == [False, True, False, False, False, False]


def test_share_prompt_falls_back_where_it_does_not_apply():
    policy, batch = _policy("sdpa")
    args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    # Rows that do not share their prompt (not a [chosen; rejected] batch): the plain path.
    swapped = [t[[0, 1, 2, 4, 3, 5]] for t in args]
    plain = response_logps(policy, *swapped)
    torch.testing.assert_close(response_logps(policy, *swapped, share_prompt=True), plain)


def test_share_prompt_auto_follows_the_attention_implementation():
    policy = lora.add_value_vectors(backbones.tiny_llama().model, ["v"])  # PEFT-wrapped
    assert share_prompt_pays(policy, "auto") is True
    policy.get_base_model().config._attn_implementation = "flash_attention_2"  # no 4D masks
    assert share_prompt_pays(policy, "auto") is False
    assert share_prompt_pays(policy, True) is True and share_prompt_pays(policy, False) is False
    with pytest.raises(ValueError, match="train.share_prompt"):
        share_prompt_pays(policy, "sometimes")


@pytest.mark.slow
def test_compiled_decoder_gives_the_eager_log_probs():
    from mva_lightning.assembly import compile_decoder

    backbone = backbones.tiny_llama()
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, 12:] = 1
    eager = response_logps(backbone.model, ids, mask, response)
    compile_decoder(backbone.model)
    torch.testing.assert_close(response_logps(backbone.model, ids, mask, response), eager)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_share_prompt_with_absolute_positions(attention):
    """GPT-2 adds learned position embeddings: the rejected response must restart its positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2)).eval()
    model.set_attn_implementation(attention)
    tok = backbones.byte_tokenizer()
    batch = collate_pairs([tokenize_pair(p, i, tok, 64, 40) for i, p in enumerate(PAIRS)], 0)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with torch.no_grad():
        plain, packed = response_logps(*args), response_logps(*args, share_prompt=True)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-4)


def test_pair_weights_need_a_chosen_rejected_batch():
    policy, batch = _policy("sdpa")
    rows = [t[:5] for t in (batch["input_ids"], batch["attention_mask"], batch["response_mask"])]
    with pytest.raises(ValueError, match=r"pair_weights needs a \[chosen; rejected\] batch, got 5"):
        response_logps(policy, *rows, pair_weights={"v": torch.ones(2)})
