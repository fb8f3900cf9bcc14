"""Processor collate for BARD: chat rows -> prefix tokens (with media) + response tokens.

This is the dataloader ``collate_fn`` (NeMo calls it as ``collate_fn(examples, processor, **kw)``).
It decodes videos and does the processor work, both in the dataloader workers; the block layout,
which depends on the *live* block size, is built at step time by
:class:`nemo_bard.data.layout.BlockLayout` (so a block-size switch never meets a batch prefetched
with the old size, and dataloader workers need no shared state).

Prefix = the rendered conversation up to and including ``<|im_start|>assistant\\n`` of the last
assistant turn; response = from there up to and including the first ``<|im_end|>`` (docs/method.md §3),
with repeated newlines right after the header collapsed.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from nemo_bard.data.datasets import DataError
from nemo_bard.data.layout import collated_batch
from nemo_bard.data.media import MediaError, Video, VideoSampling, load_video, video_processor_kwargs
from nemo_bard.integrations.hf import video_timestamps

logger = logging.getLogger(__name__)

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"


def split_last_turn(text: str) -> tuple[str, str]:
    """Split a rendered chat into (prefix incl. the last assistant header, response incl. its first ``<|im_end|>``)."""
    at = text.rfind(ASSISTANT_HEADER)
    if at < 0:
        raise ValueError("rendered chat has no '<|im_start|>assistant\\n' header; is the chat template Qwen-style?")
    cut = at + len(ASSISTANT_HEADER)
    response = re.sub(r"^\n+", "", text[cut:])
    end = response.find(END_OF_TURN)
    response = response + END_OF_TURN if end < 0 else response[: end + len(END_OF_TURN)]
    return text[:cut], response


def conversation_media(conversation: list[dict]) -> tuple[list, list]:
    """Images and videos of a conversation, in order of appearance."""
    images, videos = [], []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if item.get("type") == "image":
                    images.append(item["image"])
                elif item.get("type") == "video":
                    videos.append(item["video"])
    return images, videos


def decode_videos(conversation: list[dict], sampling: VideoSampling) -> list[dict]:
    """A copy of ``conversation`` with every video item decoded (:func:`nemo_bard.data.media.load_video`)."""
    out = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {**it, "video": load_video(it["video"], sampling)} if it.get("type") == "video" else it
                for it in content
            ]
        out.append({**message, "content": content})
    return out


class _VideoFitter:
    """Sample a row's videos down (fewer frames, same frame size) until ``P + 2 * R <= max_length``.

    ``P``: prompt tokens, ``R``: response tokens padded to ``max_block_size``. The prompt's token count
    at fewer frames is computed exactly (vision tokens from the video processor, plus each temporal
    patch's ``<t seconds>`` text and vision start/end tokens), so the processor runs once more.
    """

    def __init__(self, processor: Any, size: dict | None, max_length: int, max_block_size: int) -> None:
        self.processor, self.videos_kwargs = processor, ({"size": size} if size else {})
        self.vp = processor.video_processor
        self.max_length, self.max_block_size = max_length, max_block_size

    def over_budget(self, enc: Any, media: list[tuple[list, list]], response_lens: list[int]) -> list[tuple]:
        """``(row, videos, their grids, prompt length)`` of every row with videos that does not fit."""
        prefix_lens = enc["attention_mask"].sum(-1).tolist()
        grids = enc["video_grid_thw"].tolist() if "video_grid_thw" in enc else []
        out, first = [], 0
        for i, (_, videos) in enumerate(media):
            if videos and prefix_lens[i] > self.budget(response_lens[i]):
                out.append((i, videos, grids[first: first + len(videos)], prefix_lens[i]))
            first += len(videos)
        return out

    def tokens(self, video: Video, height: int, width: int) -> int:
        """Prompt tokens of ``video`` when its frames are ``height x width`` pixels before the processor."""
        vp, tp = self.vp, self.vp.temporal_patch_size
        vision = vp.get_num_of_video_patches(len(video), height, width, self.videos_kwargs) // vp.merge_size**2
        stamps = video_timestamps(self.processor, list(video.metadata.frames_indices), video.metadata.fps, tp)
        text = self.processor.tokenizer([f"<{t:.1f} seconds>" for t in stamps], add_special_tokens=False)["input_ids"]
        return vision + sum(len(t) + 2 for t in text)

    def budget(self, response_len: int) -> int:
        """Most prompt tokens that leave room for the clean and noisy response copies."""
        b = self.max_block_size
        return self.max_length - 2 * ((response_len + b - 1) // b * b)

    def fit(
        self, videos: list[Video], grids: list[list[int]], prefix_len: int, response_len: int
    ) -> list[Video] | None:
        """Fewer frames of ``videos`` (their processed grids ``[t, h, w]``) so the row fits; None when it cannot."""
        patch, tp = self.vp.patch_size, self.vp.temporal_patch_size
        sizes = [(g[1] * patch, g[2] * patch) for g in grids]
        other = prefix_len - sum(self.tokens(v, *hw) for v, hw in zip(videos, sizes))
        budget = self.budget(response_len)
        groups = [(len(v) + tp - 1) // tp for v in videos]
        top = max(groups)

        def shrink(c: int) -> list[Video]:
            return [v.subsample(min(len(v), max(1, -(-g * c // top)) * tp)) for v, g in zip(videos, groups)]

        def fits(c: int) -> bool:
            return other + sum(self.tokens(v, *hw) for v, hw in zip(shrink(c), sizes)) <= budget

        lo, hi = 1, top - 1  # largest c in [lo, hi] that fits (the cost grows with c)
        if hi < 1 or not fits(1):
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return [_resize_frames(v, *hw) for v, hw in zip(shrink(lo), sizes)]

    def too_long(self, videos: list[Video], grids: list[list[int]], prefix_len: int, response_len: int) -> str:
        """Why a row cannot fit (its prompt with one temporal patch per video)."""
        patch, tp = self.vp.patch_size, self.vp.temporal_patch_size
        sizes = [(g[1] * patch, g[2] * patch) for g in grids]
        now = sum(self.tokens(v, *hw) for v, hw in zip(videos, sizes))
        least = prefix_len - now + sum(self.tokens(v.subsample(min(len(v), tp)), *hw) for v, hw in zip(videos, sizes))
        return (f"video {', '.join(v.source.name for v in videos)} does not fit max_length={self.max_length}: "
                f"the prompt needs {least} tokens even at {tp} frames per video, and the response "
                f"{response_len} (x2, padded to blocks of {self.max_block_size})")


def _resize_frames(video: Video, height: int, width: int) -> Video:
    """The same frames at ``height x width`` (bicubic, antialiased), so the processor keeps that size."""
    if video.frames.shape[1:3] == (height, width):
        return video
    x = torch.from_numpy(video.frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return Video(frames, video.metadata, video.source)


def _size(processor: Any, min_pixels: int | None, max_pixels: int | None) -> dict:
    """The processor's ``size`` with ``shortest_edge`` / ``longest_edge`` overridden where given."""
    size = dict(processor.size)
    size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None})
    return size


