"""Deterministic index samplers for cell data.

* :class:`LengthBucketBatchSampler` groups cells of similar token length into batches, which cuts padding for the
  scFoundation encoder (its sequence length is the number of expressed genes + 2).
* :class:`BlockShuffleSampler` shuffles contiguous blocks of rows instead of single rows, so that backed h5ad files
  are read in long contiguous runs, and shards the order across distributed ranks with an equal count per rank.

Both take an explicit ``seed`` and a ``set_epoch(epoch)`` hook (as ``torch.utils.data.DistributedSampler``) and use
their own ``numpy.random.Generator``: no global random state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from msfm.errors import MsfmInputError

__all__ = ["BlockShuffleSampler", "LengthBucketBatchSampler", "length_buckets"]


def length_buckets(
    order: Sequence[int] | np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    max_tokens: int | None,
) -> Iterator[np.ndarray]:
    """Cut ``order`` into consecutive batches of at most ``batch_size`` items and ``max_tokens`` padded tokens.

    A batch costs ``n_items * longest`` tokens once padded; an item longer than ``max_tokens`` gets a batch of its
    own. Give ``order = argsort(lengths)`` for length bucketing (little padding per batch).

    Args:
        order: item indices in the order to batch them.
        lengths: token length of every item (indexed by the values of ``order``).
        batch_size: most items per batch.
        max_tokens: most padded tokens per batch (None: no cap).

    Yields:
        ``int64`` arrays of item indices.
    """
    current: list[int] = []
    longest = 0
    for i in order:
        length = int(lengths[i])
        grown = max(longest, length)
        too_many = len(current) >= batch_size
        too_long = max_tokens is not None and bool(current) and grown * (len(current) + 1) > max_tokens
        if too_many or too_long:
            yield np.asarray(current, dtype=np.int64)
            current, grown = [], length
        current.append(int(i))
        longest = grown
    if current:
        yield np.asarray(current, dtype=np.int64)


class LengthBucketBatchSampler:
    """Batches of cell indices with similar lengths (a ``batch_sampler`` for ``torch.utils.data.DataLoader``).

    Cells are sorted by length (ties broken at random when ``shuffle``), cut into consecutive batches of at most
    ``batch_size`` cells and, when ``max_tokens`` is set, at most ``max_tokens`` padded tokens
    (``n_cells * longest``). A cell longer than ``max_tokens`` gets a batch of its own. With ``shuffle`` the batch
    order is permuted each epoch. The number of batches does not depend on the epoch.

    Args:
        lengths: ``[n]`` token length of each cell.
        batch_size: maximum cells per batch.
        max_tokens: optional cap on ``n_cells * max_length`` per batch.
        shuffle: permute ties and batch order (seeded by ``seed + epoch``).
        seed: base random seed.
        drop_last: drop the last batch when it has fewer than ``batch_size`` cells (only without ``max_tokens``,
            where batch sizes vary by design).

    Example:
        >>> sampler = LengthBucketBatchSampler([5, 3, 9, 4], batch_size=2, shuffle=False, seed=0)
        >>> list(sampler)
        [[1, 3], [0, 2]]
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        *,
        batch_size: int,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        lengths = np.asarray(lengths, dtype=np.int64).ravel()
        if batch_size < 1:
            msg = f"batch_size must be >= 1; received {batch_size}."
            raise MsfmInputError(msg)
        if max_tokens is not None and max_tokens < 1:
            msg = f"max_tokens must be >= 1 or None; received {max_tokens}."
            raise MsfmInputError(msg)
        if lengths.size and lengths.min() < 0:
            msg = f"lengths must be non-negative; received a minimum of {lengths.min()}."
            raise MsfmInputError(msg)
        self.lengths = lengths
        self.batch_size = int(batch_size)
        self.max_tokens = max_tokens
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._n_batches = len(self._batches(np.argsort(lengths, kind="stable")))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed the shuffle (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def _batches(self, order: np.ndarray) -> list[list[int]]:
        batches = [
            b.tolist()
            for b in length_buckets(
                order, self.lengths, batch_size=self.batch_size, max_tokens=self.max_tokens
            )
        ]
        if self.drop_last and self.max_tokens is None and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            yield from self._batches(np.argsort(self.lengths, kind="stable"))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        # Random tie-breaking: sort a random permutation stably by length.
        perm = rng.permutation(len(self.lengths))
        order = perm[np.argsort(self.lengths[perm], kind="stable")]
        batches = self._batches(order)
        for b in rng.permutation(len(batches)):
            yield batches[b]

    def __len__(self) -> int:
        return self._n_batches


class BlockShuffleSampler:
    """Row indices in shuffled contiguous blocks, sharded over distributed ranks (a ``sampler`` for a DataLoader).

    The ``n`` rows are cut into blocks of ``block_size`` consecutive rows; the block order is permuted per epoch
    and, optionally, rows within each block. The resulting order is padded by wrapping around (or truncated with
    ``drop_last``) to a multiple of ``world_size`` and cut into ``world_size`` contiguous shards, so every rank
    gets the same number of indices and mostly whole blocks (contiguous reads from a backed file).

    Args:
        n: number of rows.
        block_size: rows per block (e.g. 1-10x the batch size).
        seed: base random seed; every rank must use the same one.
        rank: this process's rank.
        world_size: number of processes.
        shuffle: shuffle at all (False gives the plain order, still sharded).
        shuffle_within_block: also permute rows inside each block.
        drop_last: truncate to a multiple of ``world_size`` instead of padding with repeated rows.

    Example:
        >>> list(BlockShuffleSampler(6, block_size=2, seed=0, shuffle=False, world_size=2, rank=1))
        [3, 4, 5]
    """

    def __init__(
        self,
        n: int,
        *,
        block_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_within_block: bool = True,
        drop_last: bool = False,
    ) -> None:
        if n < 0 or block_size < 1:
            msg = f"Expected n >= 0 and block_size >= 1; received n={n}, block_size={block_size}."
            raise MsfmInputError(msg)
        if world_size < 1 or not 0 <= rank < world_size:
            msg = f"Expected world_size >= 1 and 0 <= rank < world_size; received rank={rank}, world_size={world_size}."
            raise MsfmInputError(msg)
        self.n = int(n)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.shuffle_within_block = bool(shuffle_within_block)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        if self.drop_last:
            self.num_samples = self.n // self.world_size
        else:
            self.num_samples = math.ceil(self.n / self.world_size) if self.n else 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed the shuffle (call before iterating each epoch, on every rank)."""
        self.epoch = int(epoch)

    def global_order(self) -> np.ndarray:
        """The full order over all ranks for this epoch (before padding and sharding)."""
        starts = np.arange(0, self.n, self.block_size)
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        blocks = []
        for b in rng.permutation(len(starts)):
            block = np.arange(starts[b], min(starts[b] + self.block_size, self.n), dtype=np.int64)
            if self.shuffle_within_block:
                block = rng.permutation(block)
            blocks.append(block)
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch (``num_samples`` of them)."""
        order = self.global_order()
        total = self.num_samples * self.world_size
        if total > len(order):
            order = np.concatenate([order, np.resize(order, total - len(order))])
        order = order[:total]
        return order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
