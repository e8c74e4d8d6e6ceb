"""Objectives: implicit-reward accuracy and margin (reference once: the base), generation."""

import math

import pytest
import torch
from conftest import VALUES, make_datamodule, make_policy

from mva_lightning.data.collate import collate_pairs
from mva_lightning.model import lora
from mva_lightning.model.generation import generate
from mva_lightning.model.logps import response_logps
from mva_lightning.model.precision import autocast
from mva_lightning.scorers.base import ScorerError
from mva_lightning.sweep.objectives import MAX_AUTO_CANDIDATES, GenerationScore, ImplicitReward


@pytest.fixture(scope="module")
def setup():
    policy, backbone = make_policy()
    return policy, make_datamodule(backbone.tokenizer)


def _margins_by_hand(policy, dm, value, weights, beta):
    """beta * ([log pi_w - log pi_0](chosen) - [...](rejected)) per pair, computed directly."""
    batch = collate_pairs(dm.tokenized(value, "val"), dm.tokenizer.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with torch.no_grad():
        lora.set_weights(policy, {})
        ref = response_logps(policy, *args)
        lora.set_weights(policy, weights)
        pol = response_logps(policy, *args)
    chosen, rejected = (beta * (pol - ref)).chunk(2)
    return chosen - rejected


def test_implicit_reward_matches_hand_computation(setup):
    policy, dm = setup
    weights = {"helpful": 1.5, "harmless": -0.5}
    objective = ImplicitReward(beta=0.1)
    lora.set_weights(policy, weights)
    got = objective.score(policy, dm, VALUES)
    for v in VALUES:
        margins = _margins_by_hand(policy, dm, v, weights, 0.1)
        assert got[v] == pytest.approx(float((margins > 0).float().mean()))
        assert got[f"{v}/margin"] == pytest.approx(float(margins.mean()), abs=1e-6)
    assert got["helpful/margin"] != 0.0  # the value vectors do move the model
    lora.set_weights(policy, weights)
    doubled = ImplicitReward(beta=0.2).score(policy, dm, VALUES)
    assert doubled["helpful/margin"] == pytest.approx(2 * got["helpful/margin"], rel=1e-5)
    assert doubled["helpful"] == got["helpful"]


def test_reference_is_the_base_and_computed_once(setup):
    policy, dm = setup
    objective = ImplicitReward(beta=0.1)
    calls = []
    hook = policy.get_base_model().model.register_forward_hook(lambda *a: calls.append(1))
    try:
        lora.set_weights(policy, {"helpful": 1.0})  # a trained policy is active at prepare time
        objective.score(policy, dm, VALUES)
        first = len(calls)  # reference + policy forwards: 2 values x 2 batches each
        lora.set_weights(policy, {})
        base = objective.score(policy, dm, VALUES)
        second = len(calls) - first
    finally:
        hook.remove()
    assert first == 8 and second == 4  # the second candidate needs no reference forward
    for v in VALUES:  # pi_w = pi_0 at w = 0: every implicit reward is exactly 0, a tie
        assert base[v] == 0.5 and base[f"{v}/margin"] == 0.0  # a tie counts half: chance
        assert base.per_item[v] == [0.5] * 6  # the 6 val pairs behind the score
    assert lora.get_weights(policy) == {"helpful": 0.0, "harmless": 0.0}


def test_implicit_reward_validation(setup):
    policy, dm = setup
    empty = make_datamodule(dm.tokenizer, n_val=0)
    with pytest.raises(ValueError, match=r"values \['helpful', 'harmless'\] have no 'val' pairs"):
        ImplicitReward().validate(empty, VALUES)
    with pytest.raises(KeyError, match="no data for value 'humor'"):
        ImplicitReward().validate(dm, ["helpful", "humor"])
    with pytest.raises(ValueError, match="beta must be > 0"):
        ImplicitReward(beta=0)
    assert ImplicitReward(max_pairs=2).for_split("test").settings()["split"] == "test"


class LengthScorer:
    """Score = number of characters of the response; records what it saw."""

    name = "length"

    def __init__(self, result=None):
        self.seen, self.result = [], result

    def __call__(self, prompts, responses):
        self.seen.append((list(prompts), list(responses)))
        return self.result if self.result is not None else [float(len(r)) for r in responses]


def test_generation_score_uses_a_shared_deduplicated_prompt_set(setup):
    policy, dm = setup
    scorers = {"helpful": LengthScorer(), "harmless": LengthScorer()}
    objective = GenerationScore(scorers, num_prompts=4, max_new_tokens=5, batch_size=3)
    objective.validate(dm, VALUES)
    lora.set_weights(policy, {"helpful": 1.0})
    got = objective.score(policy, dm, VALUES)
    prompts, responses = scorers["helpful"].seen[0]
    # val prompts are the same for both values: 6 unique, the first 4 kept, in order
    assert prompts == [f"\n\nHuman: item {i}?\n\nAssistant:" for i in range(4)]
    assert scorers["harmless"].seen[0] == (prompts, responses)
    assert responses == generate(
        policy, dm.tokenizer, prompts, max_new_tokens=5, max_prompt_length=dm.max_prompt_length
    )
    assert got["helpful"] == pytest.approx(sum(len(r) for r in responses) / 4)
    assert math.isfinite(got["harmless/std"])


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([1.0], r"scorer 'length' returned 1 scores for 2 responses"),
        ([1.0, float("nan")], r"scorer 'length' returned non-finite scores at rows \[1\]"),
        (RuntimeError("model offline"), r"scorer 'length' \(value 'harmless'\) failed: model"),
    ],
)
def test_scorer_errors_name_the_scorer(setup, result, message):
    policy, dm = setup

    class Broken(LengthScorer):
        def __call__(self, prompts, responses):
            if isinstance(result, Exception):
                raise result
            return result

    scorers = {"helpful": LengthScorer(), "harmless": Broken()}
    objective = GenerationScore(scorers, num_prompts=2, max_new_tokens=2)
    with pytest.raises(ScorerError, match=message):
        objective.score(policy, dm, VALUES)


