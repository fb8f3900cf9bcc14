"""Recipe callbacks: the protocol and the PBM block-merge schedule."""

from nemo_bard.callbacks.base import BardCallback, CallbackList
from nemo_bard.callbacks.block_merge import (
    BlockMergeCallback,
    ResumeScheduleError,
    ScheduleError,
    check_resume_schedule,
    parse_schedule,
)

__all__ = ["BardCallback", "BlockMergeCallback", "CallbackList", "ResumeScheduleError", "ScheduleError",
           "check_resume_schedule", "parse_schedule"]
