"""Tests for mva_lightning.data.sources: real HH-RLHF / PKU rows and hand-made tiny inputs."""

from __future__ import annotations

import gzip
import json
import logging
import sys
import types
from pathlib import Path

import pytest
from conftest import TEST_DATA, real_data_file

from mva_lightning.data.sources import (
    DataError,
    PreferencePair,
    clean_pairs,
    hh_rlhf,
    hub_pairs,
    jsonl_pairs,
    pku_saferlhf,
    read_jsonl,
    split_pairs,
    split_transcript,
)

HH = TEST_DATA / "hh-rlhf"
A = "\n\nAssistant:"


def _write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pair(p: str = "\n\nHuman: hi\n\nAssistant:", c: str = "a", r: str = "b") -> PreferencePair:
    return PreferencePair(p, c, r)


# ----------------------------------------------------------------------------- HH parser


def test_split_transcript_multi_turn():
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    prompt, chosen, rejected = split_transcript(prefix + " fine, thanks ", prefix + " go away")
    assert (prompt, chosen, rejected) == (prefix, "fine, thanks", "go away")


def test_split_transcript_extra_marker_in_final_turn():
    # The chosen final turn holds a second "\n\nAssistant:": fall back to the common prefix.
    chosen = "\n\nHuman: cost?\n\nAssistant: Umm. Wait...\n\nAssistant: About $50."
    rejected = "\n\nHuman: cost?\n\nAssistant: Look it up."
    prompt, c, r = split_transcript(chosen, rejected)
    assert prompt == "\n\nHuman: cost?\n\nAssistant:"
    assert (c, r) == ("Umm. Wait...\n\nAssistant: About $50.", "Look it up.")


def test_split_transcript_without_marker():
    with pytest.raises(DataError, match="Assistant"):
        split_transcript("\n\nHuman: a", "\n\nHuman: b")


@pytest.fixture(scope="module")
def helpful() -> list[PreferencePair]:
    return hh_rlhf(files=[real_data_file("hh-rlhf", "helpful-base-test.jsonl.gz")])


@pytest.mark.parametrize("name", ["helpful-base", "harmless-base"])
def test_hh_real_rows(name):
    path = real_data_file("hh-rlhf", f"{name}-test.jsonl.gz")
    pairs = hh_rlhf(files=[path])
    n_rows = sum(1 for _ in read_jsonl(path))
    assert 0 < n_rows - len(pairs) < 20
    for p in pairs:
        assert p.prompt.endswith(A)
        assert p.prompt.startswith("\n\nHuman:")
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert p.chosen == p.chosen.strip()
    multi = [p for p in pairs if p.prompt.count("\n\nHuman:") >= 3]
    assert multi, "expected multi-turn transcripts"


def test_hh_drops_identical_rows(helpful, caplog):
    path = HH / "helpful-base-test.jsonl.gz"
    with caplog.at_level(logging.INFO, logger="mva_lightning.data.sources"):
        pairs = hh_rlhf(files=[path])
    assert pairs == helpful
    assert "2 with identical responses" in caplog.text
    raw = [o for _, o in read_jsonl(path)]
    assert sum(o["chosen"] == o["rejected"] for o in raw) == 2


def test_hh_first_row_and_max_rows(helpful):
    path = HH / "helpful-base-test.jsonl.gz"
    first = next(read_jsonl(path))[1]
    few = hh_rlhf(files=[str(HH / "helpful-*-test.jsonl.gz")], max_rows=5)
    assert len(few) <= 5 and few[0] == helpful[0]
    assert few[0].prompt + " " + few[0].chosen == first["chosen"]


# ----------------------------------------------------------------------------- PKU


@pytest.mark.parametrize(
    "label, key", [("better", "better_response_id"), ("safer", "safer_response_id")]
)
def test_pku_labels(label, key):
    path = real_data_file("pku-saferlhf", "sample-17.jsonl")
    rows = [o for _, o in read_jsonl(path)]
    pairs = pku_saferlhf(files=[path], label=label)
    assert len(pairs) == len(rows) == 17
    for o, p in zip(rows, pairs, strict=True):
        best = o[key]
        assert p.prompt == f"\n\nHuman: {o['prompt'].strip()}{A}"
        assert p.chosen == o[f"response_{best}"].strip()
        assert p.rejected == o[f"response_{1 - best}"].strip()


