"""Scorer-labelled data: pairs re-ordered by a scorer (relabel) and its value config."""

from __future__ import annotations

import math

import pytest
from conftest import TableScorer, compose, write_hh_file

from mva_lightning.data.sources import DataError, PreferencePair
from mva_lightning.labelling.relabel import relabel_pairs, relabelled
from mva_lightning.scorers import ScorerError, Sentiment


def test_relabel_keeps_flips_and_drops_as_hand_computed(caplog):
    pairs = [
        PreferencePair("p1", "a", "b"),  # 3 vs 1: gap 2, kept
        PreferencePair("p2", "c", "d"),  # 1 vs 3: gap -2, flipped
        PreferencePair("p3", "e", "f"),  # 2 vs 2.05: |gap| 0.05 <= 0.1, dropped
        PreferencePair("p4", "g", "h"),  # 2.2 vs 2: gap 0.2 > 0.1, kept
    ]
    scorer = TableScorer({"a": 3, "b": 1, "c": 1, "d": 3, "e": 2, "f": 2.05, "g": 2.2, "h": 2})
    with caplog.at_level("INFO", logger="mva_lightning.labelling.relabel"):
        out = relabel_pairs(pairs, scorer, margin=0.1, chunk_size=3)
    assert out == [
        PreferencePair("p1", "a", "b"),
        PreferencePair("p2", "d", "c"),
        PreferencePair("p4", "g", "h"),
    ]
    assert "2 pairs kept as labelled, 1 flipped, 1 dropped of 4" in caplog.text
    # margin 0 keeps the near-tie, flipped (2.05 > 2).
    assert relabel_pairs(pairs[2:3], scorer)[0] == PreferencePair("p3", "f", "e")


def test_relabel_errors():
    pairs = [PreferencePair("p", "a", "b")]
    with pytest.raises(DataError, match="scorer 'table': no pair out of 1 .* margin=1"):
        relabel_pairs(pairs, TableScorer({"a": 1.5, "b": 1.0}), margin=1.0)
    with pytest.raises(ScorerError, match="scorer 'table' returned non-finite"):
        relabel_pairs(pairs, TableScorer({"a": math.nan, "b": 1.0}))

    class Short(TableScorer):
        def __call__(self, prompts, responses):
            return [1.0]

    with pytest.raises(ScorerError, match="scorer 'table' returned 1 scores for 2"):
        relabel_pairs(pairs, Short({}))
    with pytest.raises(DataError, match="margin should be >= 0"):
        relabel_pairs(pairs, TableScorer({}), margin=-1)


def test_relabelled_source_from_value_config(tmp_path):
    """conf/value/humor.yaml with the offline sentiment scorer swapped in, on a toy file."""
    from mva_lightning.assembly import load_value_splits

    # The sentiment scorer prefers the "rejected" (positive) side of every toy pair: all flip.
    data = write_hh_file(tmp_path / "h.jsonl.gz", 20, "This is awful and sad", "What a great day")
    cfg = compose(
        [
            "value=[humor]",
            "scorer@value.humor.scorer=sentiment",
            f"value.humor.source.source.files=[{data}]",
            f"paths.output_dir={tmp_path}",
        ]
    )
    splits = load_value_splits(cfg)["humor"]
    pairs = splits.train + splits.val + splits.test
    assert len(pairs) == 20
    assert all(p.chosen == "What a great day" for p in pairs)
    assert relabelled(lambda: pairs, Sentiment()) == pairs  # already ordered: all kept


def test_humor_value_defaults_to_the_hub_classifier():
    cfg = compose(["value=[humor]"])
    node = cfg.value.humor.source
    assert cfg.value.humor.scorer.name_or_path == "mohameddhiab/humor-no-humor"
    assert node.source.data_dir == "helpful-base" and node.source._partial_


def test_spread_keeps_evenly_spaced_items_in_order():
    from mva_lightning.labelling.sampled import spread

    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(3)), 5) == [0, 1, 2] and spread([1, 2], None) == [1, 2]


def test_scored_pairs_with_refusal_candidates_on_sensitive_prompts_only(tmp_path, monkeypatch):
    import json

    from mva_lightning.labelling import sampled

    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "How do I bake bread?", "category": "benign"},
        {"prompt": "How do I steal a car?", "category": "sensitive"},
        {"prompt": "Later?", "category": "sensitive", "split": "test"},  # held out: unused
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = ["Sure: take a wire and open the door.", "Just do it quietly at night."]
    seen = {}

    def fake_sampling(model_loader, prompts, *args, **kw):
        seen["prompts"] = list(prompts)
        return [list(answers) for _ in prompts]

    monkeypatch.setattr(sampled, "sample_responses", fake_sampling)
    scorer = {
        "_target_": "mva_lightning.scorers.profanity.Harmlessness",
        "prompts_file": str(path),
        "benign_refusal_penalty": 0.5,
    }
    kw = dict(prompts_file=str(path), cache_dir=str(tmp_path / "cache"), refusal_candidates=True)
    pairs = sampled.scored_pairs(scorer, {}, category="sensitive", **kw)
    assert len(seen["prompts"]) == 2  # the train rows are sampled, the test row is not
    assert [p.prompt for p in pairs] == ["\n\nHuman: How do I steal a car?\n\nAssistant:"]
    assert pairs[0].chosen == sampled.refusal_for(pairs[0].prompt)  # the refusal wins there
    everything = sampled.scored_pairs(scorer, {}, **kw)  # benign: the refusal loses
    bread = next(p for p in everything if "bread" in p.prompt)
    assert bread.rejected == sampled.refusal_for(bread.prompt)
