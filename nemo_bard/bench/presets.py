"""Randomly initialised Qwen3-VL models of real shapes, built directly on the device (nothing to download).

A preset gives the text and vision sizes of a released Qwen3-VL (the real 151,936-row vocabulary included);
the tokenizer and processor are the tiny offline ones of :mod:`nemo_bard.tiny` (their ids are a small part
of the vocabulary), which is all the decoding and training *mechanics* need. :func:`build_preset` returns
an AR model, a ``bard_vl`` model sharing its weights, and the processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen3VLConfig

import nemo_bard.models.modeling_bard_vl  # noqa: F401  (registers bard_vl with the Auto classes)
from nemo_bard.models import BardVLConfig
from nemo_bard.tiny import build_processor, build_tokenizer


@dataclass(frozen=True)
class ShapePreset:
    """Sizes of a Qwen3-VL (text decoder and vision tower)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vision_depth: int
    vision_hidden: int
    vision_mlp: int
    deepstack: tuple[int, ...]
    tie_embeddings: bool
    head_dim: int = 128
    vocab: int = 151936
    vision_heads: int = 16
    mrope_section: tuple[int, int, int] = (24, 20, 20)


PRESETS: dict[str, ShapePreset] = {
    "qwen3vl_2b": ShapePreset(2048, 28, 16, 8, 6144, 24, 1024, 4096, (5, 11, 17), True),
    "qwen3vl_4b": ShapePreset(2560, 36, 32, 8, 9728, 24, 1024, 4096, (5, 11, 17), True),
    "qwen3vl_8b": ShapePreset(4096, 36, 32, 8, 12288, 27, 1152, 4304, (8, 16, 24), False),
    # the same code path at a size a CPU test runs in seconds
    "tiny": ShapePreset(64, 2, 4, 2, 128, 2, 32, 64, (0,), False, head_dim=16, vocab=4096, vision_heads=2,
                        mrope_section=(4, 2, 2)),
}


def preset_config(name: str, tokenizer: Any, block_size: int = 32):
    """``(AR Qwen3VLConfig, BardVLConfig)`` of preset ``name`` with the tokenizer's special-token ids."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    ids = tokenizer.convert_tokens_to_ids
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.mlp, num_hidden_layers=p.layers,
            num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, head_dim=p.head_dim,
            max_position_embeddings=32768, tie_word_embeddings=p.tie_embeddings, pad_token_id=ids("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": list(p.mrope_section),
                             "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=p.vision_depth, hidden_size=p.vision_hidden, intermediate_size=p.vision_mlp, num_heads=p.vision_heads,
            out_hidden_size=p.hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=2304, deepstack_visual_indexes=list(p.deepstack),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=p.tie_embeddings,
    )
    cfg.eos_token_id = ids("<|im_end|>")
    bard = BardVLConfig.from_qwen3_vl(cfg, mask_token_id=ids("<|mask|>"), block_size=block_size)
    return cfg, bard


@torch.no_grad()
def build_preset(name: str, device: str | torch.device, dtype: torch.dtype, block_size: int = 32):
    """``(ar_model, bard_model, processor)``: random weights of preset ``name`` on ``device``, shared by both models."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    ar_cfg, bard_cfg = preset_config(name, tokenizer, block_size)
    gen = GenerationConfig(eos_token_id=ar_cfg.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    torch.manual_seed(0)
    with torch.device(device):
        ar = AutoModelForImageTextToText.from_config(ar_cfg, dtype=dtype)
    with torch.device("meta"):
        bard = AutoModelForImageTextToText.from_config(bard_cfg, dtype=dtype)
    bard.load_state_dict(ar.state_dict(), assign=True)  # the same tensors: no second copy of the weights
    # buffers outside the state dict (rotary inverse frequencies) are shared too
    saved = set(ar.state_dict())
    for (name, mod_bard), (_, mod_ar) in zip(bard.named_modules(), ar.named_modules()):
        for key, buf in mod_ar.named_buffers(recurse=False):
            if f"{name}.{key}".lstrip(".") not in saved:
                mod_bard.register_buffer(key, buf, persistent=False)
    if bard_cfg.tie_word_embeddings:
        bard.tie_weights()
    for model in (ar, bard):
        model.generation_config = gen
        model.eval()
    return ar, bard, processor


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
