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
