"""Processor collate for BARD: chat rows -> prefix tokens (with media) + response tokens.

This is the dataloader ``collate_fn`` (NeMo calls it as ``collate_fn(examples, processor, **kw)``).
It does the processor work only; the block layout, which depends on the *live* block size,
is built at step time by :class:`nemo_bard.data.layout.BlockLayout` (so a block-size switch
never meets a batch prefetched with the old size, and dataloader workers need no shared state).

Prefix = the rendered conversation up to and including ``<|im_start|>assistant\\n`` of the last
assistant turn; response = from there up to and including the first ``<|im_end|>`` (BARD_SPEC §3),
with repeated newlines right after the header collapsed.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

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


def video_processor_kwargs(videos: list, fps: float | None, max_frames: int | None) -> dict[str, Any]:
    """Processor kwargs for videos: frame lists are used as given (metadata at ``fps``), files are sampled."""
    import numpy as np
    from transformers.video_utils import VideoMetadata

    fps = 2.0 if fps is None else float(fps)
    if all(isinstance(v, str) for v in videos):  # files: the processor's backend decodes and samples them
        sampling = {"fps": fps} if max_frames is None else {"fps": fps, "max_frames": max_frames}
        return {"videos": videos, "videos_kwargs": sampling}
    if any(isinstance(v, str) for v in videos):
        raise ValueError("a batch mixes video files and frame lists; use one kind of video per dataset")
    frames = [np.stack([np.asarray(f) for f in v[:max_frames]]) for v in videos]
    meta = [VideoMetadata(total_num_frames=len(f), fps=fps, frames_indices=list(range(len(f)))) for f in frames]
    return {"videos": frames, "video_metadata": meta, "do_sample_frames": False}


def bard_collate_fn(
    examples: list[dict | None],
    processor: Any,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_fps: float | None = None,
    video_max_frames: int | None = None,
) -> dict[str, Any]:
    """Tokenize a list of dataset rows.

    Returns a dict with ``prefix_ids`` / ``mm_token_type_ids`` ``[N, Pmax]`` (right padded),
    ``prefix_lens`` ``[N]``, ``response_ids`` ``[N, Rmax]`` (right padded with -1), ``response_lens``
    ``[N]`` (real tokens incl. ``<|im_end|>``), the media tensors (``pixel_values``, ``image_grid_thw``,
    ``pixel_values_videos``, ``video_grid_thw``), ``n_images_per_sample`` / ``n_videos_per_sample`` and
    ``num_skipped`` (rows dropped by the dataset, e.g. unreadable media with ``skip_bad_samples``).
    """
    rows = [e for e in examples if e is not None]
    num_skipped = len(examples) - len(rows)
    tok = processor.tokenizer
    prefixes, responses, images, videos, n_img, n_vid = [], [], [], [], [], []
    for ex in rows:
        text = processor.apply_chat_template(ex["conversation"], tokenize=False)
        prefix, response = split_last_turn(text)
        imgs, vids = conversation_media(ex["conversation"])
        prefixes.append(prefix)
        responses.append(response)
        images += imgs
        videos += vids
        n_img.append(len(imgs))
        n_vid.append(len(vids))
    kwargs: dict[str, Any] = {}
    if min_pixels is not None or max_pixels is not None:
        size = dict(processor.image_processor.size)
        size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None})
        kwargs["images_kwargs"] = {"size": size}
    if videos:
        kwargs.update(video_processor_kwargs(videos, video_fps, video_max_frames))
    enc = processor(
        text=prefixes or [""], images=images or None, padding=True,
        padding_side="right", return_tensors="pt", **kwargs,
    )
    resp = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    r_max = max((len(r) for r in resp), default=0)
    response_ids = torch.full((len(resp), r_max), -1, dtype=torch.long)
    for i, r in enumerate(resp):
        response_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    batch: dict[str, Any] = {
        "prefix_ids": enc["input_ids"][: len(rows)],
        "prefix_lens": enc["attention_mask"][: len(rows)].sum(-1),
        "mm_token_type_ids": enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))[: len(rows)],
        "response_ids": response_ids,
        "response_lens": torch.tensor([len(r) for r in resp], dtype=torch.long),
        "n_images_per_sample": torch.tensor(n_img, dtype=torch.long),
        "n_videos_per_sample": torch.tensor(n_vid, dtype=torch.long),
        "num_skipped": num_skipped,
        "rows": torch.tensor([ex.get("row", -1) for ex in rows], dtype=torch.long),
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in enc:
            batch[key] = enc[key]
    return batch


def ar_sft_collate_fn(examples: list[dict | None], processor: Any, **kwargs: Any) -> dict[str, Any]:
    """NeMo AutoModel's default VLM SFT collate for *autoregressive* training on the same rows.

    Used by the offline demo to train the "pretrained" AR model with NeMo's own ``FinetuneRecipeForVLM``.
    It calls ``nemo_automodel``'s ``default_collate_fn`` unchanged and only makes its pre-shifted
    ``labels`` contiguous (0.7.0 returns a strided view that ``MaskedCrossEntropy`` cannot ``view``
    when the batch holds more than one sample). Rows dropped by the dataset (``None``) are skipped.
    """
    from nemo_automodel.components.datasets.vlm.collate_fns import default_collate_fn

    batch = default_collate_fn([e for e in examples if e is not None], processor, **kwargs)
    batch["labels"] = batch["labels"].contiguous()
    return batch
