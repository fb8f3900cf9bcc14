"""Training-loop guards used by :class:`~nemo_bard.integrations.nemo.BardNeMoRecipe`.

* :class:`NonFiniteGuard` skips an optimizer step whose loss or gradients are not finite on any rank.
  It is an optimizer *step pre-hook* (``Optimizer.register_step_pre_hook``): when the step is bad it sets
  every gradient to ``None``, so the optimizer leaves parameters and state untouched (torch optimizers
  skip parameters without a gradient), while NeMo's step goes on (LR schedule, logging). All ranks take
  the same decision (one all-reduce per step). It also counts empty steps (no sample on any rank): too many in a
  row raise :class:`EmptyTraining`, a data error.
* :class:`StopSignals` is NeMo's preemption signal handler (the step scheduler polls it after every step
  and saves a checkpoint when any rank got a signal) extended to SIGINT as well as SIGTERM, remembering
  which signal arrived; the same signal again after :attr:`StopSignals.grace_s` seconds stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Iterable

import torch

from nemo_bard.errors import TrainingDiverged
from nemo_bard.integrations import check_version

check_version("nemo_automodel")

from nemo_automodel.components.training.signal_handler import DistributedSignalHandler  # noqa: E402

from nemo_bard.data.datasets import DataError  # noqa: E402

logger = logging.getLogger(__name__)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor: every element of every (local) tensor is finite (no host sync)."""
    locals_ = [local_tensor(t) for t in tensors]
    locals_ = [t for t in locals_ if t.numel()]
    if not locals_:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(locals_, norm_type=2.0, foreach=None))


class EmptyTraining(DataError):
    """Optimizer steps that had no sample to train on, too many in a row (or a whole stage); exit code 2."""


class NonFiniteGuard:
    """Skip (and count) optimizer steps with a non-finite loss or gradient; raise after too many in a row.

    Args:
        params: returns the trained parameters (all model parts).
        any_rank: ``any_rank(flag)`` (a 0-d bool tensor) is True when ``flag`` is True on any rank (MAX all-reduce).
        max_consecutive: this many skipped steps in a row end the run (:meth:`end_step` raises).
        max_empty: this many empty steps in a row (every row skipped or dropped on every rank) end the run.

    It also remembers which steps of this process updated the weights (:attr:`first_step`,
    :attr:`last_trained_step`), so an export can refuse a stage that never trained.
    """

    def __init__(self, params: Callable[[], Iterable[torch.nn.Parameter]], any_rank: Callable[[torch.Tensor], bool],
                 max_consecutive: int = 5, max_empty: int = 10) -> None:
        self.params, self.any_rank, self.max_consecutive = params, any_rank, int(max_consecutive)
        self.max_empty = int(max_empty)
        self.consecutive = self.total = self.empty = self.consecutive_empty = 0
        self.empty_skipped = self.empty_dropped = 0  # rows lost in the current run of empty steps
        self.first_step: int | None = None
        self.last_trained_step: int | None = None
        self._losses: list[torch.Tensor] = []
        self._decision: str | None = None
        self._empty_step = False
        self._hooked: set[int] = set()

    PROGRESS_KEYS = ("first_step", "last_trained_step", "consecutive", "total", "empty", "consecutive_empty",
                     "empty_skipped", "empty_dropped")

    def progress(self) -> dict[str, Any]:
        """The counters a resumed run needs to judge the steps before it (saved with each checkpoint)."""
        return {k: getattr(self, k) for k in self.PROGRESS_KEYS}

    def restore(self, progress: dict[str, Any]) -> None:
        """Continue from :meth:`progress` of the run that saved the checkpoint being resumed."""
        for k in self.PROGRESS_KEYS:
            if k in progress:
                setattr(self, k, progress[k])

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Register the step pre-hook on each optimizer (once)."""
        for opt in optimizers:
            if id(opt) not in self._hooked:
                opt.register_step_pre_hook(self._pre_step)
                self._hooked.add(id(opt))

    def begin_step(self, empty: bool = False) -> None:
        """Start an optimizer step; ``empty``: the step has no loss sample on any rank (skip it too)."""
        self._losses, self._decision, self._empty_step = [], None, bool(empty)

    def add_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def _decide(self) -> str:
        if self._empty_step:
            return "empty"
        grads = [p.grad for p in self.params() if p.grad is not None]
        ok = all_finite(grads)
        if self._losses:
            ok = ok.to(self._losses[0].device) & torch.isfinite(torch.stack([x.float().reshape(()) for x in self._losses])).all()
        return "ok" if not self.any_rank(~ok) else "nonfinite"

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._decision is None:
            self._decision = self._decide()
        if self._decision != "ok":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    @property
    def skipped(self) -> bool:
        """Whether the current step's update was skipped."""
        return self._decision in ("nonfinite", "empty")

    def end_step(self, step: int, block_size: Any, lr: float | None = None, skipped_rows: int = 0,
                 dropped_rows: int = 0) -> dict[str, float]:
        """Count the step; returns metrics to log. Raises ``TrainingDiverged`` after too many non-finite steps in a
        row, :class:`EmptyTraining` after too many empty ones (``skipped_rows`` / ``dropped_rows``: this step's rows
        lost to unreadable media / to ``bard.max_length``, summed over ranks)."""
        decision, self._decision = self._decision, None
        self.first_step = step if self.first_step is None else self.first_step
        if decision == "empty":
            self.empty += 1
            self.consecutive_empty += 1
            self.empty_skipped += int(skipped_rows)
            self.empty_dropped += int(dropped_rows)
            logger.warning("step %d (block size %s): every sample was dropped on every rank; optimizer step skipped",
                           step, block_size)
            if self.consecutive_empty >= self.max_empty:
                raise EmptyTraining(
                    f"no training data reached the model: {self.consecutive_empty} optimizer steps in a row (up to "
                    f"step {step}, block size {block_size}) had every row skipped or dropped ({self.empty_skipped} "
                    f"skipped for unreadable media with skip_bad_samples, {self.empty_dropped} dropped as longer "
                    "than bard.max_length); nothing was trained or exported. Fix the image/video paths (relative "
                    "paths resolve against dataset.root_dir) or raise bard.max_length (bard.max_empty_steps sets "
                    "how many empty steps in a row are tolerated)"
                )
            return {"skipped_steps": float(self.total), "empty_steps": float(self.empty)}
        self.consecutive_empty = self.empty_skipped = self.empty_dropped = 0
        if decision != "nonfinite":
            self.consecutive = 0
            self.last_trained_step = step
            return {"skipped_steps": float(self.total)} if self.total else {}
        self.consecutive += 1
        self.total += 1
        logger.warning("step %d (block size %s): non-finite loss or gradients; optimizer step skipped "
                       "(%d in a row, %d in this run)", step, block_size, self.consecutive, self.total)
        if self.consecutive >= self.max_consecutive:
            lr_text = f" (now {lr:g})" if lr is not None else ""
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} optimizer steps in a row (up to step {step}, block size "
                f"{block_size}) had a non-finite loss or gradients and were skipped; no checkpoint holds them. Lower "
                f"optimizer.lr{lr_text}, keep clip_grad_norm.max_norm set, or check the data; then resume from the "
                "last checkpoint with the same command (bard.max_nonfinite_steps sets how many skips in a row "
                "are tolerated)"
            )
        return {"skipped_steps": float(self.total)}


