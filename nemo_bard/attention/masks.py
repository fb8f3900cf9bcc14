"""Block attention masks for BARD (docs/method.md §2 and §4), from one definition.

Every token carries a *kind* (prefix / clean / noisy / pad) and a *block id*.
:func:`attention_allowed` is the only place the attention rule is written; the
dense SDPA mask, the FlexAttention ``mask_mod`` and the inference masks are all
evaluated from it.

Rule (query row -> key column, True = may attend):

* prefix/clean query -> prefix/clean key with ``block(key) <= block(query)``
  (block-causal; bidirectional inside a block). With ``clean_attention="causal"``
  the prefix/clean stream is token-causal instead (an ablation knob).
  Clean queries never see noisy keys.
* noisy query -> every prefix key, clean keys of strictly earlier blocks, and
  noisy keys of its own block.
* padding sees nothing and is seen by nothing. The one exception is the
  diagonal of a padding *query* row: SDPA turns a fully masked row into NaN,
  and NaN values would leak into real rows through ``0 * NaN`` in ``P @ V``.
  No real token ever attends a padding key.
"""

from __future__ import annotations

from typing import Literal

import torch

PREFIX, CLEAN, NOISY, PAD = 0, 1, 2, 3
CleanAttention = Literal["block_causal", "causal"]
CLEAN_ATTENTION_MODES = ("block_causal", "causal")


def _check_mode(clean_attention: str) -> bool:
    if clean_attention not in CLEAN_ATTENTION_MODES:
        raise ValueError(
            f"clean_attention={clean_attention!r} is not supported; use one of {CLEAN_ATTENTION_MODES}"
        )
    return clean_attention == "causal"


def attention_allowed(
    q_kind: torch.Tensor,
    q_block: torch.Tensor,
    q_idx: torch.Tensor,
    k_kind: torch.Tensor,
    k_block: torch.Tensor,
    k_idx: torch.Tensor,
    causal_clean: bool = False,
) -> torch.Tensor:
    """The BARD attention rule on broadcastable tensors (also usable as a Flex ``mask_mod`` body).

    ``*_idx`` are positions in one shared coordinate (sequence index for training,
    cache slot for inference); they are used for the diagonal and for causal mode.
    """
    q_ctx = (q_kind == PREFIX) | (q_kind == CLEAN)
    k_ctx = (k_kind == PREFIX) | (k_kind == CLEAN)
    ctx_order = (k_idx <= q_idx) if causal_clean else (k_block <= q_block)
    ctx_rule = q_ctx & k_ctx & ctx_order
    noisy_rule = (q_kind == NOISY) & (
        (k_kind == PREFIX) | ((k_kind == CLEAN) & (k_block < q_block)) | ((k_kind == NOISY) & (k_block == q_block))
    )
    pad_diag = (q_kind == PAD) & (k_idx == q_idx)
    return ctx_rule | noisy_rule | pad_diag


def num_prompt_blocks(prompt_len: torch.Tensor | int, block_size: int) -> torch.Tensor | int:
    """ceil(P / B): the id of the first response block (§2)."""
    return (prompt_len + block_size - 1) // block_size


