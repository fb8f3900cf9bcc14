"""Convert an autoregressive Qwen3-VL checkpoint directory into a ``bard_vl`` directory.

    python -m nemo_bard.convert --src QWEN3_VL_DIR --dst OUT_DIR [--mask-token-id N] [--block-size B]

Weights are copied byte for byte (no new parameters); ``config.json`` becomes a ``bard_vl`` config
recording ``mask_token_id`` and ``block_size``; processor and tokenizer files are copied, and a
``<|mask|>`` special token is added at the mask id when the tokenizer has none (with
``tokenizers.AddedToken`` and ``save_pretrained``; ids between the tokenizer's last id and the mask id
are filled with reserved tokens, as Qwen3's 151669 and 151670 before ``<|mask|>`` at 151671).

Everything is checked before anything is written (the source config, the structure of every safetensors
file (:func:`nemo_bard.models.verify.verify_model_dir`), the tokenizer and the mask id: it must be an unused
id, not an ordinary token), and the output is written under a temporary name and renamed to ``OUT_DIR``
when complete, with the size and sha256 of each weight file in its completion marker, so a failed or
killed conversion (or a full disk) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from nemo_bard.errors import DiskFullError, UserError, run_reported
from nemo_bard.models.constants import BARD_ARCHITECTURE, DEFAULT_MASK_TOKEN_ID, MASK_TOKEN
from nemo_bard.models.paths import ModelPathError, read_model_config, tokenizer_vocab
from nemo_bard.models.verify import verify_model_dir
from nemo_bard.rundir import COMPLETE_MARKER, atomic_directory, disk_full_message

RESERVED_TOKEN = "<|bard_reserved_{}|>"
SOURCE_MODEL_TYPES = ("qwen3_vl",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ConversionError(UserError):
    """A source/destination problem the user can fix; the message says how."""


def _read_config(src: Path) -> dict:
    try:
        cfg = read_model_config(src, "--src", "pass a Hugging Face Qwen3-VL checkpoint directory")
    except ModelPathError as exc:
        raise ConversionError(str(exc)) from None
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


def _has_tokenizer(src: Path) -> None:
    if not any((src / name).is_file() for name in _TOKENIZER_FILES):
        raise ConversionError(
            f"{src} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}); BARD adds {MASK_TOKEN} to the "
            "tokenizer, so copy the original model's tokenizer and processor files into --src"
        )


def _tokenizer_vocab(src: Path) -> dict[str, int]:
    """Token -> id of the source tokenizer, added tokens included (read with ``tokenizers`` alone when there is a
    ``tokenizer.json``, so a bad mask id is refused without importing transformers)."""
    _has_tokenizer(src)
    try:
        vocab = tokenizer_vocab(src, "pass an intact checkpoint")
    except ModelPathError as exc:
        raise ConversionError(str(exc)) from None
    return vocab if vocab is not None else _load_tokenizer(src).get_vocab()


def _load_tokenizer(src: Path) -> Any:
    """The source tokenizer (transformers ``AutoTokenizer``); a clear error when it is missing or unreadable."""
    _has_tokenizer(src)
    # transformers: ~8 s, after the arguments are checked
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:  # noqa: BLE001  any loader failure is a bad source tokenizer
        raise ConversionError(f"the tokenizer in {src} cannot be loaded ({type(exc).__name__}: {exc})") from None


def plan_mask_token(vocab: dict[str, int], mask_token_id: int | None, vocab_size: int) -> tuple[int, list[str]]:
    """Check the mask id against the tokenizer's ``vocab`` (token -> id, added tokens included) and the
    embedding size; returns ``(mask id, tokens to add)``.

    The tokens to add are the reserved fillers for the ids between the tokenizer's last id and the mask id,
    then ``<|mask|>`` (none when the tokenizer already has ``<|mask|>`` at that id).
    """
    existing = vocab.get(MASK_TOKEN)
    if mask_token_id is None:
        mask_token_id = existing if existing is not None else DEFAULT_MASK_TOKEN_ID
    if not 0 <= mask_token_id < vocab_size:
        raise ConversionError(
            f"--mask-token-id {mask_token_id} is outside the embedding (vocab_size={vocab_size}); pick an unused id "
            f"below {vocab_size} (Qwen3-VL uses {DEFAULT_MASK_TOKEN_ID})"
        )
    if existing is not None:
        if existing != mask_token_id:
            raise ConversionError(
                f"the tokenizer already defines {MASK_TOKEN} at id {existing}, not {mask_token_id}; drop "
                f"--mask-token-id or pass {existing}"
            )
        return mask_token_id, []
    next_free = max(vocab.values()) + 1 if vocab else 0
    token = next((t for t, i in vocab.items() if i == mask_token_id), None)
    if token is not None:
        raise ConversionError(
            f"--mask-token-id {mask_token_id} is the ordinary token {token!r} of the tokenizer; the mask needs an "
            f"unused id: pass --mask-token-id between {next_free} and {vocab_size - 1} (Qwen3-VL uses "
            f"{DEFAULT_MASK_TOKEN_ID})"
        )
    if mask_token_id < next_free:
        raise ConversionError(
            f"--mask-token-id {mask_token_id} lies inside the tokenizer's id range (0..{next_free - 1}) but is unused; "
            f"the tokenizers library cannot place a token there. Use --mask-token-id >= {next_free}"
        )
    return mask_token_id, [RESERVED_TOKEN.format(i) for i in range(next_free, mask_token_id)] + [MASK_TOKEN]


def add_mask_token(tokenizer: Any, tokens: list[str], mask_token_id: int) -> None:
    """Add the reserved fillers and ``<|mask|>`` (special, not normalised) with the tokenizer API."""
    # see _tokenizer_vocab
    from tokenizers import AddedToken

    def added(content: str) -> AddedToken:
        return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)

    if tokens[:-1]:
        tokenizer.add_tokens([added(t) for t in tokens[:-1]], special_tokens=True)
    tokenizer.add_special_tokens({"extra_special_tokens": [added(MASK_TOKEN)]}, replace_extra_special_tokens=False)
    got = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if got != mask_token_id:
        raise ConversionError(
            f"the tokenizer placed {MASK_TOKEN} at id {got}, not {mask_token_id}; pass --mask-token-id {got} "
            "(or the tokenizer's next free id)"
        )


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
    if block_size < 1:
        raise ConversionError(f"--block-size must be >= 1, got {block_size}")
    verify_model_dir(src, checksums=True, what="--src checkpoint")

    vocab = int(cfg["text_config"].get("vocab_size", 151936))
    mask_token_id, new_tokens = plan_mask_token(_tokenizer_vocab(src), mask_token_id, vocab)
    tokenizer = _load_tokenizer(src)
    if new_tokens:
        add_mask_token(tokenizer, new_tokens, mask_token_id)
    # transformers' Qwen3-VL stack: after the checks
    from nemo_bard.models.configuration_bard_vl import BardVLConfig

    try:
        bard_cfg = BardVLConfig.from_qwen3_vl(cfg, mask_token_id=mask_token_id, block_size=block_size)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{src}/config.json cannot be read as a Qwen3-VL config: {exc}") from None
    bard_cfg.architectures = [BARD_ARCHITECTURE]

    marker = {"source": str(src.absolute()), "mask_token_id": mask_token_id}
    try:
        with atomic_directory(dst, marker=marker, checksums=True) as tmp:
            for p in src.iterdir():
                if p.is_file() and p.name not in ("config.json", COMPLETE_MARKER):
                    shutil.copy2(p, tmp / p.name)
            bard_cfg.save_pretrained(tmp)
            if new_tokens:
                tokenizer.save_pretrained(tmp)
    except Exception as exc:  # noqa: BLE001  only a full disk is translated; anything else propagates
        full = disk_full_message(exc, dst)
        if full is None:
            raise
        raise DiskFullError(f"{full}: the conversion to {dst} was not completed (nothing was written there); free "
                            "space, then run the same command") from exc
    return dst


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, printed as one line)."""
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="Qwen3-VL (autoregressive) checkpoint directory")
    ap.add_argument("--dst", required=True, help="new or empty output directory")
    ap.add_argument("--mask-token-id", "--mask_token_id", type=int, default=None,
                    help=f"mask token id (default: the tokenizer's {MASK_TOKEN}, else {DEFAULT_MASK_TOKEN_ID})")
    ap.add_argument("--block-size", "--block_size", type=int, default=32, help="block size recorded in the config")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = ap.parse_args(argv)
    if args.debug:
        os.environ["NEMO_BARD_DEBUG"] = "1"

    def run() -> int:
        out = convert(args.src, args.dst, args.mask_token_id, args.block_size)
        cfg = json.loads((out / "config.json").read_text())
        print(f"wrote bard_vl checkpoint to {out} (mask_token_id={cfg['mask_token_id']}, block_size={cfg['block_size']})")
        return 0

    return run_reported("nemo_bard.convert", run)


if __name__ == "__main__":
    sys.exit(main())
