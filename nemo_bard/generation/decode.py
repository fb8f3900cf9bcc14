"""Block-diffusion decoding with a KV cache: the public entry point and the eager reference decoder.

:func:`block_diffusion_generate` validates the request and runs it on the static-shape engine
(:mod:`nemo_bard.generation.engine`, the default) or on the eager decoder below (``engine="eager"``),
which is the readable reference the engine is tested against:

1. Prefill the prompt with the block-causal mask into a :class:`BlockKVCache`.
2. Each response block starts as ``B`` mask tokens at the next ``B`` positions and is denoised against
   the cache (its own K/V are written to scratch slots, never committed) for at most ``S`` steps.
3. The finished block is committed in the *same* forward as the next block's first step: the input is
   ``[finished block (clean) | next block (noisy)]``, then the pointer advances by ``B``.
4. A row stops after the block holding its eos; finished rows leave the running batch (cache compacted).

One mask definition: every cache slot carries a kind (prefix / clean / noisy / pad) and a block id, and
every forward's mask is ``dense_mask(kind, block, q_slice=<slots forwarded>)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from nemo_bard.attention.masks import CLEAN, NOISY, dense_mask, num_prompt_blocks, prompt_token_meta
from nemo_bard.generation.cache import BlockKVCache
from nemo_bard.generation.engine import DecodeEngine, check_engine, device_sync, prompt_positions
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.sampling import REMASKING_STRATEGIES, sample_tokens, select_commits, step_schedule, undecided


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


def finalize(tokens: torch.Tensor, stops: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row after its first stop token (kept) and pad the rest: ``(sequences, lengths)``."""
    is_stop = torch.isin(tokens, stops)
    first = is_stop.int().argmax(-1)
    lengths = torch.where(is_stop.any(-1), first + 1, torch.full_like(first, tokens.shape[1]))
    idx = torch.arange(tokens.shape[1], device=tokens.device)
    tokens = tokens.masked_fill(idx[None] >= lengths[:, None], pad)
    return tokens[:, : int(lengths.max()) if lengths.numel() else 0], lengths


def _forward(model, cache: BlockKVCache, kind, block, ids, pos, logits_mask) -> torch.Tensor:
    """Forward ``ids`` into the slots right after the committed length; logits at ``logits_mask``."""
    q0, end = cache.length, cache.length + ids.shape[1]
    mask = dense_mask(kind[:, :end], block[:, :end], q_slice=slice(q0, end))
    return model(
        input_ids=ids, attention_mask=mask, position_ids=pos[None].expand(3, -1, -1),
        past_key_values=cache, logits_mask=logits_mask,
    ).logits


def _prefill(model, ids, am, media, block_len: int, n_blocks: int):
    """Prefill the prompts into a new cache; returns ``(cache, kind, block, start)`` over all slots.

    Prompt slots take kinds/blocks from the padding mask; response block k gets id ceil(P/B) + k (§2);
    ``start`` is each row's first response position (max prompt mRoPE position + 1, on all three axes).
    """
    b, lp = ids.shape
    device = ids.device
    kind_p, block_p = prompt_token_meta(am, block_len)
    resp = torch.arange(n_blocks * block_len, device=device)
    kind = torch.cat([kind_p, torch.full((b, resp.numel()), NOISY, device=device)], 1)
    block = torch.cat([block_p, num_prompt_blocks(am.sum(-1, keepdim=True), block_len) + resp // block_len], 1)
    pos, start = prompt_positions(model, ids, am, media["mm_token_type_ids"], media["image_grid_thw"],
                                  media["video_grid_thw"])
    cache = BlockKVCache(model.config.text_config.num_hidden_layers, lp + n_blocks * block_len)
    model(input_ids=ids, attention_mask=dense_mask(kind[:, :lp], block[:, :lp]), position_ids=pos,
          past_key_values=cache, logits_mask=torch.zeros_like(ids, dtype=torch.bool), **media)
    cache.commit(lp)
    return cache, kind, block, start


class _Streamer:
    """Sends committed blocks to an HF ``BaseStreamer`` (batch 1) or a ``callable(row, tokens)``."""

    def __init__(self, streamer: Any, batch: int, prompt: torch.Tensor, limit: int) -> None:
        self.streamer, self.limit = streamer, limit
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

    def block(self, rows: torch.Tensor, x: torch.Tensor, offset: int, stops: torch.Tensor) -> None:
        """Send a committed block ``x`` of the running ``rows`` at response ``offset`` (eager decoder)."""
        if self.streamer is None:
            return
        stop_set = set(stops.tolist())
        for row, toks in zip(rows.tolist(), x[:, : self.limit - offset].tolist()):
            cut = next((i + 1 for i, t in enumerate(toks) if t in stop_set), len(toks))
            self.emit(row, toks[:cut])

    def end(self) -> None:
        if self.hf:
            self.streamer.end()


@torch.no_grad()
def block_diffusion_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.LongTensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
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
    engine: str = "static",
) -> GenerationOutput:
    """Block-diffusion decoding of (left- or right-) padded prompts; see the module docstring.

    Args:
        input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
            mm_token_type_ids: the processor's outputs for a batch of prompts.
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
        engine: ``static`` (default: :class:`~nemo_bard.generation.engine.DecodeEngine`, static shapes, CUDA
            graphs on GPU), ``compiled`` (the same with ``torch.compile``) or ``eager`` (the reference decoder
            below; same tokens, slower).
    """
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
    stop_list, pad = special_token_ids(model, eos_token_id, stop_token_ids, pad_token_id)
    device = model.device
    stops = torch.tensor(stop_list, dtype=torch.long, device=device)
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    inputs = model_inputs(device, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                          video_grid_thw, mm_token_type_ids)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    stream = _Streamer(streamer, ids.shape[0], ids[:, am[0].bool()], max_new_tokens)
    kwargs = dict(block_size=block_len, schedule=schedule, max_new_tokens=max_new_tokens, mask_token_id=int(
        model.config.mask_token_id), stops=stops, pad=pad, strategy=remasking_strategy,
        threshold=confidence_threshold, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
        fuse_commit=fuse_commit)
    if engine == "eager":
        out = _eager_block_diffusion(model, inputs, stream, **kwargs)
    else:
        session = DecodeEngine.for_model(model, engine).start_block_diffusion(inputs, **kwargs)
        out = run_session(session, stream)
    stream.end()
    return out


def run_session(session: Any, stream: "_Streamer | None" = None) -> GenerationOutput:
    """Drive an engine session to the end, streaming committed blocks; returns its output."""
    live = stream is not None and stream.streamer is not None
    try:
        while not session.done:
            session.step()
            if live:
                for row, tokens in session.collect():
                    stream.emit(row, tokens)
    except BaseException:
        session.close()
        raise
    if live:
        for row, tokens in session.collect():
            stream.emit(row, tokens)
    return session.result()


def model_inputs(device: torch.device, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """The processor's outputs on ``device`` (an all-ones attention mask when none is given)."""
    ids = input_ids.to(device)
    am = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)).long()
    media = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                 video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids)
    return {"input_ids": ids, "attention_mask": am, **{k: v.to(device) if v is not None else None
                                                       for k, v in media.items()}}


