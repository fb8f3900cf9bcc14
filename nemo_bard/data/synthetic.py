"""A tiny offline chat dataset (colour naming) for smoke tests, CI and config examples.

    python -m nemo_bard.data.synthetic OUT_DIR [--rows 32] [--format jsonl|arrow] [--seed 0]
        [--text-only-every K] [--video-every K]

Each row shows a 64x64 image of one colour (with noise) and asks what colour it is; the answer is
the colour name, sometimes with a short explanation so responses span several blocks. With
``--video-every K`` every K-th row is instead a 2-second mp4 clip of a square of that colour moving
over grey (needs PyAV: ``pip install 'nemo-bard[video]'``). Written in the same chat format users
bring (JSONL + PNG/MP4 files, or ``datasets.save_to_disk``).
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image

from nemo_bard.data.media import require_video_decoder

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "black": (20, 20, 20), "white": (235, 235, 235)}


def write_video(path: str | Path, frames: np.ndarray | list, fps: float = 8, **codec_options: str) -> Path:
    """Encode RGB frames ``[T, H, W, 3]`` (even H, W) as a video file with PyAV.

    The codec follows the suffix: VP8 for ``.webm``, H.264 otherwise (MPEG-4 part 2 where the
    FFmpeg build has no H.264 encoder). ``codec_options`` go to the encoder (e.g. ``g="5"``: a keyframe
    every 5 frames).
    """
    require_video_decoder("writing video files")
    # optional dependency (the [video] extra)
    import av

    path = Path(path)
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    codecs = ("libvpx",) if path.suffix.lower() == ".webm" else ("libx264", "mpeg4")
    codec = next(c for c in codecs if c in av.codecs_available)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=codec_options)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


def moving_square_clip(colour: tuple[int, int, int], seed: int, frames: int = 16, size: int = 64) -> np.ndarray:
    """A square of ``colour`` moving across a grey background: ``[frames, size, size, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    side = size // 4
    x0, y0 = rng.integers(0, size - side, 2)
    dx, dy = rng.choice([-3, 3], 2)
    clip = np.full((frames, size, size, 3), 128, np.uint8)
    for t in range(frames):
        x, y = (x0 + dx * t) % (size - side), (y0 + dy * t) % (size - side)
        clip[t, y:y + side, x:x + side] = colour
    return clip


def make_rows(out_dir: Path, rows: int, seed: int, text_only_every: int = 0, video_every: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if video_every:
        (out_dir / "videos").mkdir(exist_ok=True)
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
        elif video_every and i % video_every == video_every - 1:  # a video row
            clip = f"videos/{i:05d}.mp4"
            write_video(out_dir / clip, moving_square_clip(COLOURS[name], seed * 100003 + i))
            user = [{"type": "video", "video": clip}, {"type": "text", "text": "What colour is the moving square?"}]
            answer = f"The square is {name}. It moves across grey." if long else name
        else:
            user = [{"type": "image", "image": rel}, {"type": "text", "text": "What colour is this?"}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        out.append({"messages": messages, "length": 40 + len(answer), "answer": answer})
    return out


def write_synthetic_dataset(
    out_dir: str | Path, rows: int = 32, fmt: str = "jsonl", seed: int = 0, text_only_every: int = 0,
    video_every: int = 0,
) -> Path:
    """Write the dataset; returns the path to pass as ``dataset.path`` (a .jsonl file or a save_to_disk dir).

    ``text_only_every=k`` makes every k-th row text-only (mixed batches, as in real SFT data);
    ``video_every=k`` makes every k-th row (not already text-only) a video row.
    """
    out = Path(out_dir)
    data = make_rows(out, rows, seed, text_only_every, video_every)
    if fmt == "jsonl":
        path = out / "train.jsonl"
        with open(path, "w") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
        return path
    if fmt == "arrow":
        table = Dataset.from_list([{**r, "messages": json.dumps(r["messages"])} for r in data])
        path = out / "train_arrow"
        table.save_to_disk(str(path))
        # images/videos are resolved against root_dir = the folder holding images/ and videos/
        return path
    raise ValueError(f"format {fmt!r}: use 'jsonl' or 'arrow'")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_bard.data.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--format", default="jsonl", choices=["jsonl", "arrow"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-only-every", type=int, default=0, help="make every k-th row text-only")
    ap.add_argument("--video-every", type=int, default=0, help="make every k-th row a video row (needs PyAV)")
    args = ap.parse_args(argv)
    print(write_synthetic_dataset(args.out_dir, args.rows, args.format, args.seed, args.text_only_every,
                                  args.video_every))


if __name__ == "__main__":
    main()
