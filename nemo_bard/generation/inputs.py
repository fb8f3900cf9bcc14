"""Chat prompts with images / videos -> processor inputs (used by the CLI and the benchmark).

Media loading itself lives in :mod:`nemo_bard.data.media`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_bard.data import media
from nemo_bard.data.media import Video, VideoSampling, video_processor_kwargs


class InputError(ValueError):
    """A user-fixable problem with a prompt input; the message names the path and the fix."""


def load_image(path: str | Path):
    """An RGB PIL image; :class:`InputError` when the file is not a readable image."""
    try:
        return media.load_image(path)
    except media.MediaError as exc:
        raise InputError(f"--image: {exc}") from None


def load_video(path: str | Path, sampling: VideoSampling | None = None) -> Video:
    """The sampled frames of a video file or a directory of frame images (sorted by name).

    :class:`InputError` when the file cannot be decoded (missing PyAV included).
    """
    try:
        return media.load_video(path, sampling)
    except (media.MediaError, media.VideoDecoderMissing) as exc:
        raise InputError(f"--video: {exc}") from None


def chat_text(processor, prompt: str, n_images: int = 0, n_videos: int = 0, system: str | None = None) -> str:
    """The processor's chat template for one user turn (media first, then the text) + the assistant header."""
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_inputs(
    processor,
    prompts: list[str],
    images: list[list[Any]] | None = None,
    videos: list[list[Video]] | None = None,
    system: str | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded processor inputs for a batch of single-turn prompts with per-prompt images / decoded videos."""
    images = images or [[] for _ in prompts]
    videos = videos or [[] for _ in prompts]
    texts = [chat_text(processor, p, len(i), len(v), system) for p, i, v in zip(prompts, images, videos)]
    kwargs: dict[str, Any] = {}
    flat_images = [im for row in images for im in row]
    flat_videos = [v for row in videos for v in row]
    if flat_images:
        kwargs["images"] = flat_images
    if flat_videos:
        kwargs.update(video_processor_kwargs(flat_videos))
    enc = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
    return dict(enc)