def test_generation_score_needs_one_scorer_per_value(setup):
    _, dm = setup
    with pytest.raises(ValueError, match=r"missing \['harmless'\], unknown \['humor'\]"):
        GenerationScore({"helpful": LengthScorer(), "humor": LengthScorer()}).validate(dm, VALUES)


CANDIDATES = [  # zero, inside the simplex, beyond it, negative, one value only
    {"helpful": 0.0, "harmless": 0.0},
    {"helpful": 0.3, "harmless": 0.7},
    {"helpful": 1.5, "harmless": 2.0},
    {"helpful": -0.5, "harmless": 1.0},
    {"helpful": 1.0, "harmless": 0.0},
]


def _one_at_a_time(objective, policy, dm):
    out = []
    for w in CANDIDATES:
        with lora.using_weights(policy, w):
            out.append(objective.score(policy, dm, VALUES))
    return out


@pytest.mark.parametrize("share_prompt", [False, True])
def test_implicit_reward_scores_many_candidates_in_one_forward(setup, share_prompt):
    policy, dm = setup
    objective = ImplicitReward(beta=0.1, share_prompt=share_prompt, candidates_per_forward=5)
    single = _one_at_a_time(ImplicitReward(beta=0.1, share_prompt=False), policy, dm)
    previous = lora.get_weights(policy)
    calls = []
    hook = policy.get_base_model().model.register_forward_hook(lambda *a: calls.append(1))
    try:
        objective.prepare(policy, dm, VALUES)
        before = len(calls)
        many = objective.score_many(policy, dm, VALUES, CANDIDATES)
    finally:
        hook.remove()
    assert len(calls) - before == 4  # 2 values x 2 batches, whatever the number of candidates
    assert [set(r) for r in many] == [set(r) for r in single]
    for got, want in zip(many, single, strict=True):
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-5), k
    assert many[2]["helpful/margin"] != many[1]["helpful/margin"]  # rows kept apart
    assert lora.get_weights(policy) == previous  # restored


