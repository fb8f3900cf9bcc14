"""Recipe callbacks: the protocol, the PBM block-merge schedule and the LR horizon on resume."""

from nemo_bard.callbacks.base import BardCallback, CallbackList
from nemo_bard.callbacks.block_merge import (
    BlockMergeCallback,
    ResumeScheduleError,
    ScheduleError,
    check_resume_schedule,
    parse_schedule,
)
from nemo_bard.callbacks.lr_horizon import ResumeLRHorizon, rederive_lr_horizon

__all__ = ["BardCallback", "BlockMergeCallback", "CallbackList", "ResumeLRHorizon", "ResumeScheduleError",
           "ScheduleError", "check_resume_schedule", "parse_schedule", "rederive_lr_horizon"]
