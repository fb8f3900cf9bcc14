"""Length-aware, data-parallel sampler driven by a dataset's ``length`` column."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort by length inside mega-batches so a micro-batch holds similar lengths.

    Every rank computes the same global order from ``seed + epoch``; mega-batches span
    ``batch_size * num_replicas * mult`` samples and rank ``r`` takes every ``num_replicas``-th index,
    so the ranks' k-th micro-batches have similar lengths. The tail that does not fill one step on all
    ranks is dropped, like ``drop_last``.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
        mult: int = 50,
    ) -> None:
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.mult, self.epoch = seed, max(1, mult), 0
        self.per_rank = len(lengths) // (batch_size * num_replicas) * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=gen)
        mega = self.batch_size * self.num_replicas * self.mult
        chunks = [c[torch.argsort(self.lengths[c], descending=True, stable=True)] for c in perm.split(mega)]
        return torch.cat(chunks)

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()[self.rank :: self.num_replicas][: self.per_rank]
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.per_rank
