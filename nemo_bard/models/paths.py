"""Checks on model directories that need no model (standard library, and ``tokenizers`` for a tokenizer file), so
front ends run them first."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nemo_bard.errors import UserError


class ModelPathError(UserError):
    """A model path that is missing or holds no readable config.json; the message names the file."""


def looks_like_hub_id(path: str) -> bool:
    """True for ``org/name`` that can only be a Hugging Face Hub id: exactly one ``/``, not absolute or
    ``./``-relative, nothing of that name here (not even its first component), and Hub access not turned
    off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    p = str(path)
    if os.path.isabs(p) or p.startswith(".") or p.count("/") != 1 or os.path.exists(p):
        return False
    return not os.path.exists(p.split("/", 1)[0])


def read_model_config(path: str | os.PathLike, what: str = "model", fix: str = "") -> dict | None:
    """``config.json`` of a local model directory as a dict (None for a Hub id).

    Raises :class:`ModelPathError` naming ``what`` and the file when the directory does not exist or its
    config.json is missing, empty or not JSON; ``fix`` is appended to the message.
    """
    p = str(path)
    if looks_like_hub_id(p):
        return None
    hint = f"; {fix}" if fix else ""
    if not os.path.isdir(p):
        raise ModelPathError(f"{what} directory {p} not found{hint}")
    cfg = Path(p) / "config.json"
    if not cfg.is_file():
        raise ModelPathError(f"{what} directory {p} has no config.json; it is not a Hugging Face model directory{hint}")
    text = cfg.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ModelPathError(f"{cfg} is empty (0 bytes; an interrupted write?); re-create or re-export {p}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelPathError(f"{cfg} is not valid JSON (line {exc.lineno}: {exc.msg}); re-create or re-export {p}") from None
    if not isinstance(data, dict):
        raise ModelPathError(f"{cfg} does not hold a JSON object; re-create or re-export {p}")
    return data


def tokenizer_vocab(path: str | os.PathLike, fix: str = "") -> dict[str, int] | None:
    """Token -> id of a local directory's ``tokenizer.json``, added tokens included (the ``tokenizers`` library
    alone, no transformers), or None when it has none. Raises :class:`ModelPathError` naming the file when it
    cannot be parsed; ``fix`` is appended to the message."""
    tok = os.path.join(str(path), "tokenizer.json")
    if not os.path.isfile(tok):
        return None
    # tokenizers (~0.1 s) rather than transformers (~8 s): front ends compare tokenizers before any model loads
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(tok).get_vocab(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001  any parse failure is a damaged file, the user's to fix
        raise ModelPathError(f"{tok} cannot be read ({exc})" + (f"; {fix}" if fix else "")) from None


__all__ = ["ModelPathError", "looks_like_hub_id", "read_model_config", "tokenizer_vocab"]
