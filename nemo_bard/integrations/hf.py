"""transformers internals the ``bard_vl`` model relies on (transformers 5.18; no NeMo).

* :class:`FlexAttentionSupport` declares FlexAttention support on the bard_vl classes. transformers
  5.18 refuses ``attn_implementation="flex_attention"`` for any class whose ``_supports_flex_attn`` is
  unset, Qwen3-VL's text decoder included, although that decoder's attention goes through the generic
  attention interface and matches SDPA with the equivalent dense mask (tests/test_model.py).
* :func:`attn_implementation` reads the attention backend a (sub-)config was resolved to; eager
  attention adds the mask to the scores, so a boolean block mask must become additive there.
* :func:`video_timestamps`: the seconds Qwen3-VL's processor writes before each merged video frame (its
  private ``_calculate_timestamps``), so a collate can count a video's prompt tokens before processing it.
* :func:`many_recompiles`: a scope in which ``torch.compile`` keeps more graphs per function than dynamo's
  default of 8 (the engine compiles one per batch shape).
* :func:`text_decoder_inputs` returns what ``Qwen3VLModel.forward`` passes to its text decoder (token embeddings
  with the vision tower's features scattered in, the visual positions, the deepstack features), so the decoding
  engine can run the text layers itself while transformers keeps doing the vision-language merge.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from nemo_bard.integrations import check_version

check_version("transformers")


class FlexAttentionSupport:
    """Mixin for a ``PreTrainedModel`` subclass whose attention works with FlexAttention ``BlockMask`` inputs."""

    _supports_flex_attn = True


def attn_implementation(config: Any) -> str:
    """Attention backend a config was resolved to (``sdpa``, ``eager``, ``flex_attention``...; default ``sdpa``)."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


def video_timestamps(processor: Any, frame_indices: list[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds written before each merged frame group of a video by a Qwen3-VL ``processor``."""
    return processor._calculate_timestamps(frame_indices, fps, temporal_patch_size)


@contextmanager
def many_recompiles(per_function: int = 64, total: int = 1024) -> Iterator[None]:
    """Let ``torch.compile`` keep up to ``per_function`` graphs of one function (dynamo's default is 8)."""
    with torch._dynamo.config.patch(recompile_limit=per_function, accumulated_recompile_limit=total):
        yield


class _TextInputs(Exception):
    """Raised by :func:`text_decoder_inputs`' hook to stop the forward once the text decoder's inputs exist."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("text decoder inputs captured")
        self.kwargs = kwargs


TEXT_DECODER_INPUTS = ("inputs_embeds", "visual_pos_masks", "deepstack_visual_embeds")


def text_decoder_inputs(vlm: Any, **inputs: Any) -> dict[str, Any]:
    """Run ``vlm`` (a ``Qwen3VLModel``: AR or bard_vl) up to its text decoder and return that call's
    ``inputs_embeds``, ``visual_pos_masks`` and ``deepstack_visual_embeds`` (the latter two ``None`` without media).

    transformers 5.18's ``Qwen3VLModel.forward`` embeds the tokens, runs the vision tower, scatters its features
    into the placeholder positions and calls ``self.language_model(inputs_embeds=..., visual_pos_masks=...,
    deepstack_visual_embeds=...)``; a forward pre-hook on the text decoder takes those arguments and stops the
    forward there, so the text layers do not run. ``inputs``: ``Qwen3VLModel.forward``'s keyword arguments
    (``input_ids``, media, and ``position_ids``, which keeps it from computing positions it would not use).
    """

    def capture(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        raise _TextInputs(kwargs)

    handle = vlm.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        vlm(**inputs, use_cache=False)
    except _TextInputs as got:
        missing = [k for k in TEXT_DECODER_INPUTS if k not in got.kwargs]
        if missing:  # pragma: no cover - a transformers version that calls its text decoder differently
            raise RuntimeError(f"Qwen3VLModel called its text decoder without {missing}; nemo_bard supports the "
                               "transformers version its integrations check") from None
        return {k: got.kwargs[k] for k in TEXT_DECODER_INPUTS}
    finally:
        handle.remove()
    raise RuntimeError("Qwen3VLModel.forward returned without calling its text decoder")  # pragma: no cover


def add_deepstack(text_model: Any, hidden: Any, visual_pos_masks: Any, features: Any) -> Any:
    """``hidden`` with one layer's deepstack ``features`` added at the visual positions (what Qwen3-VL's text
    decoder does after each of its first layers)."""
    return text_model._deepstack_process(hidden, visual_pos_masks, features)


__all__ = ["FlexAttentionSupport", "add_deepstack", "attn_implementation", "many_recompiles", "text_decoder_inputs",
           "video_timestamps"]
