"""Block-diffusion decoding: the public entry point.

:func:`block_diffusion_generate` validates a request and decodes a batch on the one decoding loop
(:class:`~nemo_bard.generation.session.BlockDiffusionSession` on a
:class:`~nemo_bard.generation.engine.DecodeEngine`); ``engine`` picks how the forwards run: ``static`` (lean
layers, CUDA graphs on a GPU), ``compiled`` (the same with ``torch.compile``) or ``eager`` (transformers' own
layers, no graphs). Every engine gives the same tokens (tested against an uncached reference decoder written
from docs/method.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from nemo_bard.generation.engine import DecodeEngine, batch_bucket
from nemo_bard.generation.inputs import PROCESSOR_KEYS
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.points import check_engine
from nemo_bard.generation.sampling import REMASKING_STRATEGIES, step_schedule
from nemo_bard.generation.session import BlockDiffusionSession, RowRequest, SharedPrefill, run_to_end


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def special_token_ids(
    model: torch.nn.Module,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: list[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[list[int], int]:
    """(stop ids, pad id): eos defaults to the generation config / config eos; pad to its pad, else eos."""
    sources = [getattr(model, "generation_config", None), model.config, getattr(model.config, "text_config", None)]
    if eos_token_id is None:
        eos_token_id = next((s.eos_token_id for s in sources if getattr(s, "eos_token_id", None) is not None), None)
    stops = list(dict.fromkeys(_ids(eos_token_id) + _ids(stop_token_ids)))
    if pad_token_id is None:
        pad_token_id = next((s.pad_token_id for s in sources if getattr(s, "pad_token_id", None) is not None), None)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    return stops, int(pad_token_id)


def stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Stop ids: the model's eos (generation config, else config) plus the tokenizer's eos."""
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    return special_token_ids(model, None, None if tok_eos is None else [tok_eos])[0]


class _Streamer:
    """Sends committed blocks to an HF ``BaseStreamer`` (batch 1) or a ``callable(row, tokens)``."""

    def __init__(self, streamer: Any, batch: int, prompt: torch.Tensor) -> None:
        self.streamer = streamer
        self.hf = streamer is not None and hasattr(streamer, "put") and hasattr(streamer, "end")
        if self.hf:
            if batch != 1:
                raise ValueError("a transformers BaseStreamer supports batch size 1; pass callable(row, tokens)")
            self.streamer.put(prompt.cpu())  # like HF generate: the prompt first (TextStreamer skip_prompt)
        elif streamer is not None and not callable(streamer):
            raise TypeError("streamer must be a transformers BaseStreamer or a callable(row_index, tokens)")

    def emit(self, row: int, tokens: list[int]) -> None:
        """Send one row's newly committed tokens (already cut after a stop token)."""
        if self.hf:
            self.streamer.put(torch.tensor(tokens))
        elif self.streamer is not None:
            self.streamer(row, tokens)

    def end(self) -> None:
        if self.hf:
            self.streamer.end()