class StopSignals(DistributedSignalHandler):
    """NeMo's distributed preemption handler for SIGTERM and SIGINT that records the first signal received.

    The first signal asks for a graceful stop (finish the step, save a checkpoint, stop); the same signal
    sent again more than ``grace_s`` seconds later restores the previous handler and re-delivers it (an
    immediate stop, no checkpoint). Repeats within ``grace_s`` (a terminal and a launcher both forwarding
    Ctrl-C) are ignored.
    """

    grace_s = 5.0

    def __init__(self, sig: Any = (signal.SIGTERM, signal.SIGINT), group: Any = None) -> None:
        super().__init__(sig=list(sig), group=group)
        self.received: int | None = None
        self._first_at = 0.0

    def __enter__(self) -> "StopSignals":
        self._signal_received = False
        self.released = False
        self.received = None
        owner = os.getpid()

        def handler(signum: int, frame: Any) -> None:
            if os.getpid() != owner:  # a forked dataloader worker (Ctrl-C reaches the whole process group)
                return
            name = signal.Signals(signum).name
            if self.received is None:
                self.received, self._first_at, self._signal_received = signum, time.monotonic(), True
                logger.warning("received %s: finishing the current step, then saving a checkpoint and stopping "
                               "(send %s again after %.0f s to stop at once without saving)", name, name, self.grace_s)
            elif time.monotonic() - self._first_at > self.grace_s:
                logger.warning("received %s again: stopping now without saving", name)
                self.release()
                os.kill(os.getpid(), signum)

        for s in self.sigs:
            self.original_handlers[s] = signal.getsignal(s)
            signal.signal(s, handler)
        return self


__all__ = ["EmptyTraining", "NonFiniteGuard", "StopSignals", "all_finite", "local_tensor"]
