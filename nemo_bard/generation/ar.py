"""Autoregressive baseline: greedy Hugging Face ``generate`` (KV cache) on an ordinary Qwen3-VL."""

from __future__ import annotations

import copy

import torch

from nemo_bard.generation.decode import _sync, finalize, special_token_ids
from nemo_bard.generation.output import GenerationOutput


@torch.no_grad()
def ar_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.LongTensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """Greedy AR decoding of left-padded prompts; one forward per generated token (TPF 1 at batch 1)."""
    stops, pad = special_token_ids(model, eos_token_id, None, pad_token_id)
    device = model.device
    inputs = dict(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
    )
    inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}
    t0 = _sync(device)
    # Greedy; eos = our stop ids. With none, an id outside the vocabulary (HF would fall back to the config eos).
    never = model.config.get_text_config().vocab_size
    config = copy.deepcopy(model.generation_config)
    config.update(
        max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, eos_token_id=stops or [never],
        pad_token_id=pad, temperature=None, top_k=None, top_p=None,
    )
    out = model.generate(**inputs, generation_config=config)
    wall = _sync(device) - t0
    new = out[:, input_ids.shape[1]:]
    sequences, lengths = finalize(new, torch.tensor(stops, dtype=torch.long, device=new.device), pad)
    num_forwards = new.shape[1]
    return GenerationOutput(
        sequences=sequences, lengths=lengths, num_forwards=num_forwards, row_forwards=lengths.clone(),
        tokens_per_forward=float(lengths.sum()) / max(num_forwards, 1), wall_time=wall, prefill_time=None,
    )
