"""Convert an autoregressive Qwen3-VL checkpoint directory into a ``bard_vl`` directory.

    python -m nemo_bard.convert --src QWEN3_VL_DIR --dst OUT_DIR [--mask-token-id N] [--block-size B]

Weights are copied byte for byte (no new parameters); ``config.json`` becomes a
``bard_vl`` config recording ``mask_token_id`` and ``block_size``; processor and
tokenizer files are copied, and a ``<|mask|>`` special token is added at the
mask id when the tokenizer has none.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from nemo_bard.models.configuration_bard_vl import BARD_ARCHITECTURE, DEFAULT_MASK_TOKEN_ID, BardVLConfig

MASK_TOKEN = "<|mask|>"
SOURCE_MODEL_TYPES = ("qwen3_vl",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """A source/destination problem the user can fix; the message says how."""


def _read_config(src: Path) -> dict:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{src} has no config.json; --src must be a Hugging Face Qwen3-VL checkpoint directory")
    cfg = json.loads(cfg_path.read_text())
    model_type = cfg.get("model_type")
    if model_type == "bard_vl":
        raise ConversionError(
            f"{src} is already a bard_vl checkpoint (config.json model_type 'bard_vl'); it loads as is, "
            "no conversion needed"
        )
    if model_type not in SOURCE_MODEL_TYPES or "text_config" not in cfg or "vision_config" not in cfg:
        raise ConversionError(
            f"{src}/config.json has model_type {model_type!r}; nemo_bard.convert needs a Qwen3-VL checkpoint "
            f"(model_type one of {SOURCE_MODEL_TYPES} with text_config and vision_config)"
        )
    return cfg


def _tokenizer_mask_id(src: Path) -> int | None:
    tok_json = src / "tokenizer.json"
    if not tok_json.is_file():
        return None
    for tok in json.loads(tok_json.read_text()).get("added_tokens", []):
        if tok.get("content") == MASK_TOKEN:
            return int(tok["id"])
    return None


def _add_mask_token(dst: Path, mask_id: int) -> bool:
    """Record ``<|mask|>`` at ``mask_id`` in tokenizer.json / tokenizer_config.json; False if it was there."""
    tok_json = dst / "tokenizer.json"
    if not tok_json.is_file():
        return False
    data = json.loads(tok_json.read_text())
    added = data.setdefault("added_tokens", [])
    for tok in added:
        if tok.get("id") == mask_id:
            if tok.get("content") != MASK_TOKEN:
                raise ConversionError(
                    f"tokenizer id {mask_id} is already the token {tok.get('content')!r}; pass a free id with "
                    "--mask-token-id"
                )
            return False
    vocab_ids = set(data.get("model", {}).get("vocab", {}).values())
    if mask_id in vocab_ids:
        raise ConversionError(
            f"tokenizer id {mask_id} is a regular vocabulary token; pass an unused id with --mask-token-id"
        )
    used = vocab_ids | {int(t["id"]) for t in added}
    next_free = max(used) + 1 if used else 0
    if mask_id < next_free:
        raise ConversionError(
            f"tokenizer id {mask_id} lies inside the tokenizer's id range (0..{next_free - 1}) but is unused; the "
            f"tokenizers library cannot place a token there. Use --mask-token-id >= {next_free}"
        )
    # `tokenizers` numbers added tokens contiguously, so reserve the unused ids below the mask id
    # (Qwen3: 151669 and 151670 before <|mask|> at 151671).
    entry = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    new = [{"id": i, "content": f"<|bard_reserved_{i}|>", **entry} for i in range(next_free, mask_id)]
    new.append({"id": mask_id, "content": MASK_TOKEN, **entry})
    added.extend(new)
    tok_json.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    cfg_path = dst / "tokenizer_config.json"
    if cfg_path.is_file():
        tcfg = json.loads(cfg_path.read_text())
        decoder = tcfg.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            decoder.update({str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in new})
        extra = tcfg.get("extra_special_tokens") or tcfg.get("additional_special_tokens")
        if isinstance(extra, list) and MASK_TOKEN not in extra:
            extra.append(MASK_TOKEN)
        cfg_path.write_text(json.dumps(tcfg, ensure_ascii=False, indent=2))
    return True


def convert(
    src: str | Path, dst: str | Path, mask_token_id: int | None = None, block_size: int = 32
) -> Path:
    """Write a ``bard_vl`` checkpoint at ``dst`` from the Qwen3-VL checkpoint at ``src``; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"--src {src} does not exist or is not a directory")
    cfg = _read_config(src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"--dst {dst} exists and is not empty; choose a new or empty directory")
    weights = [p for p in src.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name in _WEIGHT_INDEXES]
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in weights):
        raise ConversionError(f"{src} holds no weight files (*.safetensors / *.bin)")

    vocab = int(cfg["text_config"].get("vocab_size", 151936))
    tok_mask = _tokenizer_mask_id(src)
    if mask_token_id is None:
        mask_token_id = tok_mask if tok_mask is not None else DEFAULT_MASK_TOKEN_ID
    if not 0 <= mask_token_id < vocab:
        raise ConversionError(
            f"--mask-token-id {mask_token_id} is outside the embedding (vocab_size={vocab}); pick an unused id "
            f"below {vocab} (Qwen3-VL uses {DEFAULT_MASK_TOKEN_ID})"
        )
    if tok_mask is not None and tok_mask != mask_token_id:
        raise ConversionError(
            f"the tokenizer already defines {MASK_TOKEN} at id {tok_mask}, not {mask_token_id}; drop "
            f"--mask-token-id or pass {tok_mask}"
        )
    if block_size < 1:
        raise ConversionError(f"--block-size must be >= 1, got {block_size}")

    bard_cfg = BardVLConfig.from_qwen3_vl(cfg, mask_token_id=mask_token_id, block_size=block_size)
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "config.json":
            shutil.copy2(p, dst / p.name)
    bard_cfg.architectures = [BARD_ARCHITECTURE]
    bard_cfg.save_pretrained(dst)
    _add_mask_token(dst, mask_token_id)
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="Qwen3-VL (autoregressive) checkpoint directory")
    ap.add_argument("--dst", required=True, help="new or empty output directory")
    ap.add_argument("--mask-token-id", "--mask_token_id", type=int, default=None,
                    help=f"mask token id (default: the tokenizer's {MASK_TOKEN}, else {DEFAULT_MASK_TOKEN_ID})")
    ap.add_argument("--block-size", "--block_size", type=int, default=32, help="block size recorded in the config")
    args = ap.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.mask_token_id, args.block_size)
    except ConversionError as exc:
        raise SystemExit(f"nemo_bard.convert: error: {exc}") from None
    cfg = json.loads((out / "config.json").read_text())
    print(f"wrote bard_vl checkpoint to {out} (mask_token_id={cfg['mask_token_id']}, block_size={cfg['block_size']})")


if __name__ == "__main__":
    main()
