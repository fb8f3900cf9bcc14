"""Chat-format datasets: ``datasets.save_to_disk`` directories (the published BARD format) and JSONL.

A row holds ``messages`` (a list, or a JSON string) of ``{role, content}`` turns with roles
system/user/assistant; ``content`` is a string or a list of items
``{"type": "text", "text": ...}``, ``{"type": "image", "image": <path | {"bytes": ...} | {"path": ...}>}``
or ``{"type": "video", "video": <file | frame directory | [frame paths] | {"bytes": ...}>}`` (see
:mod:`nemo_bard.data.media`). Relative paths resolve against ``root_dir``. Optional columns ``length``
(tokens) and ``v_tokens`` (visual tokens) feed length-aware batching.

JSONL is read with ``datasets.load_dataset("json")``; a line that is not JSON, a ``messages`` string
that is not JSON, a 0-row dataset or an empty file is an error naming the file and the line or row.
Rows without an assistant response are skipped and counted at load time; an empty dataset is
an error that names the source. Images are loaded here; videos are checked here and decoded by the
collate (also in the dataloader workers). A missing or unreadable image or video raises an error
naming the row and the file, or is a counted skip with ``skip_bad_samples: true``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from torch.utils.data import Dataset

from nemo_bard.data.media import MediaError, load_image, video_source
from nemo_bard.errors import UserError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """A problem with the user's data; the message names the source, row and fix."""


def _parse_messages(raw: Any, where: str) -> list[dict]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: 'messages' is a string but not valid JSON ({exc.msg} at character {exc.pos}); store the "
                "list of {role, content} turns, or its json.dumps string"
            ) from None
    msgs = raw
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} dicts (or its JSON string)")
    for m in msgs:
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: unknown role {m.get('role')!r}; expected one of {ROLES}")
    return msgs


def has_assistant_response(messages: list[dict]) -> bool:
    """True when the last assistant turn has non-empty text."""
    for m in reversed(messages):
        if m.get("role") == "assistant":
            return bool(content_text(m.get("content")).strip())
    return False


