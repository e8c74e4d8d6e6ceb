"""Bootstrap intervals: coverage, pairing, hand-computed resamples, manifests with and without."""

import json

import numpy as np
import pytest
import torch

from mva_lightning.sweep import bootstrap
from mva_lightning.sweep.bootstrap import Bootstrap
from mva_lightning.sweep.manifest import ExtrapolationResult
from mva_lightning.sweep.objectives import pair_credit


def test_interval_covers_a_known_mean_at_about_its_nominal_rate():
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for t in range(trials):
        items = rng.normal(loc=2.0, scale=1.0, size=(1, 40))  # true mean 2.0
        boot = Bootstrap(resamples=400, seed=t)
        counts = boot.counts({"v": 40}, shared=False)["v"]
        lo, hi = boot.interval(bootstrap.resampled_means(items, counts)[0])
        covered += lo <= 2.0 <= hi
    # percentile intervals at n = 40 run slightly narrow; 95 % nominal
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_resampled_means_are_the_means_of_the_drawn_items():
    items = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])  # (C=2, n=4)
    counts = np.array([[4, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, 2]])  # (B=3, n)
    means = bootstrap.resampled_means(items, counts)  # (C, B)
    assert means.tolist() == [[1.0, 2.5, 3.5], [0.0, 0.5, 1.0]]
    drawn = Bootstrap(resamples=50, seed=1).counts({"a": 7, "b": 3}, shared=False)
    assert drawn["a"].shape == (50, 7) and (drawn["a"].sum(1) == 7).all()
    assert (drawn["b"].sum(1) == 3).all()


def test_shared_items_are_drawn_once_for_every_value_and_seeded():
    boot = Bootstrap(resamples=20, seed=3)
    shared = boot.counts({"a": 5, "b": 5}, shared=True)
    assert np.array_equal(shared["a"], shared["b"])
    again = Bootstrap(resamples=20, seed=3).counts({"a": 5, "b": 5}, shared=True)
    assert np.array_equal(shared["a"], again["a"])
    apart = boot.counts({"a": 5, "b": 5}, shared=False)
    assert not np.array_equal(apart["a"], apart["b"])
    with pytest.raises(ValueError, match="one count for every value"):
        boot.counts({"a": 5, "b": 6}, shared=True)


def test_paired_difference_of_identical_fronts_is_zero_with_zero_width():
    rng = np.random.default_rng(0)
    items = {v: rng.uniform(size=(4, 30)) for v in ("a", "b")}  # base + 3 candidates
    boot = Bootstrap(resamples=200, seed=0)
    counts = boot.counts({"a": 30, "b": 30}, shared=True)
    scores = bootstrap.resampled_scores(items, counts, ["a", "b"])  # (B, C, K)
    assert scores.shape == (200, 4, 2)
    one = bootstrap.hypervolumes(scores, [1, 2, 3])
    other = bootstrap.hypervolumes(scores.copy(), [1, 2, 3])  # the same front, same prompts
    assert boot.interval(one - other) == [0.0, 0.0]
    assert boot.interval(one)[0] <= boot.interval(one)[1]


def test_hypervolume_of_each_resample_against_its_own_base():
    # one resample, base (0.5, 0.5), candidates (1, 0.5) and (0.5, 1): two 0.5 x 0 boxes -> 0,
    # and (1, 1) -> 0.25
    scores = np.array([[[0.5, 0.5], [1.0, 0.5], [0.5, 1.0], [1.0, 1.0]]])
    assert bootstrap.hypervolumes(scores, [1, 2]).tolist() == [0.0]
    assert bootstrap.hypervolumes(scores, [1, 2, 3]).tolist() == [0.25]
    assert bootstrap.hypervolumes(scores, [3], reference=[0.0, 0.0]).tolist() == [1.0]


def test_ties_count_half():
    credit = pair_credit(torch.tensor([0.3, 0.0, -2.0, 0.0]))
    assert credit.tolist() == [1.0, 0.5, 0.0, 0.5]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="bootstrap.resamples"):
        Bootstrap(resamples=-1)
    with pytest.raises(ValueError, match="bootstrap.level"):
        Bootstrap(level=1.5)


def _manifest() -> dict:
    result = ExtrapolationResult(
        values=["a", "b"],
        weights=[(1.0, 0.0), (0.0, 1.0)],
        scores=[{"a": 0.8, "b": 0.4}, {"a": 0.3, "b": 0.9}],
        on_front=[True, True],
        checkpoints=["x", "y"],
        report=[{}, {}],
        base_scores={"a": 0.5, "b": 0.5},
        reference_point=[0.5, 0.5],
        hypervolume=0.1,
        fingerprint="f",
        intervals=[
            {"a/ci": [0.7, 0.9], "a/n": 40, "b/ci": [0.3, 0.5], "b/n": 40},
            {"a/ci": [0.2, 0.4], "a/n": 40, "b/ci": [0.8, 1.0], "b/n": 40},
        ],
        hypervolume_ci=[0.05, 0.15],
        bootstrap={"resamples": 1000, "level": 0.95, "seed": 0},
    )
    return json.loads(json.dumps(result.to_json()))


def test_manifest_rows_carry_intervals_and_read_back():
    data = _manifest()
    assert data["rows"][0]["a/ci"] == [0.7, 0.9] and data["rows"][1]["b/n"] == 40
    assert data["hypervolume_ci"] == [0.05, 0.15]
    back = ExtrapolationResult.from_json(data)
    assert back.intervals[1]["a/ci"] == [0.2, 0.4] and back.scores[1] == {"a": 0.3, "b": 0.9}
    assert back.metrics()["pareto/hypervolume_low"] == 0.05


def test_manifest_without_intervals_still_loads():
    data = _manifest()
    for key in ("hypervolume_ci", "bootstrap", "improvement"):
        data.pop(key)
    for row in data["rows"]:
        for col in [c for c in row if c.endswith(("/ci", "/n"))]:
            row.pop(col)
    old = ExtrapolationResult.from_json(data)  # a manifest written before intervals existed
    assert old.intervals == [] and old.hypervolume_ci is None and old.bootstrap is None
    assert old.scores[0] == {"a": 0.8, "b": 0.4} and "pareto/hypervolume_low" not in old.metrics()


def test_resampled_rates_count_only_the_items_that_count():
    from mva_lightning.sweep.bootstrap import resampled_rates

    items = np.array([[1.0, np.nan, 0.0, 1.0], [0.0, 0.5, np.nan, np.nan]])
    counts = np.array([[1, 1, 1, 1], [0, 2, 0, 2], [0, 4, 0, 0]])
    got = resampled_rates(items, counts)
    # row 0: (1 + 0 + 1) / 3; (2 * 1) / 2; nothing counted -> NaN
    assert got[0, 0] == pytest.approx(2 / 3) and got[0, 1] == 1.0 and np.isnan(got[0, 2])
    # row 1: (0 + 0.5) / 2; 0.5 drawn twice / 2; 0.5 four times / 4
    assert got[1].tolist() == pytest.approx([0.25, 0.5, 0.5])
