"""Chat prompts with images / videos -> processor inputs (used by the CLI and the benchmark)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_BACKENDS = (("av", "pyav"), ("decord", "decord"), ("cv2", "opencv"), ("torchcodec", "torchcodec"))


class InputError(ValueError):
    """A user-fixable problem with a prompt input; the message names the path and the fix."""


def load_image(path: str | Path):
    """An RGB PIL image."""
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except OSError as exc:
        raise InputError(f"--image {path}: cannot be read as an image ({exc})") from None


def video_backend() -> str | None:
    """The first installed video-file decoder usable by ``transformers.video_utils.load_video``."""
    return next((name for module, name in VIDEO_BACKENDS if importlib.util.find_spec(module)), None)


def load_video(path: str | Path, fps: float = 2.0) -> tuple[Any, Any, bool]:
    """``(frames, metadata, sample_frames)`` of a video file or a directory of frame images (sorted by name).

    A directory's frames are used as given (one frame every ``1 / fps`` seconds); a file is decoded with the
    installed backend and sampled by the processor.
    """
    from transformers.video_utils import VideoMetadata

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"--video {path}: the directory holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        frames = np.stack([np.asarray(load_image(f)) for f in files])
        meta = VideoMetadata(total_num_frames=len(files), fps=fps, frames_indices=list(range(len(files))))
        return frames, meta, False
    backend = video_backend()
    if backend is None:
        raise InputError(
            f"--video {path}: decoding video files needs PyAV, decord, OpenCV or torchcodec and none is installed; "
            "`pip install av`, or pass a directory of frame images instead"
        )
    from transformers.video_utils import load_video as hf_load_video

    frames, meta = hf_load_video(str(path), backend=backend)
    return frames, meta, True


def chat_text(processor, prompt: str, n_images: int = 0, n_videos: int = 0, system: str | None = None) -> str:
    """The processor's chat template for one user turn (media first, then the text) + the assistant header."""
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_inputs(
    processor,
    prompts: list[str],
    images: list[list[Any]] | None = None,
    videos: list[list[tuple[Any, Any, bool]]] | None = None,
    system: str | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded processor inputs for a batch of single-turn prompts with per-prompt images/videos."""
    images = images or [[] for _ in prompts]
    videos = videos or [[] for _ in prompts]
    texts = [chat_text(processor, p, len(i), len(v), system) for p, i, v in zip(prompts, images, videos)]
    kwargs: dict[str, Any] = {}
    flat_images = [im for row in images for im in row]
    flat_videos = [v for row in videos for v in row]
    if flat_images:
        kwargs["images"] = flat_images
    if flat_videos:
        kwargs.update(
            videos=[v[0] for v in flat_videos], video_metadata=[v[1] for v in flat_videos],
            do_sample_frames=all(v[2] for v in flat_videos),
        )
    enc = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
    return dict(enc)