def content_text(content: Any) -> str:
    """Concatenated text of a message content (string or item list)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(it.get("text") or "" for it in content if isinstance(it, dict) and (it.get("type") or "text") == "text")


def _first_bad_json_line(paths: Iterable[Path]) -> str | None:
    """``file:line: invalid JSON (...)`` for the first line of ``paths`` that is not one JSON object, else None."""
    blank = None
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    blank = blank or f"{path}:{n}"
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{path}:{n}: invalid JSON ({exc.msg}); each line must be one JSON row"
                if not isinstance(row, dict):
                    return f"{path}:{n}: a row must be a JSON object with a 'messages' field, got {type(row).__name__}"
    if blank is not None:  # datasets' JSON reader fails on blank lines when rows mix content types
        return f"{blank}: blank line; remove blank lines (JSON Lines: one JSON row per line)"
    return None


def _read_jsonl(paths: list[Path]):
    """JSON Lines file(s) as one ``datasets.Dataset`` (``load_dataset("json")``); a bad line is an error naming
    its file and line."""
    # Hugging Face datasets: ~2 s; front ends import this module before checking their arguments
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    empty = [p for p in paths if not any(line.strip() for line in open(p, encoding="utf-8", errors="replace"))]
    if empty:
        raise DataError(f"dataset file {empty[0]} is empty; write one JSON row with a 'messages' field per line")
    try:
        return load_dataset("json", data_files=[str(p) for p in paths], split="train")
    except (DatasetGenerationError, ValueError, TypeError) as exc:
        where = _first_bad_json_line(paths)
        if where is not None:
            raise DataError(where) from None
        cause = exc.__cause__ or exc
        raise DataError(f"{', '.join(map(str, paths))}: cannot be read as JSON Lines ({cause})") from None


def _load_saved(path: Path):
    """A ``save_to_disk`` directory as a Dataset or DatasetDict; a 0-row dataset is an error naming it."""
    # see _read_jsonl
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001  any loader failure: say which directory and why
        state = path / "state.json"
        try:
            empty = state.is_file() and not json.loads(state.read_text()).get("_data_files")
        except (OSError, ValueError):
            empty = False
        if empty:
            raise DataError(f"dataset {path} has 0 rows; it needs rows with a 'messages' field (the chat turns)") \
                from None
        raise DataError(f"{path} cannot be read as a datasets.save_to_disk directory ({type(exc).__name__}: {exc})") from None


def open_source(path: str | Path | list, split: str | None = None):
    """Open a ``save_to_disk`` directory (Dataset or DatasetDict) or JSONL file(s); returns a ``datasets.Dataset``."""
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    for p in paths:
        if not p.exists():
            raise DataError(f"dataset path {p} does not exist; set dataset.path to a save_to_disk directory or .jsonl")
    if len(paths) == 1 and paths[0].is_dir():
        if list(paths[0].glob("*.jsonl")) and not (paths[0] / "dataset_info.json").exists() and not (
            paths[0] / "dataset_dict.json"
        ).exists():
            return _read_jsonl(sorted(paths[0].glob("*.jsonl")))
        # see _read_jsonl
        from datasets import DatasetDict

        ds = _load_saved(paths[0])
        if isinstance(ds, DatasetDict):
            if split is None:
                if len(ds) != 1:
                    raise DataError(f"{paths[0]} holds splits {list(ds)}; set dataset.split to one of them")
                split = next(iter(ds))
            if split not in ds:
                raise DataError(f"{paths[0]} has no split {split!r}; available: {list(ds)}")
            ds = ds[split]
        if "messages" not in ds.column_names:
            raise DataError(f"{paths[0]} has columns {ds.column_names}; a 'messages' column is required")
        return ds
    ds = _read_jsonl(paths)
    if "messages" not in ds.column_names:
        raise DataError(f"{', '.join(map(str, paths))}: rows have fields {ds.column_names}; a 'messages' field is required")
    return ds


class BardChatDataset(Dataset):
    """Chat rows -> ``{"conversation": [...], "length", "row", "where", "skip_bad_samples"}``.

    Images in the conversation are PIL images; videos are :class:`nemo_bard.data.media.VideoSource`
    (decoded by the collate). ``where`` names the row in error messages.

    Args:
        path: a ``save_to_disk`` directory, a ``.jsonl`` file, a directory of ``.jsonl`` files, or a list.
        root_dir: base directory of relative image/video paths (default: the dataset directory).
        split: split name when ``path`` holds a ``DatasetDict``.
        skip_bad_samples: turn unreadable media (and, in the collate, videos that cannot fit
            ``max_length``) into a counted skip instead of an error.
        max_samples: keep the first N usable rows (debugging, CI).
    """

    def __init__(
        self,
        path: str | list[str],
        root_dir: str | None = None,
        split: str | None = None,
        skip_bad_samples: bool = False,
        max_samples: int | None = None,
    ) -> None:
        self.source = str(path)
        self.table = open_source(path, split)
        first = Path(path[0] if isinstance(path, (list, tuple)) else path)
        self.root_dir = Path(root_dir) if root_dir else (first if first.is_dir() else first.parent)
        self.skip_bad_samples = skip_bad_samples
        self.num_skipped_media = 0
        messages = self.table["messages"]
        self.indices = []
        self.num_skipped_no_response = 0
        for i, raw in enumerate(messages):
            if raw is None:
                raise DataError(f"{self.source} row {i}: no 'messages' field")
            if has_assistant_response(_parse_messages(raw, f"{self.source} row {i}")):
                self.indices.append(i)
            else:
                self.num_skipped_no_response += 1
        if self.num_skipped_no_response:
            logger.warning(
                "%s: skipped %d row(s) without an assistant response", self.source, self.num_skipped_no_response
            )
        if max_samples is not None:
            self.indices = self.indices[:max_samples]
        if not self.indices:
            raise DataError(
                f"dataset {self.source} has no usable rows ({len(messages)} rows, "
                f"{self.num_skipped_no_response} without an assistant response)"
            )
        self._lengths = self._column("length")

    def _column(self, name: str) -> list[int] | None:
        if name not in self.table.column_names:
            return None
        col = self.table[name]
        vals = [col[i] for i in self.indices]
        return None if any(v is None for v in vals) else [int(v) for v in vals]

    @property
    def lengths(self) -> list[int] | None:
        """Per-row ``length`` column (aligned with this dataset's indices), or None when absent."""
        return self._lengths

    def __len__(self) -> int:
        return len(self.indices)

    def _load_media(self, messages: list[dict], where: str) -> list[dict]:
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                items = []
                for it in content:
                    it = {k: v for k, v in it.items() if v is not None}  # Arrow structs fill absent keys with None
                    kind = it.get("type") or ("image" if "image" in it else "video" if "video" in it else "text")
                    it["type"] = kind
                    try:
                        if kind == "image":
                            it["image"] = load_image(it.get("image", it.get("path")), self.root_dir)
                        elif kind == "video":
                            it["video"] = video_source(it.get("video"), self.root_dir)
                    except MediaError as exc:
                        raise DataError(f"{where}: {exc}") from None
                    items.append(it)
                content = items
            out.append({"role": m["role"], "content": content})
        return out

    def __getitem__(self, idx: int) -> dict | None:
        row_idx = self.indices[idx]
        row = self.table[row_idx]
        where = f"{self.source} row {row_idx}"
        messages = _parse_messages(row["messages"], where)
        try:
            conversation = self._load_media(messages, where)
        except DataError as exc:
            if not self.skip_bad_samples:
                raise
            self.num_skipped_media += 1
            logger.warning("skipping %s (%s); %d skipped so far", where, exc, self.num_skipped_media)
            return None
        return {"conversation": conversation, "length": row.get("length"), "row": row_idx, "where": where,
                "skip_bad_samples": self.skip_bad_samples}
