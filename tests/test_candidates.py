"""Candidate preference vectors and the one rounding of a weight, against hand-made sets."""

from __future__ import annotations

import pytest

from mva_lightning.sweep.candidates import (
    build_candidates,
    candidate_set,
    explicit_candidates,
    grid_candidates,
    round_weight,
    simplex_candidates,
)
from mva_lightning.sweep.manifest import w_label


def test_grid_default_is_paper_grid():
    cands = grid_candidates(2)
    assert len(cands) == 100  # |S|^K = 10^2
    assert cands[0] == (0.1, 0.1)
    assert cands[1] == (0.1, 0.2)
    assert cands[-1] == (1.0, 1.0)
    s = sorted({w for c in cands for w in c})
    assert s == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # no 0.30000000000000004
    assert len(grid_candidates(3)) == 1000


def test_grid_extrapolation_and_explicit_values():
    cands = grid_candidates(2, start=-0.5, stop=1.5, step=0.5)
    s = [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert len(cands) == 25
    assert cands[0] == (-0.5, -0.5) and cands[-1] == (1.5, 1.5)
    assert sorted({w for c in cands for w in c}) == s
    assert all(str(w) != "-0.0" for c in cands for w in c)

    cands = grid_candidates(2, values=[-0.2, 1.3, 2.0])
    assert cands == [
        (-0.2, -0.2), (-0.2, 1.3), (-0.2, 2.0),
        (1.3, -0.2), (1.3, 1.3), (1.3, 2.0),
        (2.0, -0.2), (2.0, 1.3), (2.0, 2.0),
    ]  # fmt: skip
    assert grid_candidates(1, start=0.1, stop=1.5, step=0.1)[-1] == (1.5,)
    assert len(grid_candidates(1, start=0.1, stop=1.5, step=0.1)) == 15


def test_simplex_counts_and_order():
    k2 = simplex_candidates(2, 0.1)
    assert len(k2) == 11  # C(10 + 1, 1)
    assert k2[0] == (0.0, 1.0) and k2[-1] == (1.0, 0.0)
    assert (0.3, 0.7) in k2
    k3 = simplex_candidates(3, 0.1)
    assert len(k3) == 66  # C(10 + 2, 2)
    assert all(abs(sum(w) - 1.0) < 1e-12 and min(w) >= 0 for w in k3)
    assert len(set(k3)) == 66
    assert simplex_candidates(2, 0.5) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    with pytest.raises(ValueError, match="whole parts"):
        simplex_candidates(2, 0.3)


def test_explicit_and_build_modes():
    vecs = [[0.5, 1.5], [1, 0], [0.5, 1.5]]
    assert explicit_candidates(vecs, 2) == [(0.5, 1.5), (1.0, 0.0), (0.5, 1.5)]
    assert build_candidates("explicit", 2, vectors=vecs) == [(0.5, 1.5), (1.0, 0.0)]  # deduped
    assert build_candidates("simplex", 2, step=0.5) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert build_candidates("grid", 2) == grid_candidates(2)


def test_include_zero_goes_first_once():
    cands = build_candidates("grid", 2, include_zero=True)
    assert len(cands) == 101 and cands[0] == (0.0, 0.0)
    cands = build_candidates("grid", 2, values=[0.0, 1.0], include_zero=True)
    assert cands == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]  # zero not repeated
    cands = build_candidates("explicit", 3, vectors=[[1, 2, 3]], include_zero=True)
    assert cands == [(0.0, 0.0, 0.0), (1.0, 2.0, 3.0)]


def test_candidate_errors():
    with pytest.raises(ValueError, match="candidate set is empty"):
        build_candidates("grid", 2, start=1.0, stop=0.5)
    with pytest.raises(ValueError, match="candidate set is empty"):
        build_candidates("explicit", 2, vectors=[], include_zero=True)
    with pytest.raises(ValueError, match=r"\(0\.1, 0\.2, 0\.3\) has length 3, expected 2"):
        build_candidates("explicit", 2, vectors=[[1, 1], [0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="grid, simplex, explicit"):
        build_candidates("random", 2)
    with pytest.raises(ValueError, match="needs `vectors`"):
        build_candidates("explicit", 2)
    with pytest.raises(ValueError, match="step must be positive"):
        grid_candidates(2, step=0.0)


def test_candidate_set_from_config_or_list():
    assert candidate_set({"mode": "simplex", "step": 0.5, "values": None}, 2) == [
        (0.0, 1.0),
        (0.5, 0.5),
        (1.0, 0.0),
    ]
    assert candidate_set([[1, 0], [0.5, 0.5]], 2) == [(1.0, 0.0), (0.5, 0.5)]
    with pytest.raises(ValueError, match=r"extrapolation.candidates: unknown keys \['setp'\]"):
        candidate_set({"setp": 0.1}, 2)


def test_one_rounding_for_candidates_and_labels():
    assert round_weight(0.1 + 0.2) == 0.3 and str(round_weight(-0.0)) == "0.0"
    assert w_label([0.1 + 0.2, -0.0, 1.5]) == "w_0.3_0.0_1.5"
    assert w_label((-0.25, 2)) == "w_-0.25_2.0"
    assert w_label(grid_candidates(1, start=0.1, stop=0.3, step=0.1)[-1]) == "w_0.3"
