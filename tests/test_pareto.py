"""Pareto mask, hypervolume and plot, against hand-derived numbers."""

from __future__ import annotations

import numpy as np
import pytest

from mva_lightning.sweep.candidates import grid_candidates
from mva_lightning.sweep.pareto import hypervolume, labelled_points, pareto_mask, plot_front

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- Pareto mask ----------------------------------------------------------------------------


def test_pareto_mask_hand_made():
    pts = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [1, 0]])
    # (0.4, 0.4) is dominated by (0.5, 0.5); the duplicate (1, 0) is kept like its twin
    assert pareto_mask(pts).tolist() == [True, True, True, False, True]


def test_pareto_mask_weak_dominance_and_3d():
    # (1, 1) dominates (1, 0) (equal in x, better in y): dominance needs one strict improvement
    assert pareto_mask(np.array([[1, 0], [1, 1], [0, 2]])).tolist() == [False, True, True]
    pts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.0], [0.2, 0.2, 0.2], [1, 1, 1]])
    assert pareto_mask(pts).tolist() == [False] * 5 + [True]
    assert pareto_mask(pts[:5]).tolist() == [True] * 5  # nothing dominates another
    assert pareto_mask(np.zeros((0, 2))).tolist() == []


def test_pareto_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        pareto_mask(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="finite"):
        pareto_mask(np.array([[1.0, np.nan]]))


# --- hypervolume ----------------------------------------------------------------------------


def test_hypervolume_2d_staircase():
    # boxes [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1]: 3*1 + 2*1 + 1*1 = 6
    front = np.array([[1, 3], [2, 2], [3, 1]])
    assert hypervolume(front, [0, 0]) == pytest.approx(6.0)
    # reference (0.5, 0.5), by columns: x in (0.5, 1] has height 3 - 0.5, (1, 2] has 2 - 0.5,
    # (2, 3] has 1 - 0.5 -> 0.5 * 2.5 + 1 * 1.5 + 1 * 0.5 = 3.25
    assert hypervolume(front, [0.5, 0.5]) == pytest.approx(3.25)
    # dominated and duplicate points add nothing
    more = np.vstack([front, [[1, 1], [2, 2]]])
    assert hypervolume(more, [0, 0]) == pytest.approx(6.0)


def test_hypervolume_points_not_beyond_reference_add_nothing():
    front = np.array([[1, 3], [2, 2], [3, 1]])
    worse = np.array([[5, 0], [-1, 9], [0, 0]])  # equal to or below the reference somewhere
    assert hypervolume(np.vstack([front, worse]), [0, 0]) == pytest.approx(6.0)
    assert hypervolume(worse, [0, 0]) == 0.0
    assert hypervolume(np.zeros((0, 2)), [0, 0]) == 0.0


def test_hypervolume_3d():
    assert hypervolume(np.array([[1, 2, 3]]), [0, 0, 0]) == pytest.approx(6.0)
    # three 2x1x1 boxes along each axis: 3*2 - 3*1 (pairwise [0,1]^3) + 1 (triple) = 4
    pts = np.array([[2, 1, 1], [1, 2, 1], [1, 1, 2]])
    assert hypervolume(pts, [0, 0, 0]) == pytest.approx(4.0)
    assert hypervolume(pts, [1, 1, 0]) == pytest.approx(0.0)  # none strictly beyond in x and y


def test_hypervolume_errors():
    with pytest.raises(ValueError, match="reference has 3 dimensions but scores have 2"):
        hypervolume(np.array([[1, 2]]), [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume(np.array([[1, np.inf]]), [0, 0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume(np.array([[1, 2]]), [0, np.nan])


# --- plot -----------------------------------------------------------------------------------


def _assert_png(path, folder):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temp files left


def test_plot_front_two_objectives(tmp_path):
    cands = grid_candidates(2, values=[0.0, 0.5, 1.0])
    scores = np.array([[w1 - 0.3 * w2, w2 - 0.3 * w1] for w1, w2 in cands])
    mask = pareto_mask(scores)
    labels = [f"w=({a:g},{b:g})" for a, b in cands]
    extra = {"SOUP": scores[:3] - 0.1, "DPO-LW": scores[3:5] - 0.2}
    out = tmp_path / "plots" / "front.png"
    got = plot_front(
        scores, ["helpful", "harmless"], mask, labels, out,
        title="MVA", reference=[0, 0], extra_fronts=extra,
    )  # fmt: skip
    assert got == out
    _assert_png(out, out.parent)


def test_plot_front_three_objectives_overwrites(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(12, 3))
    out = tmp_path / "front3.png"
    out.write_bytes(b"old")
    plot_front(scores, ["a", "b", "c"], pareto_mask(scores), None, out, reference=[-3, -3, -3])
    _assert_png(out, tmp_path)


def test_plot_front_shape_errors(tmp_path):
    scores = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="names"):
        plot_front(scores, ["a"], np.array([True, True]), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="reference has 3 dimensions"):
        plot_front(scores, ["a", "b"], np.array([True, True]), None, tmp_path / "x.png",
                   reference=[0, 0, 0])  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_labelled_points_spread_along_the_front_and_keep_both_ends():
    x = np.linspace(0.0, 1.0, 30)
    scores = np.concatenate([np.stack([x, 1 - x], 1), [[0.1, 0.1]]])  # 30 on the front, 1 not
    mask = pareto_mask(scores)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(scores))  # the front's order is not the rows' order
    scores, mask = scores[order], mask[order]
    got = labelled_points(scores, mask, 5)
    assert len(got) == 5 and all(mask[got])
    spots = np.round(np.linspace(0, 29, 5))  # positions along the front: 0, 7, 14, 22, 29
    assert sorted(scores[got, 0].tolist()) == pytest.approx((spots / 29).tolist(), abs=1e-9)
    assert sorted(labelled_points(scores, mask, 40)) == np.flatnonzero(mask).tolist()  # all fit
    assert labelled_points(scores, mask, 0) == []
