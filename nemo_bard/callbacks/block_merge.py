"""Progressive Block Merging schedule (docs/method.md §7): block size 4 -> 8 -> 16 -> 32 in one run.

At each stage boundary the callback exports the finished stage as an HF ``bard_vl`` directory
(``<checkpoint_dir>/stages/b4`` ...; usable with ``from_pretrained`` and as the SWD teacher; written
under a temporary name and renamed into place with a completion marker, which resume checks),
optionally resets the LR schedule (warm-up and decay restart, decay over the new stage's steps) and
the optimizer state, switches the layout's block size and logs the switch. The block size of any
step is a pure function of the step index, so resuming a checkpoint taken mid-stage restores it.

Each checkpoint records the schedule it was trained under (``bard_schedule.json``). A resume must keep
the stages that began before the checkpoint step: finished stages unchanged, the running stage the same
block size and no shorter; later stages may be changed or added (:func:`check_resume_schedule`). When
the schedule's length changed, the restored LR scheduler is put back on the horizon of the new config.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_bard.callbacks.base import BardCallback
from nemo_bard.callbacks.lr_horizon import rederive_lr_horizon
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


SCHEDULE_RECORD = "bard_schedule.json"


class ResumeScheduleError(UserError):
    """A resume whose ``block_merge.schedule`` rewrites steps the checkpoint already trained."""


def format_schedule(stages: list[Stage]) -> str:
    """``4:4,8:4``: block size and steps of each stage."""
    return ",".join(f"{s.block_size}:{s.steps}" for s in stages)


def check_resume_schedule(old: list[Stage], new: list[Stage], step: int, checkpoint: str) -> None:
    """Refuse a new schedule that changes what the first ``step`` steps (already trained under ``old``) were.

    Stages finished by ``step`` must be unchanged (their exports stand), the running stage keeps its block size
    and may only grow; stages starting at or after ``step`` are free (changed, added or dropped).
    """
    reason = None
    for i, o in enumerate(old):
        if o.start >= step:
            break
        n = new[i] if i < len(new) else None
        label = f"stage {i + 1} (block size {o.block_size}, steps {o.start}-{o.end - 1})"
        if n is None or n.block_size != o.block_size:
            got = "is missing" if n is None else f"has block size {n.block_size}"
            reason = f"{label} was trained but the new schedule's stage {i + 1} {got}"
        elif o.end <= step and n.steps != o.steps:
            reason = f"{label} is finished (exported as b{o.block_size}) but the new schedule gives it {n.steps} steps"
        elif o.end > step and n.end < o.end:
            reason = (f"{label} is running ({step - o.start} steps trained) and the new schedule shortens it to "
                      f"{n.steps} steps")
        if reason:
            break
    if reason:
        kept = [s for s in old if s.start < step]
        raise ResumeScheduleError(
            f"block_merge.schedule {format_schedule(new)} does not match the checkpoint {checkpoint}, trained for "
            f"{step} steps under {format_schedule(old)}: {reason}; keep {format_schedule(kept)} as it was (the running "
            "stage may grow, later stages may change or be added, with step_scheduler.max_steps their sum) or train "
            "in a new checkpoint.checkpoint_dir"
        )


def read_schedule_record(checkpoint: str | Path) -> list[Stage] | None:
    """The schedule a checkpoint was trained under (None for a checkpoint without a record)."""
    path = Path(checkpoint) / SCHEDULE_RECORD
    if not path.is_file():
        return None
    return parse_schedule(json.loads(path.read_text())["schedule"])


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

    def on_save(self, recipe: Any, checkpoint_dir: str) -> None:
        """Record the schedule beside the checkpoint (rank 0), for the check on resume."""
        dist_env = getattr(recipe, "dist_env", None)
        if dist_env is not None and not dist_env.is_main:
            return
        path = Path(checkpoint_dir) / SCHEDULE_RECORD
        tmp = path.with_name(path.name + ".tmp")
        record = {"schedule": [{"block_size": s.block_size, "steps": s.steps} for s in self.stages],
                  "step": int(recipe.step_scheduler.step)}
        try:
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, path)
        except OSError as exc:  # the checkpoint itself is complete; only the check on resume is lost
            logger.warning("[block_merge] could not record the schedule beside %s (%s); a resume from it will not "
                           "check block_merge.schedule", checkpoint_dir, exc)

    def _check_resume(self, recipe: Any, step: int) -> None:
        """Refuse a schedule that rewrites trained steps; re-derive the LR horizon when the schedule grew."""
        checkpoint = getattr(recipe, "restored_checkpoint", None)
        old = read_schedule_record(checkpoint) if checkpoint else None
        if old is None:
            return
        check_resume_schedule(old, self.stages, step, checkpoint)
        if old[-1].end == self.total_steps or self.reset_lr_schedule:
            return  # same length (nothing to re-derive) / each stage is put on its own LR schedule below
        rederive_lr_horizon(recipe, step, self.total_steps, f"with schedule {format_schedule(self.stages)} (checkpoint: "
                                          f"{format_schedule(old)})")

    def on_train_start(self, recipe: Any) -> None:
        step = recipe.step_scheduler.step
        if step > 0:
            self._check_resume(recipe, step)
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
