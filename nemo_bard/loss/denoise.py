"""Masked-denoising loss (docs/method.md §6).

Inputs are already gathered at the loss positions (the model computes logits only there):
``logits [M, V]``, ``targets [M]``, ``weights [M]`` (1/t, halved on response padding) and
``sample_ids [M]`` (which local sample each position belongs to).

* ``sample_mean`` (default): per sample, sum(w * CE) / (its number of loss positions); summed over
  samples and divided by the *global* number of samples of the optimizer step (all data-parallel
  ranks and gradient-accumulation micro-batches), so gradient accumulation and data parallelism give
  the same update as one big batch. Samples with no masked position carry no loss and are not counted.
* ``token_mean``: sum(w * CE) / global number of loss positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nemo_bard.schema import LossSettings


class DenoiseLossOutput(NamedTuple):
    """Loss plus detached statistics for logging."""

    loss: torch.Tensor
    num_correct: torch.Tensor
    num_positions: torch.Tensor


def per_sample_counts(sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Loss positions per local sample, ``[num_samples]``."""
    return torch.bincount(sample_ids, minlength=num_samples)


class MaskedDenoisingLoss(nn.Module):
    """1/t-weighted cross-entropy at masked noisy positions, as ``settings`` (``bard.loss``) say."""

    def __init__(self, settings: LossSettings | None = None) -> None:
        super().__init__()
        settings = settings or LossSettings()
        self.reduction, self.fp32_upcast = settings.reduction, settings.fp32_upcast

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        sample_ids: torch.Tensor,
        num_local_samples: int,
        global_denominator: float,
    ) -> DenoiseLossOutput:
        """``global_denominator``: global sample count (sample_mean) or global position count (token_mean)."""
        if self.fp32_upcast:
            logits = logits.float()
        ce = F.cross_entropy(logits, targets, reduction="none") * weights.to(logits.dtype)
        if self.reduction == "sample_mean":
            counts = per_sample_counts(sample_ids, num_local_samples).clamp_min(1).to(ce.dtype)
            total = (ce / counts[sample_ids]).sum()
        else:
            total = ce.sum()
        loss = total / max(float(global_denominator), 1.0)
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum()
        return DenoiseLossOutput(loss, correct, torch.tensor(targets.numel()))


def num_loss_samples(loss_mask: torch.Tensor) -> int:
    """Samples of a laid-out batch with at least one loss position."""
    return int(loss_mask.any(-1).sum())
