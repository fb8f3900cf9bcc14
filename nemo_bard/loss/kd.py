"""Top-k knowledge distillation for Stage-Wise Distillation (docs/method.md §8).

The teacher contributes only its top-k logits per loss position. With ``q_T`` the softmax of the
teacher's top-k logits (temperature tau) and ``p_S`` the student's *full-vocabulary* softmax (same tau):

* forward (default): ``KD = -sum_{j in topk} q_T(j) log p_S(j)``; with k = vocabulary size this is
  the cross-entropy from the full teacher distribution to the student (KL up to the teacher entropy);
* reverse: ``KL(p~_S || q_T)`` over the top-k support, with ``p~_S`` the student renormalised on it.

Both are scaled by tau^2 (Hinton) and reduced as a token mean over the global number of loss positions.
Computed in fp32.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class KDOutput(NamedTuple):
    loss: torch.Tensor
    teacher_entropy_sum: torch.Tensor
    top1_agree_sum: torch.Tensor


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher logits and their vocabulary indices (detached), each ``[M, k]``."""
    values, indices = logits.detach().topk(min(k, logits.shape[-1]), dim=-1)
    return values, indices


class TopKDistillationLoss(nn.Module):
    """Top-k forward (or reverse) KL from a frozen teacher to the student."""

    def __init__(
        self, top_k: int = 16, temperature: float = 1.0, direction: Literal["forward", "reverse"] = "forward"
    ) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"kd.top_k must be >= 1, got {top_k}")
        if temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {temperature}")
        if direction not in ("forward", "reverse"):
            raise ValueError(f"kd.direction={direction!r}; use 'forward' or 'reverse'")
        self.top_k, self.temperature, self.direction = top_k, temperature, direction

    def forward(
        self, student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
        denominator: float,
    ) -> KDOutput:
        tau = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1).gather(-1, topk_indices)
        log_q_t = F.log_softmax(topk_values.float() / tau, dim=-1)
        q_t = log_q_t.exp()
        if self.direction == "forward":
            per_pos = -(q_t * log_p_s).sum(-1)
        else:
            log_p_tilde = log_p_s - torch.logsumexp(log_p_s, dim=-1, keepdim=True)
            per_pos = (log_p_tilde.exp() * (log_p_tilde - log_q_t)).sum(-1)
        loss = per_pos.sum() * tau**2 / max(float(denominator), 1.0)
        with torch.no_grad():
            entropy = -(q_t * log_q_t).sum(-1).sum()
            agree = (student_logits.argmax(-1) == topk_indices[:, 0]).sum()
        return KDOutput(loss, entropy, agree)