def test_pku_labels_swap_where_ids_differ():
    path = real_data_file("pku-saferlhf", "sample-17.jsonl")
    rows = [o for _, o in read_jsonl(path)]
    better, safer = pku_saferlhf(files=[path]), pku_saferlhf(files=[path], label="safer")
    differ = [i for i, o in enumerate(rows) if o["better_response_id"] != o["safer_response_id"]]
    assert differ
    for i in range(len(rows)):
        if i in differ:
            assert (better[i].chosen, better[i].rejected) == (safer[i].rejected, safer[i].chosen)
        else:
            assert better[i] == safer[i]


def test_pku_tiny_and_unknown_label(tmp_path):
    row = {"prompt": " Why? ", "response_0": "A", "response_1": "B"}
    path = _write(
        tmp_path / "p.jsonl",
        [row | {"better_response_id": 1, "safer_response_id": 0}],
    )
    assert pku_saferlhf(files=[path]) == [PreferencePair("\n\nHuman: Why?\n\nAssistant:", "B", "A")]
    assert pku_saferlhf(files=[path], label="safer")[0].chosen == "A"
    with pytest.raises(DataError, match="label.*'kinder'"):
        pku_saferlhf(files=[path], label="kinder")
    bad = _write(tmp_path / "bad.jsonl", [row | {"better_response_id": 2}])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: key 'better_response_id'"):
        pku_saferlhf(files=[bad])


# ----------------------------------------------------------------------------- malformed input


def test_missing_key_names_file_line_and_key(tmp_path):
    path = _write(
        tmp_path / "hh.jsonl", [{"chosen": f"{A} a", "rejected": f"{A} b"}, {"chosen": "x"}]
    )
    with pytest.raises(DataError) as err:
        hh_rlhf(files=[path])
    msg = str(err.value)
    assert "hh.jsonl" in msg and "line 2" in msg and "'rejected'" in msg


def test_non_string_value(tmp_path):
    path = _write(tmp_path / "g.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    with pytest.raises(DataError, match=r"g\.jsonl, line 1: key 'chosen' should hold a string"):
        jsonl_pairs([path])


def test_empty_responses_dropped_with_count(tmp_path, caplog):
    rows = [
        {"chosen": f"\n\nHuman: q{A} good", "rejected": f"\n\nHuman: q{A} bad"},
        {"chosen": f"\n\nHuman: q{A}  ", "rejected": f"\n\nHuman: q{A} bad"},
        {"chosen": f"\n\nHuman: q{A} same", "rejected": f"\n\nHuman: q{A} same"},
    ]
    path = _write(tmp_path / "hh.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="mva_lightning.data.sources"):
        pairs = hh_rlhf(files=[path])
    assert pairs == [PreferencePair(f"\n\nHuman: q{A}", "good", "bad")]
    assert "kept 1 of 3" in caplog.text
    assert "dropped 1 with an empty prompt or response, 1 with identical" in caplog.text


def test_nothing_left_is_an_error():
    with pytest.raises(DataError, match="no preference pairs left"):
        clean_pairs([_pair(c="x", r="x"), _pair(p=" ")], "tiny")


def test_non_json_line(tmp_path):
    row = {"chosen": f"\n\nHuman: q{A} a", "rejected": f"\n\nHuman: q{A} b"}
    path = _write(tmp_path / "hh.jsonl", [row, "", "{not json"])
    with pytest.raises(DataError, match=r"hh\.jsonl, line 3: not valid JSON"):
        hh_rlhf(files=[path])


def test_a_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "q", "x": 1}']
    path.write_bytes("\ufeff".encode() + "\n".join(rows).encode())  # as Windows editors save
    assert [obj for _, obj in read_jsonl(path)][0] == {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
    }
    inner = tmp_path / "inner.jsonl"  # a byte-order mark inside the file is still an error
    inner.write_bytes(rows[0].encode() + b"\n" + "\ufeff".encode() + rows[1].encode())
    with pytest.raises(DataError, match=r"inner\.jsonl, line 2: not valid JSON"):
        list(read_jsonl(inner))


def test_non_object_line(tmp_path):
    path = _write(tmp_path / "x.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_blank_lines_and_gzip(tmp_path):
    path = tmp_path / "g.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('\n{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n')
    assert list(read_jsonl(path)) == [(2, {"prompt": "p", "chosen": "c", "rejected": "r"})]
    assert jsonl_pairs([path]) == [PreferencePair("p", "c", "r")]


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        hh_rlhf(files=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match="matches no file"):
        jsonl_pairs([str(tmp_path / "*.jsonl")])


def test_jsonl_pairs_custom_keys_and_glob(tmp_path):
    _write(tmp_path / "b.jsonl", [{"q": "p2", "good": "c2", "bad": "r2"}])
    _write(tmp_path / "a.jsonl", [{"q": "p1", "good": "c1", "bad": "r1"}])
    pairs = jsonl_pairs(
        str(tmp_path / "*.jsonl"), prompt_key="q", chosen_key="good", rejected_key="bad"
    )
    assert pairs == [PreferencePair("p1", "c1", "r1"), PreferencePair("p2", "c2", "r2")]
    assert (
        len(
            jsonl_pairs(
                [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], "q", "good", "bad", max_rows=1
            )
        )
        == 1
    )


# ----------------------------------------------------------------------------- hub (faked)


def _fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hub_pairs_with_fake_datasets(monkeypatch):
    calls = []

    def load(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}]

    _fake_datasets(monkeypatch, load)
    assert hub_pairs("me/prefs", max_rows=1) == [PreferencePair("p", "c", "r")]
    assert calls == [("me/prefs", None, "train")]
    with pytest.raises(DataError, match=r"me/prefs\[train\], line 2: missing key 'rejected'"):
        hub_pairs("me/prefs")


def test_hub_unreachable(monkeypatch):
    def load(*args, **kwargs):
        raise ConnectionError("offline")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(DataError, match=r"unreachable.*files=\["):
        hh_rlhf(data_dir="harmless-base")


def test_hh_hub_rows(monkeypatch):
    row = {"chosen": f"\n\nHuman: q{A} yes", "rejected": f"\n\nHuman: q{A} no"}
    _fake_datasets(monkeypatch, lambda name, data_dir=None, split=None: [row])
    assert hh_rlhf() == [PreferencePair(f"\n\nHuman: q{A}", "yes", "no")]


# ----------------------------------------------------------------------------- splits


def test_split_pairs_sizes_disjoint_deterministic():
    pairs = [_pair(c=f"c{i}") for i in range(200)]
    s = split_pairs(pairs)
    assert (len(s.train), len(s.val), len(s.test)) == (188, 2, 10)
    ids = [p.chosen for p in s.train + s.val + s.test]
    assert sorted(ids) == sorted(p.chosen for p in pairs) and len(set(ids)) == 200
    assert split_pairs(pairs) == s
    assert split_pairs(pairs, seed=61) != s


def test_split_pairs_minimum_one_each():
    pairs = [_pair(c=f"c{i}") for i in range(3)]
    s = split_pairs(pairs)
    assert (len(s.train), len(s.val), len(s.test)) == (1, 1, 1)
    s = split_pairs([_pair(c=f"c{i}") for i in range(10)], test=0.2, val=0.0)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 0, 2)


