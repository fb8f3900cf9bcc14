"""Per-sample masking noise (docs/method.md §5: stratified per block for PBM, one rate per sample for SWD).

Each sample draws from its own ``torch.Generator`` seeded by the caller (the recipes derive the
seed from the run seed, the step and the sample's global position, so noise is deterministic per
rank, step and sample and independent of the rest of the batch). Work inside a sample is
vectorised; the only Python loop is over samples.
"""

from __future__ import annotations

import torch

from nemo_bard.schema import NoiseSettings


def sample_block_rates(num_blocks: int, cfg: NoiseSettings, gen: torch.Generator) -> torch.Tensor:
    """Mask rates t for one sample's blocks, ``[num_blocks]`` float64."""
    if cfg.type == "uniform_sample":
        t = cfg.min_rate + (cfg.max_rate - cfg.min_rate) * torch.rand(1, generator=gen, dtype=torch.float64)
        return t.expand(num_blocks).clone()
    u = torch.rand(num_blocks, generator=gen, dtype=torch.float64).clamp(cfg.min_rate, cfg.max_rate)
    t = (u + torch.arange(num_blocks, dtype=torch.float64)) / num_blocks
    return t[torch.randperm(num_blocks, generator=gen)]


def sample_noise(
    resp_lens: torch.Tensor, block_size: int, width: int, seeds: list[int], cfg: NoiseSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mask rates and mask decisions for a batch.

    Args:
        resp_lens: ``[N]`` padded response lengths (multiples of ``block_size``).
        width: columns of the returned tensors (>= max resp_lens).
        seeds: one integer seed per sample.

    Returns:
        ``(t, masked)``: ``[N, width]`` float64 rates (0 outside the response) and bool mask decisions.
    """
    n = resp_lens.shape[0]
    t = torch.zeros(n, width, dtype=torch.float64)
    masked = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        r = int(resp_lens[i])
        if r == 0:
            continue
        gen = torch.Generator().manual_seed(int(seeds[i]) % (2**63))
        rates = sample_block_rates(r // block_size, cfg, gen).repeat_interleave(block_size)
        draw = torch.rand(r, generator=gen, dtype=torch.float64) < rates
        if cfg.type == "uniform_sample" and not draw.any():
            draw[torch.randint(r, (1,), generator=gen)] = True
        t[i, :r] = rates
        masked[i, :r] = draw
    return t, masked