def bard_collate_fn(
    examples: list[dict | None],
    processor: Any,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_fps: float | None = None,
    video_min_frames: int | None = None,
    video_max_frames: int | None = None,
    video_min_pixels: int | None = None,
    video_max_pixels: int | None = None,
    max_length: int | None = None,
    max_block_size: int = 32,
) -> dict[str, Any]:
    """Tokenize a list of dataset rows; videos are decoded here (in the dataloader workers).

    Args:
        min_pixels, max_pixels: image size bounds (pixels per image).
        video_fps, video_min_frames, video_max_frames: frame sampling (default: the video processor's,
            for Qwen3-VL 2 fps within [4, 768] frames).
        video_min_pixels, video_max_pixels: a video's total pixel budget over its sampled frames
            (default: the video processor's ``size``).
        max_length: with ``bard.max_length``, a row whose video makes ``P + 2R`` exceed it (``R`` padded to
            ``max_block_size``) gets fewer frames at the same frame size; a row that does not fit even with
            one temporal patch per video is an error (or a counted skip with ``skip_bad_samples``).

    Returns a dict with ``prefix_ids`` / ``mm_token_type_ids`` ``[N, Pmax]`` (right padded),
    ``prefix_lens`` ``[N]``, ``response_ids`` ``[N, Rmax]`` (right padded with -1), ``response_lens``
    ``[N]`` (real tokens incl. ``<|im_end|>``), the media tensors (``pixel_values``, ``image_grid_thw``,
    ``pixel_values_videos``, ``video_grid_thw``), ``n_images_per_sample`` / ``n_videos_per_sample`` and
    ``num_skipped`` (rows dropped by the dataset or here, e.g. unreadable media with ``skip_bad_samples``).
    """
    tok = processor.tokenizer
    sampling = VideoSampling.from_processor(
        getattr(processor, "video_processor", None), fps=video_fps, min_frames=video_min_frames,
        max_frames=video_max_frames,
    )
    num_skipped = 0

    def bad(ex: dict, message: str) -> None:
        nonlocal num_skipped
        where = ex.get("where") or f"row {ex.get('row', '?')}"
        if not ex.get("skip_bad_samples"):
            raise DataError(f"{where}: {message}")
        num_skipped += 1
        logger.warning("skipping %s (%s)", where, message)

    rows = []
    for ex in examples:
        if ex is None:
            num_skipped += 1
            continue
        try:
            rows.append({**ex, "conversation": decode_videos(ex["conversation"], sampling)})
        except MediaError as exc:
            bad(ex, str(exc))
    texts = [split_last_turn(processor.apply_chat_template(ex["conversation"], tokenize=False)) for ex in rows]
    resp = [tok(r, add_special_tokens=False)["input_ids"] for _, r in texts]
    media = [conversation_media(ex["conversation"]) for ex in rows]

    images_kwargs = {}
    if min_pixels is not None or max_pixels is not None:
        images_kwargs = {"images_kwargs": {"size": _size(processor.image_processor, min_pixels, max_pixels)}}
    video_size = None
    if video_min_pixels is not None or video_max_pixels is not None:
        video_size = _size(processor.video_processor, video_min_pixels, video_max_pixels)

    def encode() -> Any:
        images = [im for m in media for im in m[0]]
        videos = [v for m in media for v in m[1]]
        kwargs = {**images_kwargs, **(video_processor_kwargs(videos, video_size) if videos else {})}
        return processor(text=[p for p, _ in texts] or [""], images=images or None, padding=True,
                         padding_side="right", return_tensors="pt", **kwargs)

    enc = encode()
    if max_length is not None and any(m[1] for m in media):
        fitter = _VideoFitter(processor, video_size, max_length, max_block_size)
        for _ in range(3):  # one refit is exact; the loop only guards against a miscount
            over = fitter.over_budget(enc, media, [len(r) for r in resp])
            if not over:
                break
            drop = set()
            for i, videos, grids, prefix_len in over:
                fitted = fitter.fit(videos, grids, prefix_len, len(resp[i]))
                if fitted is None:
                    bad(rows[i], fitter.too_long(videos, grids, prefix_len, len(resp[i])))
                    drop.add(i)
                    continue
                logger.info("%s: videos sampled down from %s to %s frames to fit max_length=%d", rows[i].get("where"),
                            [len(v) for v in videos], [len(v) for v in fitted], max_length)
                media[i] = (media[i][0], fitted)
            keep = [i for i in range(len(rows)) if i not in drop]
            rows, texts, resp, media = ([x[i] for i in keep] for x in (rows, texts, resp, media))
            enc = encode()

    n = len(rows)
    return collated_batch(
        enc["input_ids"][:n], enc["attention_mask"][:n].sum(-1), resp,
        mm_token_type_ids=enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))[:n],
        media={k: enc[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
               if k in enc},
        n_images=[len(m[0]) for m in media], n_videos=[len(m[1]) for m in media],
        rows=[ex.get("row", -1) for ex in rows], num_skipped=num_skipped,
    )
