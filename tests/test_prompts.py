"""Prompt files: the package's held-out sets, their checks, and the refusal candidates."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mva_lightning.data.prompts import (
    PACKAGE_PROMPTS,
    categories,
    load_prompts,
    read_prompts,
    resolve,
)
from mva_lightning.data.sources import DataError
from mva_lightning.labelling.sampled import REFUSALS, refusal_for
from mva_lightning.scorers.refusal import RefusalDetector


def test_package_prompts_hold_out_enough_disjoint_prompts():
    rows = read_prompts(PACKAGE_PROMPTS)
    count = Counter((r.split, r.category) for r in rows)
    assert count["test", "benign"] + count["test", "sensitive"] >= 60
    assert count["val", "benign"] + count["val", "sensitive"] >= 40
    for split in ("val", "test"):  # both behaviours measured on every held-out split
        assert count[split, "sensitive"] >= 20 and count[split, "benign"] >= 20
    by_split = {s: {r.prompt for r in rows if r.split == s} for s in ("train", "val", "test")}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    assert len({r.prompt for r in rows}) == len(rows)  # no prompt twice


def test_package_prompts_ship_with_the_licence_of_their_source():
    folder = resolve(PACKAGE_PROMPTS).rsplit("/", 1)[0]
    with open(f"{folder}/LICENSE-HH-RLHF", encoding="utf-8") as fh:
        assert fh.readline().strip() == "MIT License"


def test_rows_without_a_split_are_training_rows_and_filters_apply(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a?", "category": "benign"},
        {"prompt": "b?", "category": "sensitive", "split": "test"},
        {"prompt": "c?", "split": "val"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(path, split="train") == ["\n\nHuman: a?\n\nAssistant:"]
    assert load_prompts(path, category="sensitive") == ["\n\nHuman: b?\n\nAssistant:"]
    assert categories(path) == {
        "\n\nHuman: a?\n\nAssistant:": "benign",
        "\n\nHuman: b?\n\nAssistant:": "sensitive",
    }


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": ""}, r"p.jsonl, line 2: expected a non-empty string under 'prompt'"),
        ({"prompt": "x", "split": "dev"}, r"p.jsonl, line 2: split 'dev', expected one of"),
        ({"prompt": "x", "category": "rude"}, r"p.jsonl, line 2: category 'rude', expected"),
    ],
)
def test_bad_prompt_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_an_empty_selection_and_an_unknown_split_are_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no prompts \(split='test'"):
        read_prompts(path, split="test")
    with pytest.raises(DataError, match=r"prompt split 'dev': expected one of"):
        read_prompts(path, split="dev")


def test_refusal_candidates_are_refusals_and_fixed_per_prompt():
    detector = RefusalDetector()
    assert all(detector.refuses(r) for r in REFUSALS)
    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(40)]
    picks = [refusal_for(p) for p in prompts]
    assert picks == [refusal_for(p) for p in prompts]  # deterministic
    assert len(set(picks)) > 1  # not one template for every prompt
