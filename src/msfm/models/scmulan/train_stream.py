"""The example stream of scMulan training: endless, exactly reproducible, and resumable in O(1).

Example ``k`` of a run is a pure function of ``(seed, k)``, so a resumed run sees exactly the examples an
uninterrupted run would have seen, and ranks never see the same example.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from msfm.engine.sampler import BatchStream
from msfm.models.scmulan.objective import TaskSampler, TrainExample, collate_examples
from msfm.models.scmulan.train_cells import Cells

__all__ = ["ScMulanExampleStream", "ValExamples"]


class ScMulanExampleStream(BatchStream):
    """Endless, exactly reproducible stream of collated training batches.

    Example ``k`` (a global index over all ranks): epoch ``e = k // N`` and position ``p = k % N`` pick cell
    ``cells[perm_e[p]]`` (``perm_e`` a permutation seeded by ``(seed, e)``); the generator
    ``default_rng([seed, 0, k])`` then draws its task (among the cell's supported tasks, by weight), its
    next-state partner, metadata subset and gene order. Micro-batch ``m`` of rank ``r`` out of ``W`` holds
    examples ``(m * W + r) * batch_size + i``. ``skip_batches`` starts at micro-batch ``skip_batches`` in O(1),
    so a resumed run continues exactly where the killed one stopped.

    Args:
        cells: the training cells' data.
        sampler: builds one example from a cell.
        cell_ids: global ids of the cells to draw from.
        support: ``[N, n_tasks]`` per-cell supported tasks (columns follow ``sampler.task_names``).
        bucket_of, buckets: next-state partners (see :func:`next_state_partners`).
        batch_size: sentences per micro-batch.
        seed: base seed.
        skip_batches: micro-batches (per rank) already consumed.
    """

    def __init__(
        self,
        cells: Cells,
        sampler: TaskSampler,
        cell_ids: np.ndarray,
        support: np.ndarray,
        bucket_of: np.ndarray,
        buckets: list[np.ndarray],
        *,
        batch_size: int,
        seed: int,
        skip_batches: int = 0,
        stream: int = 0,
    ) -> None:
        super().__init__(skip_batches=skip_batches)
        self.cells = cells
        self.sampler = sampler
        self.cell_ids = np.asarray(cell_ids, dtype=np.int64)
        self.support = support
        self.bucket_of = bucket_of
        self.buckets = buckets
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stream = int(stream)  # 0 = training draws, 1 = validation draws (independent generators)
        self._perm: tuple[int, np.ndarray] | None = None

    def _cell_at(self, k: int) -> int:
        n = self.cell_ids.size
        epoch, pos = divmod(int(k), n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 7, epoch]).permutation(n))
        return int(self.cell_ids[self._perm[1][pos]])

    def draw(self, k: int, cell: int | None = None) -> tuple[int, str, int | None, np.random.Generator]:
        """Cell, task, partner and the generator (ready for the example's remaining draws) of example ``k``."""
        rng = np.random.default_rng([self.seed, self.stream, int(k)])
        if cell is None:
            cell = self._cell_at(k)
        ok = self.support[cell]
        names = [t for t, s in zip(self.sampler.task_names, ok, strict=True) if s]
        w = np.array([self.sampler.tasks[t] for t in names], dtype=np.float64)
        task = names[int(rng.choice(len(names), p=w / w.sum()))]
        partner = None
        if task == "next_state":
            bucket = self.buckets[self.bucket_of[cell]]
            partner = int(bucket[int(rng.integers(bucket.size))])
        return cell, task, partner, rng

    def examples(self, ks: Sequence[int], cells: Sequence[int] | None = None) -> list[TrainExample]:
        """The examples ``ks`` (optionally for given cells instead of the epoch order)."""
        draws = [self.draw(k, None if cells is None else cells[i]) for i, k in enumerate(ks)]
        need = [d[0] for d in draws] + [d[2] for d in draws if d[2] is not None]
        uniq = np.unique(np.asarray(need, dtype=np.int64))
        x = self.cells.rows(uniq)
        row_of = dict(zip(uniq.tolist(), range(uniq.size), strict=True))
        out = []
        for cell, task, partner, rng in draws:
            next_row = None if partner is None else x[row_of[partner]]
            ex = self.sampler.example(
                x[row_of[cell]], self.cells.meta_of(cell), rng, next_row=next_row, task=task
            )
            assert ex is not None  # the task was forced
            out.append(ex)
        return out

    def batch(self, m: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """Collated micro-batch ``m`` of ``rank``."""
        first = (int(m) * world + rank) * self.batch_size
        return collate_examples(self.examples(range(first, first + self.batch_size)), self.sampler.vocab)


class ValExamples(torch.utils.data.Dataset):
    """One fixed example per held-out cell (map-style, so Lightning shards it across ranks)."""

    def __init__(self, stream: ScMulanExampleStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return int(self.stream.cell_ids.size)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        cells = [int(self.stream.cell_ids[i]) for i in idx]
        return collate_examples(self.stream.examples(idx, cells), self.stream.sampler.vocab)
