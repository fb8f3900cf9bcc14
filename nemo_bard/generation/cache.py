"""The decoding engine's KV cache: static buffers, written at per-row slots.

Every layer holds ``[rows, kv_heads, capacity, head_dim]`` key/value buffers that never change shape or address
(so a captured CUDA graph replays on them). Each row of the batch is an independent sequence: a decoding forward
writes its ``q`` tokens of row ``r`` at the slots ``write_index[r]`` (a device tensor the engine sets before the
forward), and attention always spans all ``capacity`` slots under an explicit mask (which slots are committed is
the engine's business, not the cache's). A prompt prefill writes the prompts' keys/values to slots ``[0, q)`` of
the rows ``prefill_rows``; that is how a request joins a running batch in a free row.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


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
        n, heads, q, dim = key_states.shape
        owner = self.owner
        if owner.prefill_rows is not None:  # prompt prefill from slot 0 into the given rows: the prompt's own K/V
            self.keys[:, :, :q].index_copy_(0, owner.prefill_rows, key_states)
            self.values[:, :, :q].index_copy_(0, owner.prefill_rows, value_states)
            return key_states, value_states
        index = owner.write_index[:, None, :q, None].expand(n, heads, q, dim)  # [n, q] per-row slots
        keys, values = self.keys[:n], self.values[:n]
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.capacity, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.owner.capacity


class StaticKVCache(Cache):
    """KV cache with static shapes for graph-captured decoding (see the module docstring).

    Args:
        num_layers, rows, kv_heads, head_dim, capacity: buffer shape per layer.
        dtype, device: of the buffers (the model's).
    """

    def __init__(
        self, num_layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.rows, self.capacity = int(rows), int(capacity)
        self.prefill_rows: torch.Tensor | None = None  # set during a prompt prefill
        self.write_index = torch.zeros(self.rows, 0, dtype=torch.long, device=device)
        shape = (self.rows, kv_heads, self.capacity, head_dim)
        layers = [StaticKVLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                                torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        super().__init__(layers=layers)

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``row[dst[i]] = row[src[i]]`` in every layer (packing running rows into the smallest batch bucket)."""
        for layer in self.layers:
            layer.keys[dst] = layer.keys[src]
            layer.values[dst] = layer.values[src]
