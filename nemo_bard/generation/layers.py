"""The Qwen3-VL text decoder layer of a decoding step, computed with fewer GPU kernels.

A decoding forward is short (``B``, ``2B`` or 1 queries), so its cost on a GPU is set by how many kernels it
launches rather than by arithmetic: profiled on an H100 (2B shape, CUDA graphs), the engine with transformers'
layer replayed ~2,190 kernels per forward, most a few microseconds long. :func:`decoder_layer_step` computes the
same layer from the same weights with fewer: ``torch.nn.functional.rms_norm`` (one fused kernel on CUDA instead
of the upcast / square / mean / add / rsqrt / multiply / downcast sequence, four times per layer), one rotary pass
over queries and keys together, one matrix product for the query, key and value projections (the engine keeps
their weights concatenated, :func:`fuse_qkv`) and an additive mask converted once per step (:func:`sdpa_mask`)
instead of in every layer. On H100s (two runs, not side by side): 6.3-6.5 ms per BARD forward before, 4.65-4.70 after
(README, Decoding engines).

Every operation and its order are those of transformers' ``Qwen3VLTextDecoderLayer`` with the ``sdpa``
backend (same casts, same rounding points): on CPU the results are bit-identical (tested in fp32 and bf16);
on CUDA the fused ``rms_norm`` kernel may round bf16 differently. The engine tests compare the engine's tokens
with the eager decoder's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_bard.generation.cache import StaticKVLayer


def sdpa_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as the additive mask ``scaled_dot_product_attention`` makes of it (0 / -inf)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Qwen3-VL's RMSNorm: normalised in fp32, rounded to ``x``'s dtype, then scaled by the weight."""
    return F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon) * norm.weight


def stackable_qkv(attn: torch.nn.Module) -> bool:
    """Whether ``attn``'s q/k/v projections are plain ``nn.Linear`` layers without bias, so that one product with
    their stacked weights equals calling them (an adapter, a quantized or an FSDP-wrapped layer has its own forward)."""
    return all(type(p) is torch.nn.Linear and p.bias is None for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def fuse_qkv(attn: torch.nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
    """The q, k and v projection weights of ``attn`` stacked into one ``[q + k + v, hidden]`` matrix (written into
    ``out`` when given, so that a captured CUDA graph keeps reading the same buffer)."""
    if not stackable_qkv(attn):
        raise ValueError("fuse_qkv: the q/k/v projections must be plain nn.Linear layers without bias")
    parts = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor: refreshable in and out of inference mode
        return torch.cat(parts, dim=0) if out is None else torch.cat(parts, dim=0, out=out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_layer_step(layer: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, cache: StaticKVLayer, qkv: torch.Tensor | None = None) -> torch.Tensor:
    """One ``Qwen3VLTextDecoderLayer`` (sdpa) on ``h`` ``[rows, q, hidden]`` writing its keys/values to ``cache``.

    ``mask`` is the additive ``[rows, 1, q, capacity]`` mask of :func:`sdpa_mask`; ``cos``/``sin`` are the
    rotary tables of the queries' positions ``[rows, q, head_dim]``; ``qkv``, the layer's :func:`fuse_qkv`
    weight, turns the three projections into one matrix product (each output column is the same dot product).
    """
    attn, mlp = layer.self_attn, layer.mlp
    rows, q, _ = h.shape
    x = rms_norm(h, layer.input_layernorm)
    shape = (rows, q, -1, attn.head_dim)
    if qkv is None:
        q_out, k_out, v_out = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    else:
        kv = (qkv.shape[0] - attn.q_proj.out_features) // 2
        q_out, k_out, v_out = F.linear(x, qkv).split((attn.q_proj.out_features, kv, kv), dim=-1)
    queries = rms_norm(q_out.reshape(shape), attn.q_norm).transpose(1, 2)
    keys = rms_norm(k_out.reshape(shape), attn.k_norm).transpose(1, 2)
    values = v_out.reshape(shape).transpose(1, 2)
    heads = queries.shape[1]
    qk = torch.cat((queries, keys), dim=1)  # one rotary pass for both (element-wise: same values)
    qk = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]
    all_keys, all_values = cache.update(qk[:, heads:], values)
    groups = heads // all_keys.shape[1]
    if groups > 1:  # transformers' repeat_kv
        all_keys = all_keys[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
        all_values = all_values[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)
    out = F.scaled_dot_product_attention(qk[:, :heads], all_keys, all_values, attn_mask=mask, scale=attn.scaling)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(rows, q, -1))
    x = rms_norm(h, layer.post_attention_layernorm)
    return h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


__all__ = ["decoder_layer_step", "fuse_qkv", "rms_norm", "sdpa_mask", "stackable_qkv"]
