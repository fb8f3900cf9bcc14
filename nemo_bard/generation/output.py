"""The result of a generation call, shared by the block-diffusion decoders and the AR baselines."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    """Response tokens and decoding statistics of one call.

    Attributes:
        sequences: ``[b, T]`` response tokens (eos included), right-padded with the pad token.
        lengths: ``[b]`` response lengths, counted up to and including eos.
        num_forwards: batched forwards that produced response tokens (one batched forward counts once).
            Block diffusion: the decoding forwards after the prompt prefill. AR: one per generated position,
            the prompt prefill included (it produces the first token).
        row_forwards: ``[b]`` forwards in which each row still had work (its count had it run alone).
        wall_time: seconds for the whole call (prefill included).
        prefill_time: seconds of the prompt prefill (``None`` when not measured, e.g. HF ``generate``).
        decode_forwards: forwards after the prefill (``None``: unknown).
        engine: the engine that ran the forwards: ``static``, ``compiled``, ``eager`` or ``hf`` (HF ``generate``).
    """

    sequences: torch.LongTensor
    lengths: torch.LongTensor
    num_forwards: int
    row_forwards: torch.LongTensor
    wall_time: float
    prefill_time: float | None = None
    decode_forwards: int | None = None
    engine: str = "static"

    @property
    def response_tokens(self) -> int:
        """Total response tokens over the batch."""
        return int(self.lengths.sum())

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a row gains per forward (response tokens / row forwards): TPF, independent of the batch size."""
        return self.response_tokens / max(int(self.row_forwards.sum()), 1)

    @property
    def tokens_per_batch_forward(self) -> float:
        """Response tokens of the whole batch per batched forward."""
        return self.response_tokens / max(self.num_forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        """Response tokens per second of wall time (prefill included)."""
        return self.response_tokens / self.wall_time if self.wall_time > 0 else float("nan")

    @property
    def decode_time(self) -> float | None:
        """Seconds after the prompt prefill (``None`` when the prefill was not timed)."""
        return None if self.prefill_time is None else self.wall_time - self.prefill_time

    @property
    def ms_per_forward(self) -> float:
        """Milliseconds per decoding forward after the prefill (whole call / forwards when the prefill is untimed)."""
        if self.decode_time is not None and self.decode_forwards:
            return 1000.0 * self.decode_time / self.decode_forwards
        return 1000.0 * self.wall_time / max(self.num_forwards, 1)

    def stats(self) -> dict:
        """JSON-friendly statistics (no token tensors)."""
        return {
            "engine": self.engine,
            "response_tokens": self.response_tokens,
            "num_forwards": self.num_forwards,
            "decode_forwards": self.decode_forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "tokens_per_batch_forward": self.tokens_per_batch_forward,
            "wall_time": self.wall_time,
            "prefill_time": self.prefill_time,
            "ms_per_forward": self.ms_per_forward,
            "tokens_per_second": self.tokens_per_second,
            "lengths": self.lengths.tolist(),
            "row_forwards": self.row_forwards.tolist(),
        }
