"""Offline digit-image chat datasets built from scikit-learn's bundled handwritten digit scans.

    python -m nemo_bard.data.digits OUT_DIR [--task read|odd_count] [--train 2000] [--test 200] [--seed 0]
        [--min-digits 4] [--max-digits 12] [--scale 4] [--format arrow|jsonl]

Source: ``sklearn.datasets.load_digits`` (1,797 real 8x8 scans, shipped inside the scikit-learn
wheel, no download). Scans ``0..1436`` form the train pool and ``1437..1796`` the test pool, so no
test scan ever appears in training. A sample is a row of k digits (k uniform in
``[min_digits, max_digits]``), each scan upscaled ``scale``x (nearest) and tiled left to right:
an RGB image ``8*scale`` high and ``8*scale*k`` wide, dark ink on white, saved as PNG. With
scale 4 and a Qwen3-VL processor (patch 16, merge 2) each digit is exactly one visual token.

Two tasks on the same images (``--task``, see :data:`TASKS`), one answer token per digit in Qwen-style
tokenizers, no spaces:

* ``read`` — "Read the digits.": the digit string. Every answer token depends on one image token only,
  so all of them can be written at once.
* ``odd_count`` — "Count the odd digits so far.": answer token ``j`` is the number of odd digits among
  the first ``j`` drawn, mod 10 ("4739" -> "0123"). Written left to right each token is the previous
  answer token, plus one if digit ``j`` is odd; a token whose predecessor is still undecided needs a count
  over the image instead: unlike ``read``'s, the answer's tokens depend on each other. (A running sum
  mod 10 has the same chain, but the demo's model, after 300 steps of reading, stayed at chance on it for
  600 steps: a sum token carries no signal until both addends are known.)

Layout of ``OUT_DIR``::

    images/{train,test}_NNNNN.png     # shared image folder; paths in rows are relative to OUT_DIR
    train/, test/                     # datasets.save_to_disk directories   (--format arrow)
    train.jsonl, test.jsonl           # one JSON row per line               (--format jsonl)

Columns: ``messages`` (JSON string, chat format), ``answer``, ``length`` (approximate tokens),
``v_tokens`` (visual tokens), ``num_digits``, ``scan_ids`` (source scan indices), ``digits`` (what the
image shows), ``task``. Read it with
``BardChatDataset(path=OUT_DIR/"train", root_dir=OUT_DIR)`` or ``path=OUT_DIR/"train.jsonl"``.
Output is a pure function of the arguments: the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "Read the digits."
TASKS = {  # task name -> prompt
    "read": PROMPT,
    "odd_count": "Count the odd digits so far.",
}
NUM_SCANS = 1797
TRAIN_POOL = range(0, 1437)  # first 80 % of the scans
TEST_POOL = range(1437, NUM_SCANS)  # last 360 scans
SPLIT_IDS = {"train": 0, "test": 1, "dev": 2}  # dev: held-out scans like test, other rows
# Chat-template overhead of one sample in Qwen-style templates (role tags, vision start/end, prompt, eos).
_TEMPLATE_TOKENS = 16


@dataclass(frozen=True)
class DigitSample:
    """One generated sample before it is written."""

    scan_ids: tuple[int, ...]
    answer: str
    pixels: np.ndarray  # [H, W, 3] uint8
    digits: str = ""  # the digits drawn, left to right (== answer for the read task)
    task: str = "read"


def task_answer(task: str, digits: str) -> str:
    """The answer of ``task`` for an image showing ``digits`` (e.g. odd_count: "4739" -> "0123")."""
    if task == "read":
        return digits
    if task == "odd_count":
        count, out = 0, []
        for d in digits:
            count = (count + int(d) % 2) % 10
            out.append(str(count))
        return "".join(out)
    raise ValueError(f"task {task!r}: use one of {', '.join(TASKS)}")


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scans as uint8 grey images ``[N, 8, 8]`` (0 = ink, 255 = paper) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = np.asarray(digits.images, dtype=np.float64)  # 0..16, 16 = full ink
    grey = np.rint(255.0 - ink * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return grey, np.asarray(digits.target, dtype=np.int64)


def pool(split: str) -> range:
    """Source-scan indices a split may draw from (dev draws from the held-out scans, like test)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split {split!r}: use 'train', 'dev' or 'test'")
    return TRAIN_POOL if split == "train" else TEST_POOL


def render(scans: np.ndarray, scan_ids: list[int] | tuple[int, ...], scale: int) -> np.ndarray:
    """Tile the scans left to right and upscale by ``scale`` (nearest): RGB ``[8s, 8s*k, 3]`` uint8."""
    row = np.concatenate([scans[i] for i in scan_ids], axis=1)
    big = np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)
    return np.repeat(big[:, :, None], 3, axis=2)


def visual_tokens(height: int, width: int, patch: int = 16, merge: int = 2) -> int:
    """Visual tokens of an image whose sides are multiples of ``patch * merge`` (no resize)."""
    unit = patch * merge
    return max(1, round(height / unit)) * max(1, round(width / unit))


