"""Export a (possibly FSDP2-sharded) ``bard_vl`` model as a Hugging Face directory, atomically.

All ranks take part in gathering the full state dict; rank 0 writes it with transformers'
``save_pretrained`` (safetensors shards of at most ``max_shard_size`` plus
``model.safetensors.index.json`` when there is more than one, ``config.json`` with ``model_type:
bard_vl`` and the given block size, ``generation_config.json``) and the processor/tokenizer files,
into a temporary sibling directory that is renamed into place with a completion marker once
everything is written (:func:`nemo_bard.rundir.atomic_directory`; the marker records each weight
file's size and sha256, which :func:`nemo_bard.models.verify.verify_model_dir` checks before the directory
is used). The result loads with ``from_pretrained`` and can serve as an SWD teacher; a killed export
leaves no directory that looks finished.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from nemo_bard.models.constants import BARD_ARCHITECTURE
from nemo_bard.models.modeling_bard_vl import BardVLForConditionalGeneration
from nemo_bard.rundir import atomic_directory, remove_stale_temporaries

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (a collective under FSDP2: call on every rank)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def save_bard_dir(
    state: dict[str, torch.Tensor],
    config: Any,
    out_dir: str | Path,
    *,
    generation_config: Any = None,
    processor: Any = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    marker: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` (a full state dict) with ``config`` as an HF ``bard_vl`` directory at ``out_dir``.

    The weights go through ``BardVLForConditionalGeneration.save_pretrained`` on a meta-device shell (no
    memory for a second copy), sharded at ``max_shard_size``; an existing ``out_dir`` is replaced only
    once the new one is complete.
    """
    out = Path(out_dir)
    remove_stale_temporaries(out)
    with torch.device("meta"):
        shell = BardVLForConditionalGeneration(config)
    if generation_config is not None:
        shell.generation_config = generation_config
    with atomic_directory(out, replace=True, marker=marker, checksums=True) as tmp:
        shell.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
    return out


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    processor: Any = None,
    block_size: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` as an HF ``bard_vl`` directory (collective; rank 0 writes); returns the path.

    ``state_dict``: the full state dict to write (e.g. with LoRA adapters merged; empty on ranks other than
    0); default: gathered from ``model`` here.
    """
    out = Path(out_dir)
    state = full_state_dict(model) if state_dict is None else state_dict
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        config = copy.deepcopy(model.config)
        if block_size is not None:
            config.block_size = int(block_size)
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                 for k, v in state.items()}
        config.architectures = [BARD_ARCHITECTURE]
        if dtype is not None:
            config.dtype = dtype
        save_bard_dir(state, config, out, generation_config=getattr(model, "generation_config", None),
                      processor=processor, max_shard_size=max_shard_size,
                      marker={"block_size": config.block_size})
        logger.info("exported bard_vl model (block_size=%s) to %s", config.block_size, out)
    if dist.is_initialized():
        dist.barrier()
    return out


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "export_hf", "full_state_dict", "save_bard_dir"]
