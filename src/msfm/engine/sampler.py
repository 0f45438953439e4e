"""A data loader that resumes mid-epoch exactly, on one process or under DDP.

Lightning restores model, optimiser, scheduler and loop counters from ``last.ckpt``, but a plain ``DataLoader``
restarts its epoch from the first batch, so a run killed mid-epoch would see a different data order after resume
than an uninterrupted run. :class:`ResumableDataLoader` fixes that:

* the order is a pure function of ``(seed, epoch)`` (Lightning calls ``set_epoch`` before each epoch), so it does
  not depend on the global RNG;
* it implements ``state_dict`` / ``load_state_dict``; Lightning stores the number of batches already delivered in
  the checkpoint and, on resume, the sampler skips exactly those;
* the sampler subclasses ``DistributedSampler`` and shards by the process group it finds at iteration time, so
  Lightning does not wrap it, and each rank skips its own share.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from msfm.errors import MsfmInputError
from msfm.runtime.devices import rank_world

logger = logging.getLogger(__name__)

__all__ = ["BatchStream", "ResumableDataLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Epoch-seeded (optionally shuffled) sampler that shards across ranks and can skip already-seen samples.

    ``DistributedSampler.__init__`` is deliberately not called: it needs an initialised process group, which does
    not exist yet when loaders are built before ``trainer.fit`` launches the ranks. Rank and world size are read
    when iteration starts instead.

    Args:
        data_source: The dataset (only its length is used).
        shuffle: Shuffle with a generator seeded by ``seed + epoch``.
        seed: Base seed of the order.
        drop_last: Under DDP, drop the tail so every rank gets the same number of samples instead of padding by
            repeating samples.
    """

    def __init__(
        self, data_source: Sized, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        self.dataset = data_source
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0
        self._skip_epoch = -1

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        """Number of ranks sharing the data (1 without a process group)."""
        return self._world()[0]

    @num_replicas.setter
    def num_replicas(self, value: int) -> None:
        # DistributedSampler's attribute is derived here; ignore writes (nothing in torch writes it after init).
        pass

    @property
    def rank(self) -> int:  # type: ignore[override]
        """This process's rank (0 without a process group)."""
        return self._world()[1]

    @rank.setter
    def rank(self, value: int) -> None:
        pass

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """Samples per rank per epoch."""
        n, world = len(self.dataset), self.num_replicas
        if self.drop_last and n % world:
            return n // world
        return math.ceil(n / world)

    @num_samples.setter
    def num_samples(self, value: int) -> None:
        pass

    @property
    def total_size(self) -> int:  # type: ignore[override]
        """Samples over all ranks per epoch (after padding or dropping)."""
        return self.num_samples * self.num_replicas

    @total_size.setter
    def total_size(self, value: int) -> None:
        pass

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields.

        Args:
            epoch: Epoch number (Lightning passes the number of finished epochs).
        """
        self.epoch = int(epoch)

    def skip_next(self, n_samples: int, *, epoch: int) -> None:
        """Skip the first ``n_samples`` of this rank's share in the next iteration, if it is epoch ``epoch``.

        Args:
            n_samples: Samples this rank already consumed in epoch ``epoch``.
            epoch: The epoch the skip belongs to; an iteration over another epoch ignores (and clears) it.
        """
        self._skip = max(0, int(n_samples))
        self._skip_epoch = int(epoch)

    @property
    def pending_skip(self) -> int:
        """Samples the next iteration will skip (0 when none or when the epoch does not match)."""
        return self._skip if self._skip_epoch == self.epoch else 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        world, rank = self._world()
        total = self.num_samples * world
        if total > n:
            # Pad by cycling so every rank takes the same number of steps (DDP would hang otherwise).
            order = (order * math.ceil(total / n))[:total]
        else:
            order = order[:total]
        mine = order[rank:total:world]
        skip = self.pending_skip
        self._skip, self._skip_epoch = 0, -1
        return iter(mine[skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position inside an epoch survives a checkpoint/resume cycle.

    Args:
        dataset: A map-style dataset.
        batch_size: Samples per batch (per rank).
        shuffle: Shuffle every epoch (order fixed by ``seed`` and the epoch number).
        seed: Base seed of the order.
        drop_last: Drop a last incomplete batch; under DDP also drop the uneven tail instead of padding.
        **kwargs: Other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ``pin_memory``, ...), except
            ``sampler``/``batch_sampler``.

    Raises:
        MsfmInputError: If ``sampler`` or ``batch_sampler`` is passed.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if "sampler" in kwargs or "batch_sampler" in kwargs:
            msg = "ResumableDataLoader builds its own sampler; remove sampler=/batch_sampler= (use shuffle/seed)."
            raise MsfmInputError(msg)
        # A private generator keeps iterator creation from drawing on the global RNG, which would otherwise shift
        # the random stream of a resumed run relative to an uninterrupted one.
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)  # type: ignore[arg-type]
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self._delivered = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # Runs at the first next(), after Lightning's set_epoch, so pending_skip sees the right epoch.
        self._delivered = self.sampler.pending_skip // (self.batch_size or 1)
        for batch in super().__iter__():
            # Count at the hand-over point: batches prefetched by workers but not yet delivered do not count.
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position inside the current epoch, stored by Lightning in ``last.ckpt``.

        Returns:
            ``{"epoch": ..., "batches": ...}`` (plain ints; loads with ``weights_only=True``).
        """
        return {"epoch": int(self.sampler.epoch), "batches": int(self._delivered)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume inside an epoch: the next iteration skips the batches already trained on.

        Args:
            state: What :meth:`state_dict` returned.
        """
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            # Saved after the epoch's last batch: the next iteration is a fresh epoch, nothing to skip.
            epoch, batches = epoch + 1, 0
        # Set the epoch now too: with workers the first iterator is built before Lightning calls set_epoch.
        self.sampler.set_epoch(epoch)
        self.sampler.skip_next(batches * (self.batch_size or 1), epoch=epoch)
        logger.info("data loader resumes epoch %d after %d batches", epoch, batches)


class BatchStream(torch.utils.data.IterableDataset, abc.ABC):
    """Endless stream of collated micro-batches whose content is a pure function of the batch index.

    Subclasses implement :meth:`batch`: micro-batch ``m`` of ``rank`` out of ``world``. Iteration starts at
    ``skip_batches`` (the micro-batches per rank a resumed run already consumed) in O(1), and DataLoader workers
    take every ``n_workers``-th micro-batch, so a resumed run sees exactly what an uninterrupted run would have.

    Args:
        skip_batches: micro-batches (per rank) already consumed.
    """

    def __init__(self, *, skip_batches: int = 0) -> None:
        super().__init__()
        self.skip_batches = int(skip_batches)

    @abc.abstractmethod
    def batch(self, m: int, rank: int = 0, world: int = 1) -> Any:
        """Collated micro-batch ``m`` of ``rank``."""

    def __iter__(self) -> Iterator[Any]:
        rank, world = rank_world()
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, so worker w makes every n-th micro-batch.
        m = self.skip_batches + worker
        while True:
            yield self.batch(m, rank, world)
            m += n_workers
