"""Which examples form each micro-batch and window: deterministic, resumable, rank-aware.

An epoch is a permutation of the training set seeded by (seed, epoch), so the order never depends
on RNG state and a resumed run can jump to any micro-batch. A *global* micro-batch holds
``micro_batch_size * world_size`` examples; rank r takes every world_size-th of them (so the last,
short global micro-batch is shared as evenly as possible). A window is ``gradient_accumulation_steps``
consecutive micro-batches; windows never cross an epoch boundary, and the epoch's last window may be
short (it is stepped, not dropped). A position is (epoch, index of the next micro-batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plan:
    num_examples: int
    micro_batch_size: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / (self.micro_batch_size * self.world_size))

    @property
    def windows_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.accumulation)

    def epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def micro_batch(self, order: list[int], index: int, rank: int) -> list[int]:
        """Example indices of this rank's part of global micro-batch ``index``."""
        size = self.micro_batch_size * self.world_size
        chunk = order[index * size:(index + 1) * size]
        return chunk[rank::self.world_size]

    def global_micro_batch(self, order: list[int], index: int) -> list[int]:
        size = self.micro_batch_size * self.world_size
        return order[index * size:(index + 1) * size]

    def window(self, window_index: int) -> range:
        """Micro-batch indices of window ``window_index`` of an epoch."""
        start = window_index * self.accumulation
        return range(start, min(start + self.accumulation, self.micro_batches_per_epoch))

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        total = epochs * self.windows_per_epoch
        return min(total, max_steps) if max_steps is not None else total