def test_implicit_reward_auto_candidates_per_forward_fills_the_token_budget(setup):
    policy, dm = setup
    sizes = [tuple(b["input_ids"].shape) for b in _prepared(ImplicitReward(beta=0.1), policy, dm)]
    longest = max(rows * width for rows, width in sizes)  # padded tokens one candidate adds
    assert ImplicitReward(beta=0.1).candidates_per_forward == 1  # nothing prepared yet
    for budget, want in [(3 * longest + 1, 3), (longest - 1, 1), (10**9, MAX_AUTO_CANDIDATES)]:
        objective = ImplicitReward(beta=0.1, tokens_per_forward=budget)
        _prepared(objective, policy, dm)
        assert objective.candidates_per_forward == want, budget
    decoding = ImplicitReward(beta=0.1, combination="decoding", tokens_per_forward=4 * longest)
    _prepared(decoding, policy, dm)
    assert decoding.candidates_per_forward == 2  # K = 2 rows per pair and candidate
    # "auto" scores what one candidate at a time scores
    auto = ImplicitReward(beta=0.1, tokens_per_forward=2 * longest)
    single = _one_at_a_time(ImplicitReward(beta=0.1, candidates_per_forward=1), policy, dm)
    for got, want in zip(auto.score_many(policy, dm, VALUES, CANDIDATES), single, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert auto.for_split("test").candidates_per_forward == 1  # its own batches, not prepared
    for bad in ("many", 0, True):
        with pytest.raises(ValueError, match='an integer >= 1 or "auto"'):
            ImplicitReward(candidates_per_forward=bad)
    with pytest.raises(ValueError, match="tokens_per_forward must be an integer >= 1"):
        ImplicitReward(tokens_per_forward=0)


def _prepared(objective, policy, dm):
    objective.prepare(policy, dm, VALUES)
    return [b for batches in objective._batches.values() for b in batches]


def test_generation_scores_many_candidates_in_one_generate(setup):
    policy, dm = setup
    scorers = {"helpful": LengthScorer(), "harmless": LengthScorer()}
    objective = GenerationScore(scorers, num_prompts=3, max_new_tokens=6, batch_size=2)
    single = _one_at_a_time(objective, policy, dm)
    singles_seen = list(scorers["helpful"].seen)
    scorers["helpful"].seen.clear()
    many = objective.score_many(policy, dm, VALUES, CANDIDATES)
    assert many == single
    ((prompts, responses),) = scorers["helpful"].seen  # one scorer call for all candidates
    assert responses == [r for _, rs in singles_seen for r in rs]
    assert len(set(responses)) > 3  # the candidates do generate differently
    sampled = GenerationScore(scorers, do_sample=True, candidates_per_forward=8)
    assert sampled.candidates_per_forward == 1  # samples never depend on batch companions
    with pytest.raises(ValueError, match="candidates_per_forward must be an integer >= 1"):
        GenerationScore(scorers, candidates_per_forward=0)


def _prompt_file(tmp_path, rows):
    import json

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _flag_bad(prompts, responses):
    """An indicator: 1 on prompts that mention 'bad', NaN (not counted) elsewhere."""
    return [1.0 if "bad" in p else math.nan for p in prompts]


def test_generation_score_reads_held_out_prompts_and_reports_indicators(setup, tmp_path):
    policy, dm = setup
    path = _prompt_file(
        tmp_path,
        [
            {"prompt": "train me?", "split": "train"},
            {"prompt": "a bad one?", "split": "val", "category": "sensitive"},
            {"prompt": "a good one?", "split": "val", "category": "benign"},
            {"prompt": "later?", "split": "test"},
        ],
    )
    scorers = {"helpful": LengthScorer(), "harmless": LengthScorer()}
    objective = GenerationScore(
        scorers, max_new_tokens=3, prompts_file=path, indicators={"flag": _flag_bad}
    )
    objective.validate(dm, VALUES)
    assert objective.prompts(dm, VALUES) == [
        "\n\nHuman: a bad one?\n\nAssistant:",
        "\n\nHuman: a good one?\n\nAssistant:",
    ]
    assert objective.for_split("test").prompts(dm, VALUES) == ["\n\nHuman: later?\n\nAssistant:"]
    (got,) = objective.score_many(policy, dm, VALUES, [{"helpful": 1.0}])
    assert got["flag"] == 1.0 and got.per_item["flag"][0] == 1.0
    assert math.isnan(got.per_item["flag"][1])
    with pytest.raises(ValueError, match="have the names of values"):
        GenerationScore(scorers, indicators={"helpful": _flag_bad})


def test_generation_score_refuses_held_out_prompts_that_were_trained_on(setup, tmp_path):
    _, dm = setup
    path = _prompt_file(tmp_path, [{"prompt": "item 100?", "split": "val"}])  # a train prompt
    objective = GenerationScore(
        {"helpful": LengthScorer(), "harmless": LengthScorer()}, prompts_file=path
    )
    with pytest.raises(ValueError, match=r"1 'val' prompts of .* are training prompts too"):
        objective.validate(dm, VALUES)


class AutocastProbe(LengthScorer):
    """Records whether CPU autocast was on when the scorer ran."""

    def __call__(self, prompts, responses):
        self.autocast = torch.is_autocast_enabled("cpu")
        return super().__call__(prompts, responses)


def test_scorers_judge_in_their_own_precision_under_a_mixed_precision_policy(setup):
    policy, dm = setup
    scorers = {"helpful": AutocastProbe(), "harmless": AutocastProbe()}
    objective = GenerationScore(scorers, num_prompts=2, max_new_tokens=3)
    with autocast("bf16-mixed", "cpu"):
        objective.score_many(policy, dm, VALUES, CANDIDATES[:2])
        assert torch.is_autocast_enabled("cpu")  # the policy's generation ran under it
    assert scorers["helpful"].autocast is False and scorers["harmless"].autocast is False
