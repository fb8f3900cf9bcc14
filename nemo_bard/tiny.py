"""Write a tiny random-init *autoregressive* Qwen3-VL checkpoint + processor, fully offline.

    python -m nemo_bard.tiny DIR [--preset test|demo] [--seed 0]

The tokenizer is a byte-level BPE trained on a fixed in-code corpus with the
Qwen special tokens (same names and order as Qwen3) plus ``<|mask|>``; every
digit is its own token. The processor is a ``Qwen3VLProcessor`` (patch 16,
merge 2, mean/std 0.5) with a Qwen-VL chat template and small image sizes.
The result is the fixture for the tests and the start of the offline demo;
it is deterministic given the seed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from nemo_bard.models.constants import MASK_TOKEN

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]

# Qwen-VL style chat template: string or list content; image/video items become vision placeholders.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of a tiny Qwen3-VL."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    bpe_vocab: int = 320


PRESETS = {
    # Unit/e2e tests: ~0.3M parameters, milliseconds per forward.
    "test": TinyPreset(64, 2, 4, 2, 16, 128, (4, 2, 2), 2, 32, 2),
    # Offline digits demo: ~1M parameters (see shared digits notes).
    "demo": TinyPreset(128, 2, 4, 2, 32, 512, (6, 5, 5), 2, 64, 2),
}


def _corpus() -> list[str]:
    """A fixed, offline training corpus for the BPE (instructions, answers, digits)."""
    words = (
        "Read the digits. Describe the image. What is written? Answer the question. What is the number? "
        "read describe image picture written answer question number sum color count video frame left right "
        "top bottom first second third yes no the a an of in on with and or is are was were please give short "
        "detailed system user assistant hello world cat dog red green blue black white You are a helpful assistant."
    ).split()
    lines = []
    for i in range(600):
        w = [words[(i * 7 + j * 13) % len(words)] for j in range(10)]
        lines.append(" ".join(w) + f" {i} + {i * 3 % 97} = {i + i * 3 % 97}")
    return lines


def build_tokenizer(bpe_vocab: int = 320):
    """Train the byte-level BPE and wrap it as a fast HF tokenizer with the Qwen specials + ``<|mask|>``."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    # Qwen2/3 split pattern: letters, single digits, punctuation runs, whitespace.
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tok.add_tokens(QWEN_ADDED_TOKENS)
    tok.add_special_tokens([MASK_TOKEN])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    fast.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    return fast


def build_processor(tokenizer, min_pixels: int = 32 * 32, max_pixels: int = 256 * 256):
    """Qwen3-VL processor with small image bounds (a 64x64 image becomes 4 visual tokens)."""
    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **common)
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 4}, fps=2, min_frames=2, max_frames=8,
        **common,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, preset: TinyPreset):
    """A Qwen3-VL config sized by ``preset`` with the tokenizer's special-token ids."""
    vocab = ((len(tokenizer) + 31) // 32) * 32  # a few unused rows, as in Qwen's 151,936-row embedding
    ids = tokenizer.convert_tokens_to_ids
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=preset.hidden, intermediate_size=preset.mlp,
            num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
            num_key_value_heads=preset.kv_heads, head_dim=preset.head_dim, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                             "mrope_section": list(preset.mrope_section), "mrope_interleaved": True},
            tie_word_embeddings=False, pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=preset.vision_depth, hidden_size=preset.vision_hidden, intermediate_size=preset.vision_hidden * 2,
            num_heads=preset.vision_heads, out_hidden_size=preset.hidden, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    cfg.eos_token_id = ids("<|im_end|>")
    return cfg


def write_tiny_model(out_dir: str | Path, preset: str = "test", seed: int = 0, layers: int | None = None) -> Path:
    """Write a tiny AR Qwen3-VL directory (weights, config, processor, tokenizer) to ``out_dir``; ``layers``
    replaces the preset's number of text decoder layers."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset] if layers is None else replace(PRESETS[preset], layers=layers)
    tokenizer = build_tokenizer(p.bpe_vocab)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, p)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {"preset": preset, "seed": seed, "layers": p.layers}
    (out / "nemo_bard_tiny.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="empty or new directory to write")
    ap.add_argument("--preset", default="test", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="text decoder layers (default: the preset's)")
    args = ap.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers must be at least 1, got {args.layers}")
    out = write_tiny_model(args.out_dir, args.preset, args.seed, args.layers)
    n = sum(1 for _ in out.iterdir())
    print(f"wrote tiny Qwen3-VL ({args.preset}, seed {args.seed}) to {out} ({n} files)")


if __name__ == "__main__":
    main()
