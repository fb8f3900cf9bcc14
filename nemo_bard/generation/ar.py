"""Autoregressive baseline on an ordinary Qwen3-VL: the engine's one-token steps, or Hugging Face ``generate``."""

from __future__ import annotations

import copy

import torch

from nemo_bard.generation.decode import finalize, model_inputs, run_session, special_token_ids
from nemo_bard.generation.engine import DecodeEngine, device_sync
from nemo_bard.generation.output import GenerationOutput

AR_ENGINES = ("static", "compiled", "hf")


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
    engine: str = "static",
) -> GenerationOutput:
    """Greedy AR decoding of left-padded prompts; one forward per generated token (TPF 1).

    ``engine="static"`` runs it on :class:`~nemo_bard.generation.engine.DecodeEngine` (causal prompt prefill,
    then one-token steps on the same static cache and graphs as block diffusion): the like-for-like baseline.
    ``engine="compiled"`` adds ``torch.compile``; ``engine="hf"`` calls Hugging Face ``generate`` (dynamic cache).
    """
    if engine not in AR_ENGINES:
        raise ValueError(f"AR engine {engine!r} is not one of {AR_ENGINES}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops, pad = special_token_ids(model, eos_token_id, None, pad_token_id)
    device = model.device
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    inputs = model_inputs(device, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                          video_grid_thw, mm_token_type_ids)
    if engine != "hf":
        session = DecodeEngine.for_model(model, engine).start_ar(inputs, max_new_tokens=max_new_tokens, stops=stop_t, pad=pad)
        return run_session(session)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    t0 = device_sync(device)
    # Greedy; eos = our stop ids. With none, an id outside the vocabulary (HF would fall back to the config eos).
    never = model.config.get_text_config().vocab_size
    config = copy.deepcopy(model.generation_config)
    config.update(
        max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, eos_token_id=stops or [never],
        pad_token_id=pad, temperature=None, top_k=None, top_p=None,
    )
    out = model.generate(**inputs, generation_config=config)
    wall = device_sync(device) - t0
    new = out[:, input_ids.shape[1]:]
    sequences, lengths = finalize(new, stop_t.to(new.device), pad)
    return GenerationOutput(
        sequences=sequences, lengths=lengths, num_forwards=new.shape[1], row_forwards=lengths.clone(),
        wall_time=wall, prefill_time=None, decode_forwards=max(new.shape[1] - 1, 0), engine="hf",
    )
