"""Training stages: schedules, penalised pairs, and the plan of one fit."""

import pytest

from mva_lightning.training.stages import StagePlan, mi_pairs, stages_for


def test_schedule_stages_and_pairs():
    assert stages_for(["a", "b", "c"], "sequential") == [["a"], ["b"], ["c"]]
    assert stages_for(["a", "b", "c"], "joint") == [["a", "b", "c"]]
    assert mi_pairs(["a", "b", "c"], ["c"]) == [("c", "a"), ("c", "b")]
    assert mi_pairs(["a", "b", "c"], ["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(ValueError, match="train.schedule"):
        stages_for(["a"], "zigzag")


def test_plan_counts_epochs_and_steps_per_stage():
    plan = StagePlan([["a"], ["b"], ["c"]], epochs=2)
    assert (plan.max_epochs, plan.max_steps) == (6, -1)
    assert not plan.stage_done(epochs_in_stage=1, steps_in_stage=100)  # no step limit
    assert plan.stage_done(epochs_in_stage=2, steps_in_stage=3)
    capped = StagePlan([["a"], ["b"]], epochs=3, steps=5)
    assert (capped.max_epochs, capped.max_steps) == (6, 10)
    assert not capped.step_limit_reached(4) and capped.step_limit_reached(5)
    assert capped.stage_done(epochs_in_stage=1, steps_in_stage=5)  # cut short by its steps
    assert not capped.stage_done(epochs_in_stage=1, steps_in_stage=4)


def test_plan_rejects_empty_and_zero_epochs():
    with pytest.raises(ValueError, match="at least one stage"):
        StagePlan([])
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        StagePlan([["a"]], epochs=0)
