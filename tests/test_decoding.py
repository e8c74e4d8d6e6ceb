"""Decoding-time combination (MOD): one-hot = the value alone, the combined log-probs by hand,
any w, batch independence, and the generation objective scoring with it."""

import re
import shlex

import pytest
import torch
from conftest import REPO, VALUES, make_datamodule, make_policy

from mva_lightning.model import lora
from mva_lightning.model.decoding import combine_logprobs, generate_combined, mod_row_weights
from mva_lightning.model.generation import generate, tokenize_prompts
from mva_lightning.sweep.objectives import GenerationScore

PROMPTS = ["\n\nHuman: Tell me a joke.\n\nAssistant:", "A", "Hello there, how are", "xyz"]


class TokenIds:
    """The tokenizer, but ``decode`` returns the token ids: generations compare token by token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def decode(self, tokens, skip_special_tokens=False):
        return " ".join(map(str, tokens))


@pytest.fixture(scope="module")
def setup():
    policy, backbone = make_policy()
    return policy, TokenIds(backbone.tokenizer), backbone.tokenizer


def _weights(*rows):
    """Per-prompt weights {value: [w_v of each row]} from rows (w_helpful, w_harmless)."""
    return {v: [float(r[k]) for r in rows] for k, v in enumerate(VALUES)}


def test_one_hot_weights_equal_the_values_own_greedy_generation(setup):
    policy, tok, _ = setup
    alone = {}
    for k, v in enumerate(VALUES):
        one_hot = tuple(float(j == k) for j in range(len(VALUES)))
        with lora.using_weights(policy, dict(zip(VALUES, one_hot, strict=True))):
            alone[v] = generate(policy, tok, PROMPTS, max_new_tokens=8, batch_size=3)
        got = generate_combined(
            policy, tok, PROMPTS, _weights(*[one_hot] * len(PROMPTS)), max_new_tokens=8
        )
        assert got == alone[v]
    assert alone["helpful"] != alone["harmless"]  # the value vectors do generate differently
    assert lora.get_weights(policy) == {"helpful": 0.0, "harmless": 0.0}  # restored


@pytest.mark.parametrize("w", [(0.7, 0.3), (1.5, -0.5)])
def test_combined_logprobs_match_a_hand_computation(setup, w):
    policy, tok, _ = setup
    (ids,) = tokenize_prompts(tok, PROMPTS[:1])
    x = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        by_value = []
        for v in VALUES:  # two separate forwards, each value's vector alone
            with lora.using_weights(policy, {v: 1.0}):
                by_value.append(torch.log_softmax(policy(input_ids=x).logits[0, -1], -1))
        hand = w[0] * by_value[0] + w[1] * by_value[1]  # (V,)
        # MOD's form: K one-hot rows of the prompt in one forward, combined with w
        rows, mix = mod_row_weights(torch.tensor([w]))  # (K, K), (1, K)
        with lora.using_row_weights(policy, dict(zip(VALUES, rows.unbind(1), strict=True))):
            logits = policy(input_ids=x.expand(len(VALUES), -1)).logits[:, -1]  # (K, V)
    combined = combine_logprobs(logits, mix)  # (1, V)
    torch.testing.assert_close(combined[0], hand)
    first = generate_combined(policy, tok, PROMPTS[:1], _weights(w), max_new_tokens=1)
    assert first == [str(int(hand.argmax()))]


def test_weights_outside_the_simplex_run_and_rows_do_not_see_each_other(setup):
    policy, tok, _ = setup
    rows = [(1.5, -0.5), (0.3, 0.7), (0.0, 0.0), (-1.0, 2.0)]
    batched = generate_combined(policy, tok, PROMPTS, _weights(*rows), max_new_tokens=8)
    again = generate_combined(policy, tok, PROMPTS, _weights(*rows), max_new_tokens=8)
    assert batched == again  # deterministic
    alone = [
        generate_combined(policy, tok, [p], _weights(w), max_new_tokens=8)[0]
        for p, w in zip(PROMPTS, rows, strict=True)
    ]
    assert batched == alone
    with lora.using_weights(policy, {}):  # w = 0 decodes from the base model
        assert batched[2] == generate(policy, tok, PROMPTS[2:3], max_new_tokens=8)[0]
    # the same prompt under two preference vectors in one call
    two = generate_combined(policy, tok, PROMPTS[:1] * 2, _weights(*rows[:2]), max_new_tokens=8)
    assert two == [alone[0], generate_combined(policy, tok, PROMPTS[:1], _weights(rows[1]), 8)[0]]
    assert two[0] != two[1]


def test_sampling_is_seeded_and_errors_are_clear(setup):
    policy, tok, _ = setup
    kw = dict(max_new_tokens=6, do_sample=True, top_p=0.9)
    w = _weights((1.5, -0.5), (0.5, 0.5))
    a = generate_combined(policy, tok, PROMPTS[:2], w, seed=1, **kw)
    assert a == generate_combined(policy, tok, PROMPTS[:2], w, seed=1, **kw)
    assert a != generate_combined(policy, tok, PROMPTS[:2], w, seed=2, **kw)
    with pytest.raises(ValueError, match=r"expected 2 weights per value, got \{'helpful': 1\}"):
        generate_combined(policy, tok, PROMPTS[:2], {"helpful": [1.0]})
    with pytest.raises(ValueError, match="names no value to combine"):
        generate_combined(policy, tok, PROMPTS[:2], {})
    with pytest.raises(KeyError, match=r"\['humor'\] have no value vector"):
        generate_combined(policy, tok, PROMPTS[:1], {"humor": [1.0]})
    assert generate_combined(policy, tok, [], {"helpful": []}) == []


class LengthScorer:
    """Score = number of characters of the response."""

    name = "length"

    def __call__(self, prompts, responses):
        return [float(len(r)) for r in responses]


CANDIDATES = [
    {"helpful": 0.0, "harmless": 0.0},
    {"helpful": 0.3, "harmless": 0.7},
    {"helpful": 1.5, "harmless": -0.5},
    {"helpful": 1.0, "harmless": 0.0},
]


def test_generation_score_with_decoding_combination(setup):
    policy, _, tokenizer = setup
    dm = make_datamodule(tokenizer)
    scorers = {v: LengthScorer() for v in VALUES}
    kw = dict(num_prompts=3, max_new_tokens=6, batch_size=2)
    objective = GenerationScore(scorers, combination="decoding", candidates_per_forward=4, **kw)
    objective.validate(dm, VALUES)
    many = objective.score_many(policy, dm, VALUES, CANDIDATES)
    prompts = objective.prompts(dm, VALUES)
    for w, got in zip(CANDIDATES, many, strict=True):
        responses = generate_combined(
            policy,
            tokenizer,
            prompts,
            {v: [w[v]] * len(prompts) for v in VALUES},
            max_new_tokens=6,
            max_prompt_length=dm.max_prompt_length,
        )
        assert got["helpful"] == pytest.approx(sum(map(len, responses)) / len(prompts))
        assert got.per_item["harmless"] == [float(len(r)) for r in responses]
    with lora.using_weights(policy, CANDIDATES[2]):  # score(): the policy's current w
        assert objective.score(policy, dm, VALUES) == many[2]
    merged = GenerationScore(scorers, **kw).score_many(policy, dm, VALUES, CANDIDATES)
    assert many[0] == merged[0] and many[3] == merged[3]  # w = 0 and one-hot: the same model
    assert objective.settings()["combination"] == "decoding"
    assert objective.for_split("test").combination == "decoding"
    assert "combination" not in GenerationScore(scorers).settings()  # earlier caches stay valid
    with pytest.raises(
        ValueError,
        match=r"extrapolation\.objective\.combination: expected one of "
        r"\['weights', 'decoding'\], got 'bad'",
    ):
        GenerationScore(scorers, combination="bad")


def test_the_documented_sweep_command_composes_to_a_decoding_objective():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mva_lightning.sweep.cli import sweep_settings

    text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    (line,) = re.findall(r"python -m mva_lightning\.sweep .*combination=decoding.*", text)
    args = shlex.split(line.strip("`"))[3:]
    with initialize_config_dir(config_dir=str(REPO / "mva_lightning" / "conf"), version_base="1.3"):
        chosen = compose(config_name="sweep", overrides=args).extrapolation
        own = compose(config_name="sweep", overrides=["extrapolation=generation"]).extrapolation
    settings = sweep_settings(own, chosen)  # patched onto a run that swept by generation
    assert settings["output_subdir"] == "extrapolation_mod"
    node = OmegaConf.create({"seed": 0, "objective": settings["objective"]})
    node.objective.scorers = {v: {"_target_": "test_decoding.LengthScorer"} for v in VALUES}
    objective = instantiate(node.objective)
    assert isinstance(objective, GenerationScore) and objective.combination == "decoding"