@pytest.mark.parametrize("test, val", [(-0.1, 0.0), (1.0, 0.0), (0.0, 1.5), (0.6, 0.4)])
def test_split_pairs_bad_fractions(test, val):
    with pytest.raises(DataError):
        split_pairs([_pair(c=f"c{i}") for i in range(10)], test=test, val=val)


def test_split_pairs_no_train_left():
    with pytest.raises(DataError, match="no training pair"):
        split_pairs([_pair(), _pair(c="z")], test=0.5, val=0.4)
    with pytest.raises(DataError, match="no pairs"):
        split_pairs([])


def test_split_by_prompt_is_consistent_across_values():
    prompts = [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(400)]
    a = [PreferencePair(p, "x", "y") for p in prompts]
    b = [PreferencePair(p, "u", "v") for p in prompts[::2]]  # another value, fewer prompts
    sa = split_pairs(a, test=0.1, val=0.1, seed=3, by_prompt=True)
    sb = split_pairs(b, test=0.1, val=0.1, seed=3, by_prompt=True)
    for name in ("train", "val", "test"):
        pa = {p.prompt for p in getattr(sa, name)}
        pb = {p.prompt for p in getattr(sb, name)}
        assert pb <= pa  # a prompt is in the same split for both values
    assert 20 <= len(sa.test) <= 60 and 20 <= len(sa.val) <= 60
    assert len(sa.train) + len(sa.val) + len(sa.test) == 400


# ----------------------------------------------------------------------------- on_bad_row

HH_ROW = {"chosen": f"\n\nHuman: q{A} good", "rejected": f"\n\nHuman: q{A} bad"}
PKU_ROW = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0}
JSONL_ROW = {"prompt": "p", "chosen": "c", "rejected": "r"}


def _bad_rows(tmp_path, good, bad, name="mixed.jsonl"):
    """A file of 6 good rows with the 3 ``bad`` ones at lines 2, 5 and 7."""
    rows = [good] * 6
    for lineno, row in zip((2, 5, 7), bad, strict=True):
        rows.insert(lineno - 1, row)
    return _write(tmp_path / name, rows)


