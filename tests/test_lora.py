"""Value vectors: exact weighted combination, trainable flags, adapter folders, log-probs."""

import copy

import pytest
import torch

from mva_lightning.data.collate import collate_pairs, tokenize_pair
from mva_lightning.data.sources import PreferencePair
from mva_lightning.model import lora
from mva_lightning.model.backbones import tiny_llama
from mva_lightning.model.logps import response_logps

VALUES = ["helpful", "harmless", "humor"]


@pytest.fixture(scope="module")
def backbone():
    return tiny_llama(seed=1)


@pytest.fixture
def policy(backbone):
    model = lora.add_value_vectors(copy.deepcopy(backbone.model), VALUES, r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for v in VALUES:  # non-zero B so that every value vector changes the model
                layer.lora_B[v].weight.copy_(
                    torch.randn(layer.lora_B[v].weight.shape, generator=gen)
                )
    return model


def _merged_by_hand(backbone, policy, weights):
    """W_0 + sum_v w_v * s * B_v A_v written into a fresh copy of the base model."""
    model = copy.deepcopy(backbone.model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, _ in lora.lora_layers(policy):
            target = modules[name.removeprefix("base_model.model.")]
            for v, w in weights.items():
                target.weight += w * lora.lora_factors(policy, v)[name].delta_w()
    return model


@pytest.mark.parametrize(
    "weights",
    [
        {"helpful": 1.0},
        {"helpful": 1.5, "harmless": -0.5, "humor": 0.3},
        {"helpful": 2.0, "harmless": 2.0, "humor": -1.0},
    ],
)
def test_combination_is_exact(backbone, policy, weights):
    ids = torch.randint(0, 200, (2, 12))
    lora.set_weights(policy, weights)
    with torch.no_grad():
        got = policy(input_ids=ids).logits
        want = _merged_by_hand(backbone, policy, weights)(input_ids=ids).logits
        base = backbone.model(input_ids=ids).logits
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert lora.get_weights(policy) == pytest.approx({v: weights.get(v, 0.0) for v in VALUES})


def test_zero_weights_is_the_base_and_context_restores(backbone, policy):
    ids = torch.randint(0, 200, (1, 8))
    lora.set_weights(policy, {"helpful": 0.7})
    with torch.no_grad(), lora.using_weights(policy, {}):
        torch.testing.assert_close(
            policy(input_ids=ids).logits, backbone.model(input_ids=ids).logits
        )
    assert lora.get_weights(policy)["helpful"] == pytest.approx(0.7)


def test_unknown_value_and_wrong_length(policy):
    with pytest.raises(KeyError, match="no value vector"):
        lora.set_weights(policy, {"funny": 1.0})
    with pytest.raises(ValueError, match="has 2 entries; expected 3"):
        lora.preference_dict(VALUES, [1.0, 2.0])
    message = r"preference names \['funny'\] have no value vector; trained: \['helpful', "
    for call in (
        lambda: lora.check_names(VALUES, ["helpful", "funny"]),
        lambda: lora.concatenated_adapter(policy, {"funny": 1.0}),
        lambda: lora.using_row_weights(policy, {"funny": torch.ones(2)}).__enter__(),
    ):
        with pytest.raises(KeyError, match=message):
            call()
    lora.check_names(VALUES, ["humor"])  # known: no error


def test_adapter_fingerprint_follows_the_tensors(policy):
    key = lora.adapter_fingerprint(policy, ["helpful", "harmless"])
    assert len(key) == 16 and key == lora.adapter_fingerprint(policy, ["helpful", "harmless"])
    assert key != lora.adapter_fingerprint(policy, ["helpful"])
    with torch.no_grad():
        lora.adapter_parameters(policy, "harmless")[0].add_(1e-3)
    assert key != lora.adapter_fingerprint(policy, ["helpful", "harmless"])


def test_set_trainable_survives_switching(policy):
    lora.set_trainable(policy, ["harmless"])
    lora.set_weights(policy, {"helpful": 1.0})  # PEFT's set_adapter would toggle grads
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".harmless." in n for n in trainable)
    assert len(trainable) == len(lora.adapter_parameters(policy, "harmless"))


def test_adapter_folder_loads_with_peft(backbone, policy, tmp_path):
    from peft import PeftModel

    lora.save_value_vectors(policy, tmp_path, ["humor"])
    assert (tmp_path / "humor" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(copy.deepcopy(backbone.model), tmp_path / "humor")
    ids = torch.randint(0, 200, (1, 8))
    lora.set_weights(policy, {"humor": 1.0})
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, policy(input_ids=ids).logits)


def test_response_logps_matches_full_forward(backbone, policy):
    tok = backbone.tokenizer
    pairs = [
        PreferencePair("\n\nHuman: hi\n\nAssistant:", "hello there", "go away"),
        PreferencePair("\n\nHuman: a much longer question here\n\nAssistant:", "yes", "no!!"),
    ]
    batch = collate_pairs(
        [tokenize_pair(p, i, tok, 64, 40) for i, p in enumerate(pairs)], tok.pad_token_id
    )
    lora.set_weights(policy, {"helpful": 1.0, "humor": -0.5})
    with torch.no_grad():
        fast = response_logps(
            policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
        full = response_logps(
            policy,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            head_on_response_only=False,
        )
        # by hand: sum of log-softmax at response targets
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        tgt = batch["input_ids"][:, 1:]
        token = logp.gather(-1, tgt[..., None])[..., 0] * batch["response_mask"][:, 1:]
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast, token.sum(-1), atol=1e-4, rtol=1e-5)
    assert fast.shape == (4,) and torch.all(fast < 0)


def test_cosine_similarity_of_identical_vectors(policy):
    with torch.no_grad():
        for _, layer in lora.lora_layers(policy):
            layer.lora_A["humor"].weight.copy_(layer.lora_A["helpful"].weight)
            layer.lora_B["humor"].weight.copy_(-2 * layer.lora_B["helpful"].weight)
    cos = lora.cosine_similarity(policy, "helpful", "humor")
    assert cos and all(c == pytest.approx(-1.0, abs=1e-5) for c in cos.values())


@pytest.mark.parametrize("fuse", [None, True, False])
def test_row_weights_give_each_row_its_own_combination(policy, fuse):
    names = lora.value_names(policy)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(3, 200, (2, 10), generator=gen)
    rows = [(0.5, 1.0), (1.5, 0.0), (0.0, -2.0)]
    lora.set_weights(policy, {names[0]: 0.25})
    with torch.no_grad():
        alone = []
        for w in rows:
            with lora.using_weights(policy, dict(zip(names[:2], w, strict=True))):
                alone.append(policy(input_ids=ids).logits)
        columns = {
            v: torch.tensor([w[i] for w in rows]).repeat_interleave(2)
            for i, v in enumerate(names[:2])
        }
        with lora.using_row_weights(policy, columns, fuse=fuse):
            together = policy(input_ids=ids.repeat(3, 1)).logits
            layer = lora.lora_layers(policy)[0][1]
            fused = fuse is not False  # the tiny model's layers fuse
            assert bool(layer._forward_hooks) == fused
            assert list(layer.active_adapters) == ([] if fused else names[:2])
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-6)
    assert lora.get_weights(policy)[names[0]] == 0.25  # the previous combination is back
    assert not any(layer._forward_hooks for _, layer in lora.lora_layers(policy))
    with pytest.raises(KeyError, match="no value vector"):
        lora.using_row_weights(policy, {"nope": torch.ones(2)}).__enter__()
    with pytest.raises(ValueError, match="one length"):
        lora.using_row_weights(
            policy, {names[0]: torch.ones(2), names[1]: torch.ones(3)}
        ).__enter__()