def training_token_meta(
    prefix_lens: torch.Tensor, resp_lens: torch.Tensor, block_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kinds and block ids of the ``[prefix P | clean R | noisy R | pad]`` layout (§2, §3).

    Args:
        prefix_lens: ``[N]`` prefix lengths P_i.
        resp_lens: ``[N]`` padded response lengths R_i (multiples of ``block_size``).
        block_size: B.
        seq_len: padded batch length L (>= max P_i + 2 R_i).

    Returns:
        ``(kind, block)``, both ``[N, L]`` int64.
    """
    if bool((resp_lens % block_size != 0).any()):
        raise ValueError(f"response lengths {resp_lens.tolist()} must be multiples of block_size={block_size}")
    idx = torch.arange(seq_len, device=prefix_lens.device)[None, :]
    p = prefix_lens[:, None]
    r = resp_lens[:, None]
    kind = torch.full((prefix_lens.shape[0], seq_len), PAD, dtype=torch.long, device=prefix_lens.device)
    kind = torch.where(idx < p + 2 * r, torch.full_like(kind, NOISY), kind)
    kind = torch.where(idx < p + r, torch.full_like(kind, CLEAN), kind)
    kind = torch.where(idx < p, torch.full_like(kind, PREFIX), kind)
    first_resp_block = num_prompt_blocks(p, block_size)
    block = torch.where(
        kind == PREFIX,
        idx // block_size,
        torch.where(
            kind == CLEAN,
            first_resp_block + (idx - p) // block_size,
            torch.where(kind == NOISY, first_resp_block + (idx - p - r) // block_size, torch.full_like(idx, -1)),
        ),
    )
    return kind, block


def dense_mask(
    kind: torch.Tensor,
    block: torch.Tensor,
    clean_attention: CleanAttention = "block_causal",
    q_slice: slice | None = None,
) -> torch.Tensor:
    """Dense boolean ``[N, 1, Lq, L]`` mask (True = attend) for SDPA.

    ``q_slice`` selects query rows (keys are always the whole sequence); the
    inference path uses it to take the rows of the tokens being forwarded.
    """
    causal = _check_mode(clean_attention)
    idx = torch.arange(kind.shape[1], device=kind.device)
    q = q_slice or slice(None)
    allowed = attention_allowed(
        kind[:, q, None], block[:, q, None], idx[q][None, :, None],
        kind[:, None, :], block[:, None, :], idx[None, None, :],
        causal,
    )
    return allowed[:, None]


_compiled_create_block_mask = None


def _block_mask_builder(compile: bool):
    """``create_block_mask``, or one cached ``torch.compile`` of it with dynamic shapes (a new sequence length
    or batch size does not recompile; the mask is evaluated block-sparsely instead of materialising
    ``[N, Q, K]`` on the device)."""
    global _compiled_create_block_mask
    # FlexAttention: ~0.6 s on top of torch, paid only by the flex mask backend
    from torch.nn.attention.flex_attention import create_block_mask

    if not compile:
        return create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask, dynamic=True)
    return _compiled_create_block_mask


def flex_block_mask(
    kind: torch.Tensor,
    block: torch.Tensor,
    clean_attention: CleanAttention = "block_causal",
    q_offset: int = 0,
    q_len: int | None = None,
    block_size_flex: int | tuple[int, int] = 128,
    compile: bool = False,
):
    """FlexAttention ``BlockMask`` evaluating the same rule as :func:`dense_mask`, built on ``kind``'s device.

    Query ``i`` of the mask is token ``q_offset + i`` of the key sequence. ``compile`` builds it with a
    compiled ``create_block_mask`` (GPU training: no dense ``[N, Q, K]`` intermediate).
    """
    causal = _check_mode(clean_attention)
    n, kv_len = kind.shape
    q_len = kv_len - q_offset if q_len is None else q_len

    def mask_mod(b, h, q_idx, kv_idx):
        qi = q_idx + q_offset
        return attention_allowed(kind[b, qi], block[b, qi], qi, kind[b, kv_idx], block[b, kv_idx], kv_idx, causal)

    return _block_mask_builder(compile)(
        mask_mod, B=n, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=kind.device, BLOCK_SIZE=block_size_flex,
    )


def token_meta_mask(
    kind: torch.Tensor,
    block: torch.Tensor,
    clean_attention: CleanAttention = "block_causal",
    backend: Literal["dense", "flex"] = "dense",
    compile: bool = False,
):
    """Dense ``[N,1,L,L]`` bool mask or Flex ``BlockMask`` of token kinds / block ids, on their device."""
    if backend == "dense":
        return dense_mask(kind, block, clean_attention)
    if backend == "flex":
        return flex_block_mask(kind, block, clean_attention, compile=compile)
    raise ValueError(f"mask backend {backend!r} is not one of 'dense', 'flex'")


def training_mask(
    prefix_lens: torch.Tensor,
    resp_lens: torch.Tensor,
    block_size: int,
    seq_len: int,
    clean_attention: CleanAttention = "block_causal",
    backend: Literal["dense", "flex"] = "dense",
    device: torch.device | str | None = None,
    compile: bool = False,
):
    """The §4 training mask for a batch, dense ``[N,1,L,L]`` bool or a Flex ``BlockMask``, built on ``device``
    (default: the device of ``prefix_lens``). ``compile``: compiled ``BlockMask`` construction (flex)."""
    kind, block = training_token_meta(prefix_lens, resp_lens, block_size, seq_len)
    if device is not None:
        kind, block = kind.to(device), block.to(device)
    return token_meta_mask(kind, block, clean_attention, backend, compile)


def prompt_token_meta(
    attention_mask_2d: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kinds and block ids of (left- or right-) padded prompts: block(i) = i // B over real tokens."""
    valid = attention_mask_2d.bool()
    pos = valid.long().cumsum(-1) - 1
    kind = torch.where(valid, torch.full_like(pos, PREFIX), torch.full_like(pos, PAD))
    block = torch.where(valid, pos // block_size, torch.full_like(pos, -1))
    return kind, block


def prefill_mask(
    attention_mask_2d: torch.Tensor, block_size: int, clean_attention: CleanAttention = "block_causal"
) -> torch.Tensor:
    """Inference prefill mask: block-causal over the prompt, padding isolated. ``[N,1,L,L]`` bool."""
    kind, block = prompt_token_meta(attention_mask_2d, block_size)
    return dense_mask(kind, block, clean_attention)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask -> additive float mask (0 / finfo.min), for eager attention."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)
