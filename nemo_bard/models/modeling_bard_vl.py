"""``BardVLForConditionalGeneration``: Qwen3-VL with block-diffusion attention (torch + transformers only).

Same module tree and weight names as Qwen3-VL (``model.visual.*``,
``model.language_model.*``, ``lm_head.weight``); no new parameters. Differences:

* text attention follows an explicit block mask (never the causal default): a
  4-D mask or ``BlockMask`` is used as given; a 2-D padding mask (or none) is
  turned into the block-causal prompt mask at ``config.block_size`` (prompt
  tokens see their own block and every earlier one);
* logits are predicted at the *same* position (no shift);
* ``logits_mask`` selects the positions that need logits, so callers never
  materialise ``[B, L, V]``;
* the text decoder accepts FlexAttention ``BlockMask`` inputs
  (``attn_implementation={"text_config": "flex_attention", "vision_config": "sdpa", "": "sdpa"}``);
* ``generate`` runs block-diffusion decoding (``nemo_bard.generation``).

The NeMo AutoModel training class (checkpointing mixin, capabilities, parallelizer) subclasses this
one in :mod:`nemo_bard.integrations.nemo`; both share weights and this forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLCausalLMOutputWithPast,
    Qwen3VLForConditionalGeneration,
    Qwen3VLTextModel,
)
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from nemo_bard.attention.masks import additive_mask, prefill_mask
from nemo_bard.attention.positions import mrope_positions
from nemo_bard.generation.decode import block_diffusion_generate
from nemo_bard.integrations.hf import FlexAttentionSupport, attn_implementation
from nemo_bard.models.configuration_bard_vl import BardVLConfig, BardVLTextConfig

# FlexAttention on a GPU: always the full Triton kernel. For short sequences torch otherwise picks its
# flex-decoding kernel, which has no backward and no valid configuration for some shapes (torch 2.11 on an H100:
# NoValidChoicesError for a 92-token, head_dim-16 training batch).
FLEX_KERNEL_OPTIONS = {"BACKEND": "TRITON"}


def text_attn_implementation(model: torch.nn.Module) -> str:
    """Attention backend of the text decoder (``sdpa``, ``eager``, ``flex_attention``...)."""
    cfg = model.config.text_config if hasattr(model.config, "text_config") else model.config
    return attn_implementation(cfg)


class BardVLTextModel(FlexAttentionSupport, Qwen3VLTextModel):
    """The Qwen3-VL text decoder, built for a bard_vl config; FlexAttention ``BlockMask`` inputs allowed."""

    config_class = BardVLTextConfig


class BardVLForConditionalGeneration(FlexAttentionSupport, Qwen3VLForConditionalGeneration):
    """Block-diffusion vision-language model with the Qwen3-VL architecture."""

    config_class = BardVLConfig

    def mask_for_backend(self, mask: Any) -> Any:
        """Adapt a boolean keep-mask to the text attention backend (eager needs an additive mask)."""
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and text_attn_implementation(self) == "eager":
            return additive_mask(mask, self.lm_head.weight.dtype)
        return mask

    # ``model.rope_positions(input_ids, attention_mask_2d, ...)``: :func:`mrope_positions` with this model
    rope_positions = mrope_positions

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Qwen3VLCausalLMOutputWithPast:
        """Forward with an explicit block mask.

        Args:
            attention_mask: ``[B,1,Q,K]`` boolean keep-mask or a Flex ``BlockMask`` (used as given), or a
                ``[B, L]`` padding mask / ``None`` (the block-causal prompt mask is built from it).
            position_ids: ``[3, B, L]`` mRoPE positions. Required with a 4-D mask or a cache; otherwise
                computed from the padding mask and the media grids.
            labels: ``[B, L]`` targets at the *same* position (``-100`` = ignore); the loss is the
                token-mean cross-entropy and logits are computed only where labels are set (unless
                ``logits_mask`` says otherwise).
            logits_mask: ``[B, L]`` bool; when given, ``logits`` is ``[N, V]`` for the N selected positions
                in row-major order.
            logits_to_keep: as in Hugging Face (ignored when ``logits_mask`` is given).
        """
        is_explicit = attention_mask is not None and not (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        )
        if not is_explicit:
            if past_key_values is not None and position_ids is None:
                raise ValueError("bard_vl: pass explicit position_ids (and a 4-D mask) when using a KV cache")
            ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
            mask_2d = attention_mask if attention_mask is not None else torch.ones(ref.shape, device=ref.device)
            if position_ids is None:
                if input_ids is None:
                    raise ValueError("bard_vl: position_ids are required when only inputs_embeds is given")
                position_ids, _ = self.rope_positions(
                    input_ids, mask_2d, mm_token_type_ids, image_grid_thw, video_grid_thw
                )
            attention_mask = prefill_mask(mask_2d, self.config.block_size)
        elif position_ids is None:
            raise ValueError("bard_vl: an explicit 4-D attention mask needs explicit 3-D position_ids")
        attention_mask = self.mask_for_backend(attention_mask)
        if isinstance(attention_mask, BlockMask) and attention_mask.kv_num_blocks.is_cuda:
            kwargs.setdefault("kernel_options", dict(FLEX_KERNEL_OPTIONS))

        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_mask is None and labels is not None:
            logits_mask = labels != -100
        if logits_mask is not None:
            logits = self.lm_head(hidden[logits_mask])
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels[logits_mask])
        return Qwen3VLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=None,
        )

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any):
        """Block-diffusion decoding; see :func:`nemo_bard.generation.decode.block_diffusion_generate`."""
        return block_diffusion_generate(self, *args, **kwargs)


# Qwen3-VL builds its text decoder with AutoModel.from_config(config.text_config): the bard_vl text config
# routes that to the bard_vl text decoder (same weights, FlexAttention declared).
AutoModel.register(BardVLTextConfig, BardVLTextModel, exist_ok=True)
AutoModelForImageTextToText.register(BardVLConfig, BardVLForConditionalGeneration, exist_ok=True)
AutoProcessor.register(BardVLConfig, Qwen3VLProcessor, exist_ok=True)