def test_row_weights_fall_back_where_layers_cannot_fuse(policy):
    names = lora.value_names(policy)
    layer = lora.lora_layers(policy)[0][1]
    assert lora.can_fuse(layer, names)
    columns = {names[0]: torch.tensor([1.0, 0.5])}
    dropout = layer.lora_dropout[names[0]]
    layer.lora_dropout[names[0]] = torch.nn.Dropout(0.1).train()  # live dropout: not fusable
    try:
        assert not lora.can_fuse(layer, names)
        with pytest.raises(ValueError, match="cannot be fused"):
            lora.using_row_weights(policy, columns, fuse=True).__enter__()
        lora.set_weights(policy, {})
        with lora.using_row_weights(policy, columns):  # None: the per-adapter columns
            assert not layer._forward_hooks and list(layer.active_adapters) == names[:1]
            assert layer.scaling[names[0]].shape == (2, 1, 1)
    finally:
        layer.lora_dropout[names[0]] = dropout
    assert lora.get_weights(policy) == dict.fromkeys(names, 0.0)
    with lora.using_row_weights(policy, {names[0]: torch.zeros(2)}, fuse=True):  # nothing to add
        assert not layer._forward_hooks and list(layer.active_adapters) == []


def test_stack_weights_gives_each_vector_its_block_of_rows():
    rows = lora.stack_weights([{"helpful": 1.5}, {"helpful": 0.5, "harmless": 2.0}], rows_each=2)
    assert rows["helpful"].tolist() == [1.5, 1.5, 0.5, 0.5]
    assert rows["harmless"].tolist() == [0.0, 0.0, 2.0, 2.0]  # left out of vector 1: w = 0
