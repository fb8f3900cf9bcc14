"""A tiny offline chat dataset (colour naming) for smoke tests, CI and config examples.

    python -m nemo_bard.data.synthetic OUT_DIR [--rows 32] [--format jsonl|arrow] [--seed 0]

Each row shows a 64x64 image of one colour (with noise) and asks what colour it is; the answer is
the colour name, sometimes with a short explanation so responses span several blocks. Written in the
same chat format users bring (JSONL + PNG files, or ``datasets.save_to_disk``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "black": (20, 20, 20), "white": (235, 235, 235)}


def make_rows(out_dir: Path, rows: int, seed: int, text_only_every: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    names = sorted(COLOURS)
    out = []
    for i in range(rows):
        name = names[int(rng.integers(len(names)))]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
        rel = f"images/{i:05d}.png"
        Image.fromarray(pixels).save(out_dir / rel)
        long = i % 3 == 0
        answer = f"The image is {name}. It is {name} all over." if long else name
        if text_only_every and i % text_only_every == text_only_every - 1:  # a text-only row
            user = [{"type": "text", "text": f"Name the colour {name}."}]
        else:
            user = [{"type": "image", "image": rel}, {"type": "text", "text": "What colour is this?"}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        out.append({"messages": messages, "length": 40 + len(answer), "answer": answer})
    return out


def write_synthetic_dataset(
    out_dir: str | Path, rows: int = 32, fmt: str = "jsonl", seed: int = 0, text_only_every: int = 0
) -> Path:
    """Write the dataset; returns the path to pass as ``dataset.path`` (a .jsonl file or a save_to_disk dir).

    ``text_only_every=k`` makes every k-th row text-only (mixed batches, as in real SFT data).
    """
    out = Path(out_dir)
    data = make_rows(out, rows, seed, text_only_every)
    if fmt == "jsonl":
        path = out / "train.jsonl"
        with open(path, "w") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
        return path
    if fmt == "arrow":
        from datasets import Dataset

        table = Dataset.from_list([{**r, "messages": json.dumps(r["messages"])} for r in data])
        path = out / "train_arrow"
        table.save_to_disk(str(path))
        # images are resolved against root_dir = the folder holding images/
        return path
    raise ValueError(f"format {fmt!r}: use 'jsonl' or 'arrow'")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.data.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--format", default="jsonl", choices=["jsonl", "arrow"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-only-every", type=int, default=0, help="make every k-th row text-only")
    args = ap.parse_args(argv)
    print(write_synthetic_dataset(args.out_dir, args.rows, args.format, args.seed, args.text_only_every))


if __name__ == "__main__":
    main()
