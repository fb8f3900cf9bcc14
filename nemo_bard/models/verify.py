"""Checkpoints are verified before they are trusted.

:func:`verify_model_dir` checks every safetensors file of a model directory (``model.safetensors``, or the
shards listed by ``model.safetensors.index.json``) without loading a tensor: the 8-byte header length, a JSON
header, every tensor's ``data_offsets`` inside the file and matching its dtype and shape, and the file size equal
to header + data end. A directory written by nemo-bard (a stage or final export, a conversion) also carries
the size and sha256 of each weight file in its completion marker (``.nemo_bard_complete``, written by
:func:`weight_checksums` at export): sizes are always compared, the sha256 when ``checksums=True``.

Cost of the checksum (measured on this project's shared 2-core CPU, files in the page cache): sha256 (OpenSSL
with SHA extensions, one core) hashes a 419 MB ``model.safetensors`` in 0.40-0.48 s (~1 GB/s; 1.29 GB/s on raw
bytes), so ~16 s for an 8B model in bf16 (16 GB), plus reading the files when they are not cached; the structure
check takes under 5 ms. safetensors maps the same file in 0.02 s, so hashing would dominate loading a model for
one prompt. Hence: training start verifies the checksums (seconds against hours; ``bard.verify_checksums``),
``python -m nemo_bard.generate`` only with ``--verify``; the structure and size checks always run.

Standard library only, so front ends run it before any heavy import.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from nemo_bard.errors import UserError
from nemo_bard.rundir import COMPLETE_MARKER, SAFETENSORS, SAFETENSORS_INDEX, file_sha256, weight_checksums

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class CheckpointCorrupt(UserError):
    """A model file that is truncated, damaged or differs from what was written; the message names the file."""


def _damaged(path: Path, what: str, fix: str) -> CheckpointCorrupt:
    return CheckpointCorrupt(f"{path} is damaged: {what}; {fix}")


def check_safetensors(path: str | Path, fix: str = "re-export or re-copy the model") -> dict[str, Any]:
    """Check one safetensors file's structure (header and offsets against the file size); returns its header.

    Raises :class:`CheckpointCorrupt` naming the file and what is wrong.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, too short for a safetensors header (truncated?)", fix)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _damaged(path, f"its header claims {n} bytes but the file holds {size} (truncated?)", fix)
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointCorrupt(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "its header is not valid JSON (overwritten?)", fix) from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object", fix)
    data_size, end = size - 8 - n, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            count = math.prod(int(d) for d in info["shape"])
            width = _DTYPE_BYTES.get(str(info["dtype"]))
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"the header entry of tensor {name!r} is malformed", fix) from None
        if not 0 <= begin <= stop <= data_size:
            raise _damaged(path, f"tensor {name!r} lies at bytes {begin}..{stop} of the data but the file holds "
                                 f"{data_size} bytes of data (truncated?)", fix)
        if width is not None and stop - begin != count * width:
            raise _damaged(path, f"tensor {name!r} spans {stop - begin} bytes, its dtype and shape need "
                                 f"{count * width}", fix)
        end = max(end, stop)
    if end != data_size:
        raise _damaged(path, f"{data_size - end} bytes after the last tensor (the file is {size} bytes, its header "
                             f"accounts for {8 + n + end})", fix)
    return header


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, else ``model.safetensors``, else every
    ``*.safetensors`` (e.g. ``adapter_model.safetensors``). Raises :class:`CheckpointCorrupt` for an unreadable
    index or a shard it lists that is missing."""
    d = Path(model_dir)
    index = d / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointCorrupt(f"{index} is not a readable safetensors index (no weight_map); re-export or "
                                    f"re-copy {d}") from None
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise CheckpointCorrupt(f"{d / missing[0]} is missing (listed in {index.name}); re-export or re-copy {d}")
        return [d / s for s in shards]
    if (d / SAFETENSORS).is_file():
        return [d / SAFETENSORS]
    return sorted(d.glob("*.safetensors"))


def _recorded(d: Path) -> dict[str, dict[str, Any]]:
    try:
        files = json.loads((d / COMPLETE_MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def verify_model_dir(model_dir: str | Path, *, checksums: bool = False, what: str = "model") -> list[Path]:
    """Verify the weight files of ``model_dir`` before it is used; returns the files checked.

    Always: every safetensors file's structure (:func:`check_safetensors`) and, when the completion marker records
    them, each weight file's size. With ``checksums``: each recorded sha256 too. A directory with no safetensors
    (``*.bin`` weights, a Hub id) passes; what it lacks is for the loader to report. Raises
    :class:`CheckpointCorrupt` naming the file and the fix (``what`` names the role, e.g. ``SWD teacher``).
    """
    d = Path(model_dir)
    if not d.is_dir():
        return []
    fix = f"re-export or re-copy the {what} {d}"
    recorded = _recorded(d)
    for name, rec in recorded.items():
        p = d / name
        if not p.is_file():
            raise CheckpointCorrupt(f"{p} is missing (it was written with this {what}); {fix}")
        size = p.stat().st_size
        if isinstance(rec, dict) and rec.get("size") is not None and size != rec["size"]:
            cause = "truncated?" if size < rec["size"] else "overwritten?"
            raise _damaged(p, f"{size} bytes, {rec['size']} when it was written ({cause})", fix)
    files = weight_files(d)
    for p in files:
        check_safetensors(p, fix)
    if checksums:
        for name, rec in recorded.items():
            want = rec.get("sha256") if isinstance(rec, dict) else None
            if want and file_sha256(d / name) != want:
                raise _damaged(d / name, "its sha256 differs from the one recorded when it was written (the bytes "
                                         "changed on disk)", fix)
    return files


__all__ = [
    "CheckpointCorrupt",
    "check_safetensors",
    "file_sha256",
    "verify_model_dir",
    "weight_checksums",
    "weight_files",
]