SOURCES = {
    "hh_rlhf": (
        lambda files, **kw: hh_rlhf(files=files, **kw),
        HH_ROW,
        ["{not json", {"chosen": f"{A} x"}, {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}],
        [
            "1 x not valid JSON, line 2",
            "1 x missing key 'rejected', line 5",
            "1 x no shared prompt ending at 'Assistant:', line 7",
        ],
    ),
    "pku_saferlhf": (
        lambda files, **kw: pku_saferlhf(files=files, **kw),
        PKU_ROW,
        [PKU_ROW | {"better_response_id": 2}, "[1, 2]", PKU_ROW | {"better_response_id": 5}],
        ["2 x key 'better_response_id' not 0 or 1, lines 2, 7", "1 x not a JSON object, line 5"],
    ),
    "jsonl_pairs": (
        lambda files, **kw: jsonl_pairs(files, **kw),
        JSONL_ROW,
        [{"prompt": "p", "chosen": 3, "rejected": "r"}, {"prompt": "p"}, {"prompt": "p"}],
        ["2 x missing key 'chosen', lines 5, 7", "1 x key 'chosen' not a string, line 2"],
    ),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_on_bad_row_skip_counts_and_logs_the_bad_rows(source, tmp_path, caplog):
    load, good, bad, reasons = SOURCES[source]
    path = _bad_rows(tmp_path, good, bad)
    with caplog.at_level(logging.WARNING, logger="mva_lightning.data.sources"):
        pairs = load([path], on_bad_row="skip")
    assert len(pairs) == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert text.startswith(f"{path}: skipped 3 of 9 rows (")
    for reason in reasons:
        assert reason in text


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_on_bad_row_error_raises_at_the_first_bad_row(source, tmp_path):
    load, good, bad, _ = SOURCES[source]
    path = _bad_rows(tmp_path, good, bad)
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: "):
        load([path])
    with pytest.raises(DataError, match=r"mixed\.jsonl, line 2: "):
        load([path], on_bad_row="error")


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_on_bad_row_unknown_value(source, tmp_path):
    load, good, _, _ = SOURCES[source]
    path = _write(tmp_path / "ok.jsonl", [good])
    with pytest.raises(DataError, match=r"on_bad_row should be one of 'error', 'skip', got 'drop'"):
        load([path], on_bad_row="drop")


def test_on_bad_row_skip_all_bad_and_unreadable_files(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", ["{", {"chosen": "x"}])
    with pytest.raises(DataError, match=r"hh-rlhf: no preference pairs: all 2 of 2 rows"):
        hh_rlhf(files=[bad], on_bad_row="skip")
    with pytest.raises(DataError, match=r"nope\.jsonl: does not exist"):
        hh_rlhf(files=[bad, tmp_path / "nope.jsonl"], on_bad_row="skip")
    not_gzip = tmp_path / "fake.jsonl.gz"
    not_gzip.write_text(json.dumps(JSONL_ROW) + "\n")
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz, line 1: cannot read the file"):
        jsonl_pairs([not_gzip], on_bad_row="skip")


def test_on_bad_row_skip_lists_the_first_lines_per_file(tmp_path, caplog):
    a = _write(tmp_path / "a.jsonl", [JSONL_ROW, *["{"] * 7])
    b = tmp_path / "b.jsonl.gz"
    with gzip.open(b, "wb") as f:
        f.write(json.dumps(JSONL_ROW).encode() + b"\n\xff\xfe\n")
    with caplog.at_level(logging.WARNING, logger="mva_lightning.data.sources"):
        pairs = jsonl_pairs([a, b], on_bad_row="skip")
    assert len(pairs) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{a}: skipped 7 of 8 rows (7 x not valid JSON, lines 2, 3, 4, 5, 6, ...)",
        f"{b}: skipped 1 of 2 rows (1 x not UTF-8, line 2)",
    ]


def test_on_bad_row_skip_on_hub_rows(monkeypatch, caplog):
    rows = [JSONL_ROW, {"prompt": "p", "chosen": "c"}]
    _fake_datasets(monkeypatch, lambda name, data_dir=None, split=None: rows)
    with caplog.at_level(logging.WARNING, logger="mva_lightning.data.sources"):
        assert hub_pairs("me/prefs", on_bad_row="skip") == [PreferencePair("p", "c", "r")]
    assert (
        "me/prefs[train]: skipped 1 of 2 rows (1 x missing key 'rejected', line 2)" in caplog.text
    )
