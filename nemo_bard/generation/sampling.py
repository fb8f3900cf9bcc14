"""Token sampling and remasking (which masked positions to commit) for block diffusion (docs/method.md, "Decoding")."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nemo_bard.generation.points import REMASKING_STRATEGIES


def step_schedule(block_size: int, steps: int) -> list[int]:
    """Tokens to commit at each step: ``[B//S + 1] * (B % S) + [B//S] * (S - B % S)``."""
    base, rem = divmod(block_size, steps)
    return [base + 1] * rem + [base] * (steps - rem)


def undecided(x: torch.Tensor, mask_id: int, stops: torch.Tensor) -> torch.Tensor:
    """The masked positions of the blocks ``x [rows, B]`` that can still change a row's output.

    Everything after a row's first stop token is cut from its output, so once a block holds a stop token and every
    position before it is decided, the row's remaining masked positions (all after the stop) are left masked: no
    further forward is run for them. The tokens a row outputs are those of the full denoising; only the forwards
    that would fill positions after the stop are skipped (docs/method.md, "Decoding").
    """
    masked = x == mask_id
    if stops.numel() == 0:
        return masked
    is_stop = torch.isin(x, stops) & ~masked  # an undecided position is no stop (even if mask_id is a stop id)
    before_stop = is_stop.long().cumsum(-1) == 0  # positions before the first stop of the row
    settled = is_stop.any(-1) & ~(masked & before_stop).any(-1)
    return masked & ~settled[:, None]


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits [N, V]``; return ``(tokens [N], confidence [N])``.

    Temperature 0 is greedy argmax. Otherwise transformers' temperature / top-k / top-p logits warpers
    shape the distribution before a multinomial draw. The confidence is the full-vocabulary softmax
    probability of the chosen token under the raw logits (the warpers only shape the sampling).
    """
    logits = logits.float()
    probs = logits.softmax(-1)
    if temperature <= 0:
        tokens = logits.argmax(-1)
    else:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k is not None and top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and 0 < top_p < 1:
            warpers.append(TopPLogitsWarper(top_p))
        scores = warpers(None, logits)
        tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
    return tokens, probs.gather(-1, tokens[:, None])[:, 0]


def select_commits(
    confidence: torch.Tensor, masked: torch.Tensor, n_commit: int, strategy: str, threshold: float
) -> torch.Tensor:
    """Positions to commit this step, ``[b, B]`` bool, from ``confidence`` (-inf where not masked).

    ``low_confidence_static``: the ``n_commit`` most confident masked positions.
    ``low_confidence_dynamic``: every masked position with confidence ``> threshold`` if there are at least
    ``n_commit`` of them, else the ``n_commit`` most confident. Never more than the masked positions of a row.
    """
    k = masked.sum(-1, keepdim=True).clamp(max=n_commit)
    rank = confidence.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    top = masked & (rank < k)
    if strategy == "low_confidence_static":
        return top
    if strategy != "low_confidence_dynamic":
        raise ValueError(f"remasking_strategy={strategy!r} is not one of {REMASKING_STRATEGIES}")
    high = masked & (confidence > threshold)
    return torch.where(high.sum(-1, keepdim=True) >= n_commit, high, top)