def make_samples(
    split: str,
    n: int,
    seed: int = 0,
    min_digits: int = 4,
    max_digits: int = 12,
    scale: int = 4,
    scans: tuple[np.ndarray, np.ndarray] | None = None,
    task: str = "read",
    exclude: set[tuple[int, ...]] | frozenset = frozenset(),
) -> list[DigitSample]:
    """Generate ``n`` samples of ``split`` deterministically from ``seed`` (each split has its own stream).

    The images depend on the seed only, not on ``task``: both tasks of one seed show the same digits.
    ``exclude``: scan sequences to skip (the dev split skips every test row, so tuning never sees one).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use one of {', '.join(TASKS)}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}..{max_digits}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    images, labels = scans if scans is not None else load_scans()
    src = pool(split)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split]]))
    out: list[DigitSample] = []
    while len(out) < n:
        k = int(rng.integers(min_digits, max_digits + 1))
        ids = tuple(int(src.start + j) for j in rng.integers(0, len(src), size=k))
        if ids in exclude:
            continue
        drawn = "".join(str(int(labels[i])) for i in ids)
        out.append(DigitSample(ids, task_answer(task, drawn), render(images, ids, scale), drawn, task))
    return out


def _row(sample: DigitSample, rel_path: str) -> dict:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": rel_path},
                                     {"type": "text", "text": TASKS[sample.task]}]},
        {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]},
    ]
    h, w = sample.pixels.shape[:2]
    v = visual_tokens(h, w)
    return {
        "messages": json.dumps(messages),
        "answer": sample.answer,
        "length": v + len(sample.answer) + _TEMPLATE_TOKENS,
        "v_tokens": v,
        "num_digits": len(sample.answer),
        "scan_ids": list(sample.scan_ids),
        "digits": sample.digits,
        "task": sample.task,
    }


def _save_arrow(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    from datasets import Dataset

    # A fixed fingerprint keeps state.json (and so the whole directory) identical across runs.
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    table = pa.Table.from_pylist(rows)
    bars = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        Dataset(table, fingerprint=f"nemo_bard_digits_{path.name}_{len(rows)}").save_to_disk(str(path))
    finally:
        if bars:
            enable_progress_bars()


def write_digits_dataset(
    out_dir: str | Path,
    train: int = 2000,
    test: int = 200,
    seed: int = 0,
    min_digits: int = 4,
    max_digits: int = 12,
    scale: int = 4,
    fmt: str = "arrow",
    task: str = "read",
    dev: int = 0,
) -> dict[str, Path]:
    """Write the train/test (and, with ``dev`` rows, dev) splits under ``out_dir``; returns ``{"train": path,
    "test": path, "root": out_dir}`` (and ``"dev"``). Dev rows show held-out scans, like test, and never a test row:
    tune decoding on dev, report on test.

    ``path`` is what to pass as ``dataset.path`` (a save_to_disk directory or a ``.jsonl`` file); image
    paths in the rows are relative to ``root`` (pass it as ``root_dir``).
    """
    if fmt not in ("arrow", "jsonl"):
        raise ValueError(f"format {fmt!r}: use 'arrow' or 'jsonl'")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scans = load_scans()
    paths: dict[str, Path] = {"root": out}
    test_rows: frozenset = frozenset()  # scan sequences of the test split, which dev skips
    for split, n in (("train", train), ("test", test), ("dev", dev)):
        if n <= 0:
            continue
        rows = []
        made = make_samples(split, n, seed, min_digits, max_digits, scale, scans, task,
                            exclude=test_rows if split == "dev" else frozenset())
        if split == "test":
            test_rows = frozenset(sample.scan_ids for sample in made)
        for i, sample in enumerate(made):
            rel = f"images/{split}_{i:05d}.png"
            Image.fromarray(sample.pixels).save(out / rel, format="PNG", optimize=False)
            rows.append(_row(sample, rel))
        if fmt == "jsonl":
            path = out / f"{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        else:
            path = out / split
            _save_arrow(rows, path)
        paths[split] = path
    (out / "digits_config.json").write_text(
        json.dumps(
            {"train": train, "test": test, "dev": dev, "seed": seed, "min_digits": min_digits, "max_digits": max_digits,
             "scale": scale, "format": fmt, "train_pool": [TRAIN_POOL.start, TRAIN_POOL.stop],
             "test_pool": [TEST_POOL.start, TEST_POOL.stop], "task": task, "prompt": TASKS[task]},
            indent=2,
        )
        + "\n"
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.data.digits", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--task", default="read", choices=list(TASKS),
                    help="read: the digits; odd_count: the odd digits counted so far, mod 10 (default read)")
    ap.add_argument("--train", type=int, default=2000, help="train rows (default 2000)")
    ap.add_argument("--test", type=int, default=200, help="test rows (default 200)")
    ap.add_argument("--dev", type=int, default=0,
                    help="dev rows (default 0): held-out scans like test, never a test row; for eval --tune")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-digits", type=int, default=4)
    ap.add_argument("--max-digits", type=int, default=12)
    ap.add_argument("--scale", type=int, default=4, help="upscale factor of each 8x8 scan (4 -> 32x32 = 1 token)")
    ap.add_argument("--format", default="arrow", choices=["arrow", "jsonl"])
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = write_digits_dataset(args.out_dir, args.train, args.test, args.seed, args.min_digits,
                                 args.max_digits, args.scale, args.format, args.task, args.dev)
    dev = f" / {args.dev} dev" if args.dev else ""
    print(f"wrote {args.train} train / {args.test} test{dev} {args.task} rows in {time.perf_counter() - t0:.2f}s")
    for k, v in paths.items():
        print(f"  {k}: {v}")
    print(f"  read with BardChatDataset(path=<train/test>, root_dir={paths['root']})")


if __name__ == "__main__":
    main()
