"""A resume whose config trains for more (or fewer) steps follows the LR schedule of the config, not the checkpoint's.

NeMo restores the LR scheduler with the horizon of the run that saved it, so a run resumed with a larger
``step_scheduler.max_steps`` would spend its new steps at the old schedule's end (``min_lr``). PBM re-derives the
horizon when its schedule grew (:class:`~nemo_bard.callbacks.block_merge.BlockMergeCallback`); every BARD recipe
without a ``block_merge:`` schedule (SWD) gets :class:`ResumeLRHorizon`.
"""

from __future__ import annotations

import logging
from typing import Any

from nemo_bard.callbacks.base import BardCallback

logger = logging.getLogger(__name__)


def rederive_lr_horizon(recipe: Any, step: int, total_steps: int, why: str) -> tuple[int, int] | None:
    """Put the restored LR scheduler on the current config's horizon (``recipe.rederive_lr_schedule``) of
    ``total_steps``; logs and returns (old decay steps, new decay steps) when it changed, else None."""
    changed = recipe.rederive_lr_schedule()
    if changed is not None:
        logger.warning("[lr] resumed at step %d %s: the LR schedule is re-derived for %d steps (decay over %d steps, "
                       "was %d), as if the run had started with this config",
                       step, why, total_steps, changed[1], changed[0])
    return changed


class ResumeLRHorizon(BardCallback):
    """On a resume (step > 0 from a restored checkpoint), re-derive the LR horizon from the current config."""

    def on_train_start(self, recipe: Any) -> None:
        step = int(recipe.step_scheduler.step)
        if step > 0 and getattr(recipe, "restored_checkpoint", None):
            total = int(recipe.step_scheduler.max_steps)
            rederive_lr_horizon(recipe, step, total, f"with step_scheduler.max_steps {total}")
