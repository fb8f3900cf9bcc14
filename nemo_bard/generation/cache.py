"""A preallocated KV cache for block-diffusion decoding.

Every layer holds ``[batch, kv_heads, capacity, head_dim]`` key/value buffers and
all layers share one *committed length*. :meth:`BlockKVCache.update` (called by
the attention layers) writes the forwarded tokens right after the committed
length and returns a view up to the written end; nothing is committed until
:meth:`BlockKVCache.commit` advances the pointer. A block being denoised is thus
written into scratch slots that the next forward overwrites: appends never
re-copy the cache. Finished rows are dropped with :meth:`BlockKVCache.select_rows`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class BlockKVLayer(CacheLayerMixin):
    """One layer of :class:`BlockKVCache`; buffers are allocated on the first update."""

    is_sliding = False

    def __init__(self, owner: "BlockKVCache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _ = key_states.shape
        cap = self.owner.capacity
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, cap, key_states.shape[-1])
        self.values = value_states.new_zeros(b, h, cap, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.owner.length
        end = start + key_states.shape[-2]
        if end > self.owner.capacity:
            raise RuntimeError(f"BlockKVCache overflow: {end} slots needed, capacity {self.owner.capacity}")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.capacity

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)


class BlockKVCache(Cache):
    """KV cache with a committed-length pointer shared by all layers (see the module docstring).

    Args:
        num_layers: number of text decoder layers.
        capacity: number of slots (prompt + all response blocks).
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = int(capacity)
        self.length = 0
        super().__init__(layers=[BlockKVLayer(self) for _ in range(num_layers)])

    def commit(self, n: int) -> None:
        """Keep the last ``n`` written slots: advance the committed length by ``n``."""
        if self.length + n > self.capacity:
            raise RuntimeError(f"BlockKVCache: cannot commit {n} slots past capacity {self.capacity}")
        self.length += n

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (compaction when sequences finish)."""
        for layer in self.layers:
            layer.select_rows(rows)


class StaticKVLayer(CacheLayerMixin):
    """One layer of :class:`StaticKVCache`: fixed ``[rows, kv_heads, capacity, head_dim]`` buffers."""

    is_sliding = False

    def __init__(self, owner: "StaticKVCache", keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner, self.keys, self.values = owner, keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # pragma: no cover
        raise RuntimeError("StaticKVCache buffers are allocated up front")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, _, q, _ = key_states.shape
        if self.owner.prefill:  # eager prompt prefill from slot 0: keys/values of the prompt only
            self.keys[:n, :, :q] = key_states
            self.values[:n, :, :q] = value_states
            return self.keys[:n, :, :q], self.values[:n, :, :q]
        index = self.owner.write_index[:q]
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.capacity, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.owner.capacity


class StaticKVCache(Cache):
    """KV cache with static shapes for graph-captured decoding.

    Buffers never change shape or address: every decoding forward writes its ``q`` tokens at the slots
    ``write_index[:q]`` (a device tensor the engine sets before the forward, so a captured CUDA graph
    replays with new positions) and attends over all ``capacity`` slots under an explicit mask. In
    ``prefill`` mode (the eager prompt forward) writes go to slots ``[0, q)`` of the first rows.

    Args:
        num_layers, rows, kv_heads, head_dim, capacity: buffer shape per layer.
        dtype, device: of the buffers (the model's).
    """

    def __init__(
        self, num_layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.rows, self.capacity, self.prefill = int(rows), int(capacity), False
        self.write_index = torch.zeros(0, dtype=torch.long, device=device)
        shape = (self.rows, kv_heads, self.capacity, head_dim)
        layers = [StaticKVLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                                torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        super().__init__(layers=layers)

    def copy_rows_from(self, other: "StaticKVCache", rows: torch.Tensor) -> None:
        """``self[i] = other[rows[i]]`` for every layer (moving running rows into a smaller batch bucket)."""
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys[: rows.numel()].copy_(theirs.keys.index_select(0, rows))
            mine.values[: rows.numel()].copy_(theirs.values.index_select(0, rows))
