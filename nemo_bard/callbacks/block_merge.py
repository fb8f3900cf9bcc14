"""Progressive Block Merging schedule (docs/method.md §7): block size 4 -> 8 -> 16 -> 32 in one run.

At each stage boundary the callback exports the finished stage as an HF ``bard_vl`` directory
(``<checkpoint_dir>/stages/b4`` ...; usable with ``from_pretrained`` and as the SWD teacher; written
under a temporary name and renamed into place with a completion marker, which resume checks),
optionally resets the LR schedule (warm-up and decay restart, decay over the new stage's steps) and
the optimizer state, switches the layout's block size and logs the switch. The block size of any
step is a pure function of the step index, so resuming a checkpoint taken mid-stage restores it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_bard.callbacks.base import BardCallback
from nemo_bard.errors import UserError
from nemo_bard.rundir import is_complete

logger = logging.getLogger(__name__)


class ScheduleError(UserError):
    """An invalid ``block_merge.schedule``; the message names the entry and the fix."""


@dataclass(frozen=True)
class Stage:
    block_size: int
    steps: int
    start: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def parse_schedule(schedule: list[dict], max_steps: int | None = None) -> list[Stage]:
    """Validate a schedule: growing block sizes that divide each other, positive steps summing to max_steps."""
    if not schedule:
        raise ScheduleError("block_merge.schedule is empty; give e.g. [{block_size: 4, steps: 100}, ...]")
    stages, start = [], 0
    for i, entry in enumerate(schedule):
        try:
            b, n = int(entry["block_size"]), int(entry["steps"])
        except (KeyError, TypeError, ValueError):
            raise ScheduleError(
                f"block_merge.schedule[{i}]={entry!r}: each entry needs integer 'block_size' and 'steps'"
            ) from None
        if b < 1 or n < 1:
            raise ScheduleError(f"block_merge.schedule[{i}]: block_size and steps must be >= 1, got {entry!r}")
        if stages:
            prev = stages[-1].block_size
            if b <= prev:
                raise ScheduleError(
                    f"block_merge.schedule[{i}]: block sizes must grow (got {prev} then {b}); e.g. 4 -> 8 -> 16 -> 32"
                )
            if b % prev:
                raise ScheduleError(
                    f"block_merge.schedule[{i}]: block size {b} is not a multiple of the previous {prev}; "
                    "each block must merge whole smaller blocks"
                )
        stages.append(Stage(b, n, start))
        start += n
    if max_steps is not None and start != max_steps:
        raise ScheduleError(
            f"block_merge.schedule steps sum to {start} but step_scheduler.max_steps={max_steps}; make them equal"
        )
    return stages


class BlockMergeCallback(BardCallback):
    """Switch the training block size on a step schedule and export each finished stage.

    Args:
        schedule: ``[{block_size: 4, steps: 2000}, {block_size: 8, steps: 1000}, ...]``.
        reset_lr_schedule: restart warm-up/decay at each boundary (decay over the new stage's steps).
        reset_optimizer: clear optimizer moments at each boundary.
        export_stages: write ``<checkpoint_dir>/stages/b{B}`` when a stage finishes.
        export_dir: override the stage export root.
        max_steps: ``step_scheduler.max_steps``, which the schedule's steps must sum to (unchecked when None).
    """

    def __init__(
        self,
        schedule: list[dict],
        reset_lr_schedule: bool = False,
        reset_optimizer: bool = False,
        export_stages: bool = True,
        export_dir: str | None = None,
        max_steps: int | None = None,
    ) -> None:
        self.stages = parse_schedule(schedule, max_steps)
        self.reset_lr_schedule = reset_lr_schedule
        self.reset_optimizer = reset_optimizer
        self.export_stages = export_stages
        self.export_dir = export_dir
        self.switches: list[tuple[int, int, int]] = []  # (step, old B, new B), for logs and tests

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_index(self, step: int) -> int:
        """Stage that trains step ``step`` (the last stage for steps past the schedule)."""
        for i, s in enumerate(self.stages):
            if step < s.end:
                return i
        return len(self.stages) - 1

    def block_size_at(self, step: int) -> int:
        return self.stages[self.stage_index(step)].block_size

    def stage_dir(self, recipe: Any, stage: Stage) -> Path:
        root = Path(self.export_dir) if self.export_dir else Path(recipe.checkpoint_root) / "stages"
        return root / f"b{stage.block_size}"

    def _export(self, recipe: Any, stage: Stage) -> None:
        if self.export_stages:
            path = recipe.export_model(self.stage_dir(recipe, stage), block_size=stage.block_size)
            logger.info("[block_merge] exported stage B=%d (steps %d-%d) to %s",
                        stage.block_size, stage.start, stage.end - 1, path)

    def _apply_stage(self, recipe: Any, idx: int, step: int) -> None:
        stage = self.stages[idx]
        old = recipe.block_size
        recipe.set_block_size(stage.block_size)
        if self.reset_optimizer:
            recipe.reset_optimizer_state()
        if self.reset_lr_schedule:
            recipe.reset_lr_schedule(stage_steps=stage.steps, steps_into_stage=step - stage.start)
        if old != stage.block_size:
            self.switches.append((step, old, stage.block_size))
            logger.info("[block_merge] step %d: block size %d -> %d (stage %d/%d)",
                        step, old, stage.block_size, idx + 1, len(self.stages))

    def on_train_start(self, recipe: Any) -> None:
        step = recipe.step_scheduler.step
        idx = self.stage_index(step)
        if step > 0 and idx > 0 and step == self.stages[idx].start:
            prev = self.stages[idx - 1]
            if self.export_stages and not is_complete(self.stage_dir(recipe, prev)):
                self._export(recipe, prev)  # resumed exactly at a boundary whose export was not finished
        stage = self.stages[idx]
        recipe.set_block_size(stage.block_size)
        if self.reset_lr_schedule:
            # a restored scheduler carries the run-wide decay; put it back on this stage's own schedule
            recipe.reset_lr_schedule(stage_steps=stage.steps, steps_into_stage=step - stage.start)

    def on_step_start(self, recipe: Any, step: int) -> None:
        idx = self.stage_index(step)
        if idx > 0 and step == self.stages[idx].start and recipe.block_size != self.stages[idx].block_size:
            self._export(recipe, self.stages[idx - 1])
            self._apply_stage(recipe, idx, step)

    def on_train_end(self, recipe: Any) -> None:
        step = recipe.step_scheduler.step
        idx = self.stage_index(max(step - 1, 0))
        stage = self.stages[idx]
        if step >= stage.end:
            self._export(recipe, stage)
