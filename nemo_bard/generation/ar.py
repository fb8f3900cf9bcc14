"""Autoregressive baseline on an ordinary Qwen3-VL: the engine's one-token steps, or Hugging Face ``generate``."""

from __future__ import annotations

import copy

import torch

from nemo_bard.generation.decode import model_inputs, special_token_ids
from nemo_bard.generation.engine import DecodeEngine, batch_bucket, device_sync
from nemo_bard.generation.output import GenerationOutput
from nemo_bard.generation.points import AR_ENGINES
from nemo_bard.generation.session import ARSession, RowRequest, cut_after_stop, pad_rows, run_to_end


@torch.no_grad()
def ar_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    engine: str = "static",
    **processor_outputs: torch.Tensor | None,
) -> GenerationOutput:
    """Greedy AR decoding of left-padded prompts; one forward per generated token (TPF 1). ``processor_outputs``:
    the processor's other outputs (media, ``mm_token_type_ids``) as one mapping.

    ``engine="static"`` (or ``compiled`` / ``eager``) runs it on the decoding loop of block diffusion
    (:class:`~nemo_bard.generation.session.ARSession`: causal prompt prefill, then one-token steps on the same
    static cache and graphs): the like-for-like baseline. ``engine="hf"`` calls Hugging Face ``generate``.
    """
    if engine not in AR_ENGINES:
        raise ValueError(f"AR engine {engine!r} is not one of {AR_ENGINES}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops, pad = special_token_ids(model, eos_token_id, None, pad_token_id)
    device = model.device
    inputs = model_inputs(device, input_ids=input_ids, attention_mask=attention_mask, **processor_outputs)
    batch = input_ids.shape[0]
    if engine != "hf":
        dec = DecodeEngine.for_model(model, engine)
        dec.check_positions(input_ids.shape[1] + max_new_tokens)
        session = ARSession(dec, rows=batch_bucket(batch), capacity=dec.capacity_for(input_ids.shape[1] + max_new_tokens),
                            stops=stops, pad=pad)
        return run_to_end(session, [RowRequest(i, max_new_tokens) for i in range(batch)], inputs)
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
    new = out[:, input_ids.shape[1]:].tolist()
    sequences, lengths = pad_rows([cut_after_stop(row, set(stops))[0] for row in new], pad)
    width = len(new[0]) if new else 0
    return GenerationOutput(
        sequences=sequences, lengths=lengths, num_forwards=width, row_forwards=lengths.clone(),
        wall_time=wall, prefill_time=None, decode_forwards=max(width - 1, 0), engine="hf",
    )
