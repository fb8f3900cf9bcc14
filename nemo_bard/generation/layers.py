"""The Qwen3-VL text decoder layer of a decoding step, computed with fewer GPU kernels.

A decoding forward is short (``B``, ``2B`` or 1 queries), so its cost on a GPU is set by how many kernels it
launches rather than by arithmetic: profiled on an H100 (2B shape, CUDA graphs), the engine with transformers'
layer replayed ~2,190 kernels per forward, most a few microseconds long. :func:`decoder_layer_step` computes the
same layer from the same weights with fewer: ``torch.nn.functional.rms_norm`` (one fused kernel on CUDA instead
of the upcast / square / mean / add / rsqrt / multiply / downcast sequence), one rotary pass over queries and keys
together, an additive mask converted once per step (:func:`sdpa_mask`) instead of in every layer and, with the
weights the engine keeps stacked (:func:`stack_weights`), one matrix product for the query, key and value
projections and one norm over the query and key heads together. On H100s (two runs, not side by side): 6.3-6.5 ms
per BARD forward before the first of these, 4.65-4.70 after (README, Decoding engines).

Every operation and its order are those of transformers' ``Qwen3VLTextDecoderLayer`` with the ``sdpa``
backend (same casts, same rounding points): on CPU the results are bit-identical (tested in fp32 and bf16);
on CUDA the fused ``rms_norm`` kernel may round bf16 differently. The engine tests compare the engine's tokens
with the eager decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemo_bard.generation.cache import StaticKVLayer


def sdpa_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as the additive mask ``scaled_dot_product_attention`` makes of it (0 / -inf)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Qwen3-VL's RMSNorm: normalised in fp32, rounded to ``x``'s dtype, then scaled by the weight."""
    return F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon) * norm.weight


def stackable(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s q/k/v projections are plain ``nn.Linear`` layers without bias, so that one product with
    their stacked weights equals calling them (an adapter, a quantized or an FSDP-wrapped layer has its own
    forward), and its q and k norms use the same epsilon."""
    attn = layer.self_attn
    return (all(type(p) is torch.nn.Linear and p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            and attn.q_norm.variance_epsilon == attn.k_norm.variance_epsilon)  # the q and k heads share one norm call


@dataclass
class StackedWeights:
    """One decoder layer's weights stacked so that a step runs fewer, larger operations (see
    :func:`stack_weights`)."""

    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]: q, k, v projection rows
    qk_norm: torch.Tensor  # [heads + kv_heads, head_dim]: q_norm's weight per query head, then k_norm's per key head


def stack_weights(layer: torch.nn.Module, out: StackedWeights | None = None) -> StackedWeights:
    """``layer``'s q/k/v weights and per-head q/k norm weights stacked (written into ``out`` when given, so that a
    captured CUDA graph keeps reading the same buffers).

    Each output column of a product with stacked weights is the same dot product as with the separate weight,
    and the norms are per head vector, so the stacked step computes the same values with fewer operations. (Gate
    and up are not stacked: no measurable gain on CPU, and a copy of them would add ~45 % to an 8B model's weights.)
    """
    if not stackable(layer):
        raise ValueError("stack_weights: the q/k/v projections must be plain nn.Linear layers without bias")
    attn = layer.self_attn
    heads = attn.q_proj.out_features // attn.head_dim
    kv_heads = attn.k_proj.out_features // attn.head_dim
    parts = {
        "qkv": (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
        "qk_norm": (attn.q_norm.weight.expand(heads, -1), attn.k_norm.weight.expand(kv_heads, -1)),
    }
    with torch.inference_mode(False), torch.no_grad():  # normal tensors: refreshable in and out of inference mode
        if out is None:
            return StackedWeights(**{k: torch.cat(v, dim=0) for k, v in parts.items()})
        for k, v in parts.items():
            torch.cat(v, dim=0, out=getattr(out, k))
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_layer_step(layer: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, cache: StaticKVLayer, stacked: StackedWeights | None = None) -> torch.Tensor:
    """One ``Qwen3VLTextDecoderLayer`` (sdpa) on ``h`` ``[rows, q, hidden]`` writing its keys/values to ``cache``.

    ``mask`` is the additive ``[rows, 1, q, capacity]`` mask of :func:`sdpa_mask`; ``cos``/``sin`` are the
    rotary tables of the queries' positions ``[rows, q, head_dim]``; ``stacked`` (:func:`stack_weights`) turns
    the q/k/v projections into one matrix product and the q and k norms into one call.
    """
    attn, mlp = layer.self_attn, layer.mlp
    rows, q, _ = h.shape
    x = rms_norm(h, layer.input_layernorm)
    heads = attn.q_proj.out_features // attn.head_dim
    if stacked is None:
        shape = (rows, q, -1, attn.head_dim)
        queries = rms_norm(attn.q_proj(x).reshape(shape), attn.q_norm)
        keys = rms_norm(attn.k_proj(x).reshape(shape), attn.k_norm)
        qk = torch.cat((queries, keys), dim=2).transpose(1, 2)
        values = attn.v_proj(x).reshape(shape).transpose(1, 2)
    else:  # [q heads | k heads | v heads] from one product; q and k normalised together (per head vector)
        out = F.linear(x, stacked.qkv).view(rows, q, -1, attn.head_dim)
        norm = stacked.qk_norm.shape[0]
        qk = (F.rms_norm(out[:, :, :norm], (attn.head_dim,), eps=attn.q_norm.variance_epsilon)
              * stacked.qk_norm).transpose(1, 2)
        values = out[:, :, norm:].transpose(1, 2)
    qk = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]  # one rotary pass for q and k (element-wise)
    all_keys, all_values = cache.update(qk[:, heads:], values)
    groups = heads // all_keys.shape[1]
    # On CPU, SDPA's own grouped-query support saves repeating keys and values (same results, tested); on CUDA
    # (torch 2.11) a masked call with enable_gqa falls back to the slow math kernel: transformers' repeat_kv there.
    native_gqa = groups > 1 and h.device.type == "cpu"
    if groups > 1 and not native_gqa:
        all_keys = all_keys[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
        all_values = all_values[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
    out = F.scaled_dot_product_attention(qk[:, :heads], all_keys, all_values, attn_mask=mask, scale=attn.scaling,
                                         enable_gqa=native_gqa)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(rows, q, -1))
    x = rms_norm(h, layer.post_attention_layernorm)
    return h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


__all__ = ["StackedWeights", "decoder_layer_step", "rms_norm", "sdpa_mask", "stack_weights", "stackable"]
