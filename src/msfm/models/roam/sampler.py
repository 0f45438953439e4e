"""Which training slides an epoch sees: class-balanced draws with replacement, a function of (seed, epoch) so that
a resumed run sees the same slides in the same order."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from msfm.runtime.devices import rank_world

__all__ = ["BalancedEpochSampler", "mix_seed", "sample_weights"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several non-negative integers (independent streams per (seed, fold, epoch, ...))."""
    return int(
        np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
        >> 1
    )


def sample_weights(labels: Sequence[int] | np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Per-slide sampling weights ``N / N_class`` (the class-balanced sampler of ROAM and CLAM).

    Shape:
        labels: ``[N]`` -> float64 ``[N]``.
    """
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=n_classes or 0).astype(np.float64)
    return y.shape[0] / counts[y]


class BalancedEpochSampler(torch.utils.data.Sampler):
    """Draws ``N`` training slides per epoch, class-balanced with replacement (or a plain shuffle).

    The draw of epoch ``e`` depends only on ``(seed, e)`` (Lightning calls :meth:`set_epoch`), so a resumed run
    sees the same slides in the same order. Under DDP each rank takes every ``world``-th position. Items are
    ``(index, epoch, position)`` tuples: the dataset derives the ROI-dropout subset from them.

    Args:
        labels: Class index of each training slide.
        seed: Base seed.
        balanced: Weights ``N / N_class`` with replacement; False: a permutation.
        num_replicas: Ranks (None: from ``torch.distributed`` when initialised, else 1).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        seed: int,
        balanced: bool = True,
        num_replicas: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.weights = torch.as_tensor(sample_weights(self.labels), dtype=torch.float64)
        self.seed = int(seed)
        self.balanced = balanced
        self.num_replicas = num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of an epoch."""
        self.epoch = int(epoch)

    def _world(self) -> tuple[int, int]:
        rank, world = rank_world()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            world = self.num_replicas or world
        return world, rank

    def __len__(self) -> int:
        world = self.num_replicas or self._world()[0]
        return math.ceil(self.labels.shape[0] / world)

    def __iter__(self):
        n = self.labels.shape[0]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.balanced:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        world, rank = self._world()
        total = math.ceil(n / world) * world
        for pos in range(rank, total, world):
            yield int(order[pos % n]), self.epoch, pos
