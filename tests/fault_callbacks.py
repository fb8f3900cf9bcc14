"""Fault injection for the end-to-end tests: recipe callbacks that signal their own process or poison the loss at a
given step."""

from __future__ import annotations

import os
import signal as signals
import time
from pathlib import Path

from nemo_bard.callbacks.base import BardCallback


class SignalAt(BardCallback):
    """Send ``signal`` (a name, e.g. ``SIGKILL``) to this process when step ``step`` starts, once: the file ``once``
    records that it fired, so the same command run again (the resume) is not signalled again."""

    def __init__(self, step: int, signal: str, once: str) -> None:
        self.step, self.signum, self.once = int(step), getattr(signals, signal), Path(once)

    def on_step_start(self, recipe, step: int) -> None:
        if step == self.step and not self.once.exists():
            self.once.write_text(str(os.getpid()))
            os.kill(os.getpid(), self.signum)


class SlowSteps(BardCallback):
    """Sleep ``seconds`` before every step (a slow run, e.g. one that reaches its SLURM time limit) while this is
    run number ``restart`` of a SLURM job (``SLURM_RESTART_COUNT``, 0 outside SLURM and on a job's first run), so
    a requeued job resumes at full speed. The losses stay those of the same run without it."""

    def __init__(self, seconds: float, restart: int = 0) -> None:
        self.seconds, self.restart = float(seconds), int(restart)

    def on_step_start(self, recipe, step: int) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) == self.restart:
            time.sleep(self.seconds)


class NaNLossFrom(BardCallback):
    """From step ``step`` on, every micro-batch loss is NaN (what a far too high learning rate ends in) while the
    weights stay finite."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_step_start(self, recipe, step: int) -> None:
        if step == self.step:
            forward_loss = recipe.forward_loss

            def nan_loss(*args, **kwargs):
                loss, stats = forward_loss(*args, **kwargs)
                return loss * float("nan"), stats

            recipe.forward_loss = nan_loss


__all__ = ["NaNLossFrom", "SignalAt", "SlowSteps"]
