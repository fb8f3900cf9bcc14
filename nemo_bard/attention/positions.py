"""Qwen3-VL's 3-D mRoPE positions of a (padded) prompt, for any Qwen3-VL model (AR or bard_vl).

Used by the bard_vl model (``model.rope_positions``) and the decoding engine; it reads only the model's public
``get_rope_index``.
"""

from __future__ import annotations

import torch


def mrope_positions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask_2d: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D mRoPE positions ``[3, B, L]`` and deltas ``[B, 1]`` of (padded) prompts for any Qwen3-VL ``model``.

    With images/videos they come from the model's ``get_rope_index``; text-only prompts count their real
    tokens (0..n-1 on all three axes, deltas 0, as ``get_rope_index`` would give).
    """
    if attention_mask_2d is None:
        attention_mask_2d = torch.ones_like(input_ids)
    if image_grid_thw is not None or video_grid_thw is not None:
        if mm_token_type_ids is None:
            raise ValueError(
                "bard_vl: images/videos were given without mm_token_type_ids; pass the processor's "
                "mm_token_type_ids so mRoPE positions can be computed"
            )
        return model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, attention_mask=attention_mask_2d,
        )
    pos = (attention_mask_2d.bool().long().cumsum(-1) - 1).clamp_min(0)
    deltas = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)
    return pos[None].expand(3, -1, -1).contiguous(), deltas
