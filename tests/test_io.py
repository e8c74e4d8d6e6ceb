"""Atomic writes and the one fingerprint of cache keys."""

import hashlib
import json

from mva_lightning.io import fingerprint, write_json


def test_fingerprint_is_the_sha256_of_sorted_json():
    obj = {"b": [1, 2.5, None], "a": {"z": "x", "y": object}}
    text = json.dumps(obj, sort_keys=True, default=str)
    assert fingerprint(obj) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})  # key order: none
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    # the labelling cache's key, as it was spelled before the sweep and it shared this function
    spelled = b'{"prompts": ["p"], "responses": ["r"], "scorer": "table"}'
    key = fingerprint({"scorer": "table", "prompts": ["p"], "responses": ["r"]})
    assert key == hashlib.sha256(spelled).hexdigest()[:16]


def test_write_json_is_atomic(tmp_path):
    write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]  # no temporary left
