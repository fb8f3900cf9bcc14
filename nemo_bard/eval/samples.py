"""Evaluation rows: a chat dataset with reference answers read into prompts and references (no torch)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_bard.data.datasets import BardChatDataset, content_text

logger = logging.getLogger(__name__)


@dataclass
class EvalSample:
    """A prompt (chat turns before the reference answer, media loaded) and its reference."""

    prompt: list[dict]
    reference: str
    row: int
    where: str = ""  # names the row in error messages


class EvalSamples(list):
    """The samples of a dataset, plus where the rows skipped for an empty reference were (``skipped_empty``)."""

    def __init__(self, samples: list[EvalSample] = (), skipped_empty: list[str] | None = None) -> None:
        super().__init__(samples)
        self.skipped_empty = list(skipped_empty or [])

    def skipped_note(self) -> str:
        """One sentence on the skipped rows ("" when none)."""
        n = len(self.skipped_empty)
        if not n:
            return ""
        return (f"{n} row{'s' if n > 1 else ''} with an empty reference (an 'answer' of \"\" or an assistant turn "
                f"without text) skipped, not scored (first: {self.skipped_empty[0]})")


def _last_assistant(messages: list[dict]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return None


def _first_relative_media(table: Any, indices: list[int]) -> str | None:
    for i in indices[:1]:
        raw = table[i]["messages"]
        msgs = json.loads(raw) if isinstance(raw, str) else raw
        for m in msgs:
            content = m.get("content")
            if not isinstance(content, list):
                continue
            for it in content:
                ref = it.get("image", it.get("video")) if isinstance(it, dict) else None
                ref = ref.get("path") if isinstance(ref, dict) else ref
                if isinstance(ref, str) and not os.path.isabs(ref):
                    return ref
    return None


def load_samples(
    data: str | Path,
    root_dir: str | Path | None = None,
    limit: int | None = None,
    split: str | None = None,
) -> EvalSamples:
    """Read a chat dataset (save_to_disk dir or JSONL) into prompts + references.

    Without ``root_dir``, relative media paths resolve against the dataset directory, or its parent
    when they exist only there (the layout of :mod:`nemo_bard.data.digits`). Rows with an empty reference
    are skipped, counted in ``skipped_empty`` and named in a warning.
    """
    ds = BardChatDataset(str(data), root_dir=str(root_dir) if root_dir else None, split=split, max_samples=limit)
    if root_dir is None:
        rel = _first_relative_media(ds.table, ds.indices)
        if rel and not (ds.root_dir / rel).exists() and (ds.root_dir.parent / rel).exists():
            ds.root_dir = ds.root_dir.parent
            logger.info("media paths resolve against %s (pass --root-dir to override)", ds.root_dir)
    samples, skipped = [], []
    for i in range(len(ds)):
        item = ds[i]
        conv = item["conversation"]
        last = _last_assistant(conv)
        row = ds.table[item["row"]]
        answer = row.get("answer") if isinstance(row, dict) else None
        reference = str(answer) if answer is not None else content_text(conv[last]["content"])
        if not reference.strip():
            skipped.append(item["where"] or f"row {item['row']}")
            continue
        samples.append(EvalSample(conv[:last], reference.strip(), item["row"], item["where"]))
    out = EvalSamples(samples, skipped)
    if skipped:
        logger.warning("%s: %s", data, out.skipped_note())
    return out