def _eager_block_diffusion(model, inputs, stream, *, block_size: int, schedule: list[int], max_new_tokens: int,
                           mask_token_id: int, stops: torch.Tensor, pad: int, strategy: str, threshold: float,
                           temperature: float, top_k: int | None, top_p: float | None,
                           generator: torch.Generator | None, fuse_commit: bool) -> GenerationOutput:
    """The reference decoder (``engine="eager"``): dynamic shapes, rows leave the batch when they finish."""
    block_len, mask_id, device = block_size, mask_token_id, model.device
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    b, lp = ids.shape
    n_blocks = -(-max_new_tokens // block_len)
    t0 = device_sync(device)
    cache, kind, block, start = _prefill(model, ids, am, media, block_len, n_blocks)
    prefill_time = device_sync(device) - t0

    rows = torch.arange(b, device=device)  # original index of each running row
    out = torch.full((b, n_blocks * block_len), pad, dtype=torch.long, device=device)
    row_forwards = torch.zeros(b, dtype=torch.long, device=device)
    num_forwards, pending, offsets = 0, None, torch.arange(block_len, device=device)
    for k in range(n_blocks):
        s0 = lp + k * block_len
        x = torch.full((rows.numel(), block_len), mask_id, dtype=torch.long, device=device)
        x_pos = start[:, None] + k * block_len + offsets
        for n_commit in schedule:
            masked = undecided(x, mask_id, stops)
            if not bool(masked.any()):
                break
            if pending is None:
                logits = _forward(model, cache, kind, block, x, x_pos, masked)
            else:  # fused: commit the finished block and run this block's first step in one forward
                logits = _forward(model, cache, kind, block, torch.cat([pending, x], 1),
                                  torch.cat([x_pos - block_len, x_pos], 1), torch.cat([torch.zeros_like(masked), masked], 1))
                cache.commit(block_len)
                pending = None
            logits[:, mask_id] = float("-inf")  # never produce the mask token
            tok, conf = sample_tokens(logits, temperature, top_k, top_p, generator)
            confidence = torch.full(x.shape, float("-inf"), device=device).masked_scatter(masked, conf)
            commit = select_commits(confidence, masked, n_commit, strategy, threshold)
            x = torch.where(commit, x.masked_scatter(masked, tok), x)
            num_forwards += 1
            row_forwards[rows] += masked.any(-1).long()
        kind[:, s0:s0 + block_len] = CLEAN
        out[rows, k * block_len:(k + 1) * block_len] = x
        stream.block(rows, x, k * block_len, stops)
        if k + 1 == n_blocks:
            break
        done = torch.isin(x, stops).any(-1)
        if bool(done.any()):  # drop finished rows and compact the cache
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            rows, x, start, kind, block = rows[keep], x[keep], start[keep], kind[keep], block[keep]
            cache.select_rows(keep)
        if fuse_commit:
            pending = x
        else:  # unfused: a separate commit forward (rows may have been dropped: recompute positions)
            x_pos = start[:, None] + k * block_len + offsets
            _forward(model, cache, kind, block, x, x_pos, torch.zeros_like(x, dtype=torch.bool))
            cache.commit(block_len)
            num_forwards += 1
            row_forwards[rows] += 1

    sequences, lengths = finalize(out[:, :max_new_tokens], stops, pad)
    wall = device_sync(device) - t0
    return GenerationOutput(
        sequences=sequences, lengths=lengths, num_forwards=num_forwards, row_forwards=row_forwards,
        wall_time=wall, prefill_time=prefill_time, decode_forwards=num_forwards, engine="eager",
    )
