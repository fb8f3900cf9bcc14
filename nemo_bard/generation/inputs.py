"""Chats with images / videos -> processor inputs (generate, eval, lmms-eval, the benchmarks).

Media loading itself lives in :mod:`nemo_bard.data.media`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_bard.data import media
from nemo_bard.data.collate import conversation_media, decode_videos
from nemo_bard.data.datasets import DataError
from nemo_bard.data.media import Video, VideoSampling, video_processor_kwargs

PROCESSOR_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                  "video_grid_thw", "mm_token_type_ids")


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


def user_conversation(
    prompt: str, images: list[Any] = (), videos: list[Video] = (), system: str | None = None
) -> list[dict]:
    """A one-turn chat: optional system message, then the user's media (images first) and text."""
    content = ([{"type": "image", "image": im} for im in images] + [{"type": "video", "video": v} for v in videos]
               + [{"type": "text", "text": prompt}])
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def build_inputs(
    processor: Any,
    conversations: list[list[dict]],
    sampling: VideoSampling | None = None,
    where: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded processor inputs for a batch of chats, each rendered with its generation prompt.

    Media items sit in the messages (images: anything :func:`nemo_bard.data.media.load_image` returns;
    videos: files, bytes, frame directories or lists, decoded here with ``sampling`` — default: the
    processor's — or already decoded :class:`~nemo_bard.data.media.Video`). A video that cannot be
    decoded raises :class:`nemo_bard.data.datasets.DataError` naming ``where[i]`` (e.g. the row) and the file.
    """
    sampling = sampling or VideoSampling.from_processor(getattr(processor, "video_processor", None))
    decoded = []
    for i, conv in enumerate(conversations):
        try:
            decoded.append(decode_videos(conv, sampling))
        except media.MediaError as exc:
            raise DataError(f"{where[i] if where else f'prompt {i}'}: {exc}") from None
    texts = processor.apply_chat_template(decoded, tokenize=False, add_generation_prompt=True)
    texts = [texts] if isinstance(texts, str) else texts
    images, videos = [], []
    for conv in decoded:
        im, vid = conversation_media(conv)
        images += im
        videos += vid
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs.update(video_processor_kwargs(videos))
    batch = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
    return {k: batch[k] for k in PROCESSOR_KEYS if k in batch}


def stack_inputs(items: list[dict[str, torch.Tensor | None]], pad_id: int = 0) -> dict[str, torch.Tensor | None]:
    """One left-padded batch from the processor outputs of single prompts (the order kept): token tensors are
    left-padded to the longest prompt, vision tensors and grids concatenated (they are per image / per video)."""
    if len(items) == 1:
        return dict(items[0])
    width = max(int(it["input_ids"].shape[1]) for it in items)

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    out: dict[str, torch.Tensor | None] = {
        "input_ids": torch.cat([left_pad(it["input_ids"], pad_id) for it in items]),
        "attention_mask": torch.cat([left_pad(it["attention_mask"], 0) for it in items]),
    }
    if any(it.get("mm_token_type_ids") is not None for it in items):
        out["mm_token_type_ids"] = torch.cat([
            left_pad(it["mm_token_type_ids"] if it.get("mm_token_type_ids") is not None
                     else torch.zeros_like(it["input_ids"]), 0) for it in items])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [it[key] for it in items if it.get(key) is not None]
        out[key] = torch.cat(parts) if parts else None
    return out
