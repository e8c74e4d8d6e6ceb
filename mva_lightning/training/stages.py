"""Training stages: which value vectors train when, inside one ``Trainer.fit`` (docs/method.md §3).

A run is one fit. Its stages come from the schedule: ``sequential`` (the paper) trains one value
per stage, theta_k with theta_1..theta_{k-1} frozen; ``joint`` trains every value in one stage.
Each stage lasts ``epochs`` epochs (and at most ``steps`` optimizer steps, when set), so the
Trainer runs ``epochs * len(stages)`` epochs in all and the module switches the trained value
vector at the boundaries (:meth:`StagePlan.stage_done`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULES = ("sequential", "joint")


def stages_for(values: Sequence[str], schedule: str) -> list[list[str]]:
    """Values trained in each stage: one per stage (sequential) or all at once (joint)."""
    if schedule == "sequential":
        return [[v] for v in values]
    if schedule == "joint":
        return [list(values)]
    raise ValueError(f"train.schedule: expected one of {SCHEDULES}, got {schedule!r}")


def mi_pairs(values: Sequence[str], stage: Sequence[str]) -> list[tuple[str, str]]:
    """(trainable i, other j) pairs penalised in a stage.

    Sequential: (v_k, v_j) for every earlier value j. Joint: every unordered pair (i < j).
    """
    if len(stage) == 1:
        k = values.index(stage[0])
        return [(stage[0], values[j]) for j in range(k)]
    return [(stage[a], stage[b]) for a in range(len(stage)) for b in range(a + 1, len(stage))]


@dataclass(frozen=True)
class StagePlan:
    """The stages of one fit and how long each lasts.

    Attributes:
        stages: Values trained in each stage, in order.
        epochs: Epochs per stage (``trainer.max_epochs`` in the config counts per stage).
        steps: Optimizer steps per stage at most (``trainer.max_steps``; -1: no limit).
    """

    stages: list[list[str]]
    epochs: int = 1
    steps: int = -1

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a training plan needs at least one stage")
        if self.epochs < 1:
            raise ValueError(f"trainer.max_epochs must be >= 1 per stage, got {self.epochs}")

    @property
    def max_epochs(self) -> int:
        """Epochs of the whole fit."""
        return self.epochs * len(self.stages)

    @property
    def max_steps(self) -> int:
        """Optimizer steps of the whole fit (-1: bounded by the epochs only)."""
        return self.steps * len(self.stages) if self.steps > 0 else -1

    def step_limit_reached(self, steps_in_stage: int) -> bool:
        """Whether the stage has taken its ``steps`` (the rest of its epochs is skipped)."""
        return self.steps > 0 and steps_in_stage >= self.steps

    def stage_done(self, epochs_in_stage: int, steps_in_stage: int) -> bool:
        """Whether a stage that has finished ``epochs_in_stage`` epochs is over."""
        return epochs_in_stage >= self.epochs or self.step_limit_reached(steps_in_stage)
