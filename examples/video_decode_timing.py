"""Time decoding one training row's video: a 10-second 854x480 30-fps H.264 clip, Qwen3-VL sampling.

    pip install 'nemo-bard[video]' && python examples/video_decode_timing.py [--repeats 9] [--codec libx264]
        [--bit-rate 1500000]

Writes the clip (a panning textured scene with moving squares, 1.5 Mbit/s) to a temporary directory,
then reports the wall time of ``nemo_bard.data.media.load_video`` with the default sampling (2 fps ->
20 frames), i.e. what a dataloader worker spends per video row before the processor.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_clip(path: Path, codec: str, bit_rate: int, seconds: int = 10, fps: int = 30, w: int = 854,
               h: int = 480) -> Path:
    """A panning textured background, three moving squares and light sensor noise."""
    import av

    rng = np.random.default_rng(0)
    pan = 2 * seconds * fps  # the camera pans 2 px per frame
    texture = np.kron(rng.integers(0, 128, (h // 8 + 1, (w + pan) // 8 + 1, 3)), np.ones((8, 8, 1), np.int64))
    yy, xx = np.mgrid[0:h, 0:w + pan]
    scene = texture[:h, : w + pan] + np.stack([xx * 127 // (w + pan), yy * 127 // h, np.full_like(xx, 64)], -1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = w, h, "yuv420p", bit_rate
        for i in range(seconds * fps):
            img = scene[:, 2 * i: 2 * i + w].copy()
            for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
                x, y = (i * (3 + k) * 4) % (w - 80), int((h - 80) * (0.2 + 0.3 * k))
                img[y:y + 80, x:x + 80] = colour
            img = np.clip(img + rng.integers(-2, 3, img.shape), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--codec", default="libx264", help="libx264 (.mp4) or libvpx-vp9 (.webm)")
    ap.add_argument("--bit-rate", type=int, default=1_500_000, help="target bits per second (default 1.5 Mbit/s)")
    args = ap.parse_args()
    from nemo_bard.data.media import load_video

    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / ("clip.webm" if "vpx" in args.codec else "clip.mp4"), args.codec, args.bit_rate)
        times, video = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            video = load_video(clip)
            times.append(time.perf_counter() - start)
        print(f"{clip.name} ({clip.stat().st_size / 1e6:.1f} MB, {video.metadata.total_num_frames} frames at "
              f"{video.metadata.fps:g} fps) -> {len(video)} frames {video.frames.shape[1:3]}: "
              f"median {statistics.median(times):.3f} s, min {min(times):.3f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()
