"""Decoding-time combination (MOD): one-hot = the value alone, the combined log-probs by hand,
any w, batch independence, the generation objective scoring with it, and the MOD sequence
log-probs behind the implicit-reward objective."""

import re
import shlex

import pytest
import torch
from conftest import REPO, VALUES, make_datamodule, make_policy

from mva_lightning.data.collate import collate_pairs
from mva_lightning.model import lora
from mva_lightning.model.decoding import combine_logprobs, generate_combined, mod_row_weights
from mva_lightning.model.generation import generate, tokenize_prompts
from mva_lightning.model.logps import combined_response_logps, response_logps
from mva_lightning.sweep.objectives import GenerationScore, ImplicitReward

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


def _pair_batch(tokenizer, value="helpful"):
    """Held-out pairs as a [chosen; rejected] batch: (input_ids, attention_mask, response_mask)."""
    dm = make_datamodule(tokenizer)
    batch = collate_pairs(dm.tokenized(value, "val"), tokenizer.pad_token_id)
    return dm, (batch["input_ids"], batch["attention_mask"], batch["response_mask"])


def _per_pair(rows):
    """{value: (B,) weights} from one row (w_helpful, w_harmless) per pair."""
    return {v: torch.tensor([float(r[k]) for r in rows]) for k, v in enumerate(VALUES)}


@pytest.mark.parametrize("share_prompt", [False, True])
def test_mod_sequence_logps_match_a_hand_computation(setup, share_prompt):
    policy, _, tokenizer = setup
    _, args = _pair_batch(tokenizer)
    ids, mask, response = args
    pairs, w = ids.shape[0] // 2, (1.5, -0.5)

    def mod(pair_weights=None):
        return combined_response_logps(
            policy, *args, share_prompt=share_prompt, pair_weights=pair_weights
        )

    with torch.no_grad():
        scores = 0.0
        for v, wv in zip(VALUES, w, strict=True):  # two forwards, each value's vector alone
            with lora.using_weights(policy, {v: 1.0}):
                logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (S, T-1, V)
            scores = scores + wv * torch.log_softmax(logits.float(), dim=-1)
        log_mod = scores - torch.logsumexp(scores, dim=-1, keepdim=True)  # (S, T-1, V)
        token = log_mod.gather(-1, ids[:, 1:, None])[..., 0]  # (S, T-1)
        hand = (token * response[:, 1:]).sum(dim=1)  # (S,) over the response tokens
        got = mod(_per_pair([w] * pairs))
        torch.testing.assert_close(got, hand, rtol=1e-5, atol=1e-4)
        with lora.using_weights(policy, dict(zip(VALUES, w, strict=True))):
            torch.testing.assert_close(mod(), got)  # None: the policy's current weights
        # one-hot w: that value's own log-probs; w = 0: the base model's
        for one_hot in [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)]:
            with lora.using_weights(policy, dict(zip(VALUES, one_hot, strict=True))):
                own = response_logps(policy, *args)
            torch.testing.assert_close(mod(_per_pair([one_hot] * pairs)), own)
        # each pair with its own w computes as if alone
        rows = [(1.5, -0.5), (0.0, 0.0), (1.0, 0.0), (0.3, 0.7), (-1.0, 2.0), (0.5, 0.5)]
        together = mod(_per_pair(rows[:pairs]))
        for i, row in enumerate(rows[:pairs]):
            alone = combined_response_logps(
                policy, *(t[[i, pairs + i]] for t in args), pair_weights=_per_pair([row])
            )
            torch.testing.assert_close(together[[i, pairs + i]], alone, rtol=1e-5, atol=1e-4)
    assert lora.get_weights(policy) == {"helpful": 0.0, "harmless": 0.0}  # restored


def test_implicit_reward_with_decoding_combination(setup):
    policy, _, tokenizer = setup
    dm, _ = _pair_batch(tokenizer)
    objective = ImplicitReward(beta=0.1, combination="decoding", candidates_per_forward=4)
    objective.validate(dm, VALUES)
    many = objective.score_many(policy, dm, VALUES, CANDIDATES)
    merged = ImplicitReward(beta=0.1).score_many(policy, dm, VALUES, CANDIDATES)
    for v in VALUES:
        _, args = _pair_batch(tokenizer, v)
        with torch.no_grad(), lora.using_weights(policy, {}):
            ref = response_logps(policy, *args)
        for w, got in zip(CANDIDATES, many, strict=True):
            with torch.no_grad(), lora.using_weights(policy, w):
                chosen, rejected = (0.1 * (combined_response_logps(policy, *args) - ref)).chunk(2)
            margins = chosen - rejected
            assert got[f"{v}/margin"] == pytest.approx(float(margins.mean()), abs=1e-5)
            assert got.per_item[v] == [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
        assert many[0][v] == 0.5 and many[0][f"{v}/margin"] == 0.0  # w = 0: the base, all ties
        # a one-hot w is the value's vector alone: the same model as merged weights
        assert many[3][f"{v}/margin"] == pytest.approx(merged[3][f"{v}/margin"], abs=1e-5)
    assert many[2]["helpful/margin"] != pytest.approx(merged[2]["helpful/margin"], abs=1e-4)
    with lora.using_weights(policy, CANDIDATES[1]):  # score(): the policy's current w
        one = objective.score(policy, dm, VALUES)
    assert one["helpful/margin"] == pytest.approx(many[1]["helpful/margin"], abs=1e-5)
    assert objective.settings()["combination"] == "decoding"
    assert objective.for_split("test").combination == "decoding"
    assert "combination" not in ImplicitReward().settings()  # earlier caches stay valid
    with pytest.raises(
        ValueError,
        match=r"extrapolation\.objective\.combination: expected one of "
        r"\['weights', 'decoding'\], got 'mod'",
    ):
        ImplicitReward(combination="mod")
