"""The result of a generation call, shared by the block-diffusion decoder and the AR baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    """Response tokens and decoding statistics of one call.

    Attributes:
        sequences: ``[B, T]`` response tokens (eos included), right-padded with the pad token.
        lengths: ``[B]`` response lengths, counted up to and including eos.
        num_forwards: model forwards of the call after prefill (one batched forward counts once).
        row_forwards: ``[B]`` forwards in which each row still had work (its count had it run alone).
        tokens_per_forward: total response tokens / ``num_forwards``.
        wall_time: seconds for the whole call (prefill included).
        prefill_time: seconds spent in the prompt prefill (``None`` when not measured).
    """

    sequences: torch.LongTensor
    lengths: torch.LongTensor
    num_forwards: int
    row_forwards: torch.LongTensor
    tokens_per_forward: float
    wall_time: float
    prefill_time: float | None = None

    @property
    def response_tokens(self) -> int:
        """Total response tokens over the batch."""
        return int(self.lengths.sum())

    @property
    def tokens_per_second(self) -> float:
        """Response tokens per second of wall time."""
        return self.response_tokens / self.wall_time if self.wall_time > 0 else float("nan")

    def stats(self) -> dict:
        """JSON-friendly statistics (no token tensors)."""
        return {
            "response_tokens": self.response_tokens,
            "num_forwards": self.num_forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "wall_time": self.wall_time,
            "prefill_time": self.prefill_time,
            "tokens_per_second": self.tokens_per_second,
            "lengths": self.lengths.tolist(),
            "row_forwards": self.row_forwards.tolist(),
        }