@torch.no_grad()
def block_diffusion_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 1024,
    block_size: int | None = None,
    denoising_steps: int | None = None,
    remasking_strategy: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.9,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    streamer: Any | Callable[[int, list[int]], None] | None = None,
    fuse_commit: bool = True,
    engine: "str | DecodeEngine" = "static",
    shared_prefill: SharedPrefill | None = None,
    **processor_outputs: torch.Tensor | None,
) -> GenerationOutput:
    """Block-diffusion decoding of (left- or right-) padded prompts; see the module docstring.

    Args:
        input_ids, attention_mask, **processor_outputs: the processor's outputs for a batch of prompts, as one
            mapping (``model.generate(**processor(...))``): ``pixel_values``, ``image_grid_thw``,
            ``pixel_values_videos``, ``video_grid_thw``, ``mm_token_type_ids``.
        max_new_tokens: response budget; ``ceil(max_new_tokens / B)`` blocks at most.
        block_size: B (default ``model.config.block_size``).
        denoising_steps: S, the most steps per block (default B, clamped to ``[1, B]``).
        remasking_strategy: ``low_confidence_dynamic`` or ``low_confidence_static``.
        confidence_threshold: τ of the dynamic strategy (strict ``> τ``), in ``[0, 1]``.
        temperature, top_k, top_p, seed: sampling (temperature 0 = greedy).
        eos_token_id, stop_token_ids: a row stops after the block holding one of them.
        pad_token_id: fills ``sequences`` after a row's eos.
        streamer: HF ``BaseStreamer`` (batch 1) or ``callable(row_index, tokens)``; gets every committed block.
        fuse_commit: commit a finished block in the next block's first forward (False: a separate forward).
        engine: ``static`` (default: lean layers, static shapes, CUDA graphs on GPU), ``compiled`` (the same with
            ``torch.compile``) or ``eager`` (transformers' own layers, no graphs; same tokens, slower); or a
            :class:`~nemo_bard.generation.engine.DecodeEngine` of ``model`` (e.g. one built with CUDA graphs off).
        shared_prefill: a :class:`~nemo_bard.generation.session.SharedPrefill` of these prompts at this block size:
            filled by the first call, reused (no prompt forward, the same tokens) by later ones, e.g. other
            decoding points of the same batch.
    """
    if not isinstance(engine, DecodeEngine):
        check_engine(engine)
    if remasking_strategy not in REMASKING_STRATEGIES:
        raise ValueError(f"remasking_strategy={remasking_strategy!r} is not one of {REMASKING_STRATEGIES}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    block_len = int(block_size or model.config.block_size)
    if block_len < 1:
        raise ValueError(f"block_size must be >= 1, got {block_len}")
    schedule = step_schedule(block_len, min(max(int(denoising_steps or block_len), 1), block_len))
    stops, pad = special_token_ids(model, eos_token_id, stop_token_ids, pad_token_id)
    device = model.device
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    inputs = model_inputs(device, input_ids=input_ids, attention_mask=attention_mask, **processor_outputs)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    stream = _Streamer(streamer, ids.shape[0], ids[:, am[0].bool()])
    dec = engine if isinstance(engine, DecodeEngine) else DecodeEngine.for_model(model, engine)
    blocks = -(-max_new_tokens // block_len)
    dec.check_positions(ids.shape[1] + blocks * block_len)
    capacity = dec.capacity_for(ids.shape[1] + (blocks + 1) * block_len)  # + a block of scratch
    session = BlockDiffusionSession(
        dec, rows=batch_bucket(ids.shape[0]), capacity=capacity, block_size=block_len, schedule=schedule,
        mask_token_id=int(model.config.mask_token_id), stops=stops, pad=pad, strategy=remasking_strategy,
        threshold=confidence_threshold, fuse_commit=fuse_commit)
    requests = [RowRequest(i, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
                for i in range(ids.shape[0])]
    out = run_to_end(session, requests, inputs, stream.emit if stream.streamer is not None else None, shared_prefill)
    stream.end()
    return out


def model_inputs(device: torch.device, **processor_outputs: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The processor's outputs (:data:`~nemo_bard.generation.inputs.PROCESSOR_KEYS`) on ``device``, every key
    present (None when not given; an all-ones attention mask when none is given). An unknown key is a
    ``TypeError`` naming it."""
    unknown = sorted(set(processor_outputs) - set(PROCESSOR_KEYS))
    if unknown:
        raise TypeError(f"unexpected processor output {unknown[0]!r}; the decoder reads {', '.join(PROCESSOR_KEYS)}")
    out = {k: (v.to(device) if v is not None else None) for k in PROCESSOR_KEYS
           for v in [processor_outputs.get(k)]}
    if out["input_ids"] is None:
        raise TypeError("input_ids is required")
    if out["attention_mask"] is None:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    out["attention_mask"] = out["attention_mask"].long()
    return out
