"""Export a (possibly FSDP2-sharded) ``bard_vl`` model as a Hugging Face directory.

All ranks take part in gathering the full state dict; rank 0 writes ``model.safetensors``,
``config.json`` (``model_type: bard_vl`` with the given block size), the processor/tokenizer files
and ``generation_config.json``. The result loads with ``from_pretrained`` and can serve as an SWD
teacher.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (a collective under FSDP2: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    processor: Any = None,
    block_size: int | None = None,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` as an HF ``bard_vl`` directory; returns the path.

    ``state_dict``: the full state dict to write (e.g. with LoRA adapters merged; empty on ranks other than
    0); default: gathered from ``model`` here.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = full_state_dict(model) if state_dict is None else state_dict
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(model.config)
        if block_size is not None:
            config.block_size = int(block_size)
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                   for k, v in state.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        config.architectures = ["BardVLForConditionalGeneration"]
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(out)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(out)
        if processor is not None:
            processor.save_pretrained(out)
        logger.info("exported bard_vl model (block_size=%s) to %s", config.block_size, out)
    if dist.is_initialized():
        dist.barrier()
    return out
