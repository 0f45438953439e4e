"""Stream panel-aligned count rows from many files without loading them whole.

Used for pretraining on atlas-sized data: every file is opened backed (``backed="r"``), cut into
contiguous blocks (one HDF5 read each), blocks are shuffled across files, and the block list is split
between distributed ranks and DataLoader workers so that every process reads different cells. Rows are
shuffled inside each block. The stream repeats with a new block order each pass (training is bounded
by ``max_steps``), so ranks never run out of data at different times.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from msfm.data.genes import GeneMapping, GenePanel, harmonize_genes
from msfm.data.readers import read
from msfm.data.source import CellSource
from msfm.errors import MsfmInputError
from msfm.runtime.devices import rank_world

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    path: str | None  # None for an in-memory AnnData
    adata: AnnData | None
    n_obs: int
    mapping: GeneMapping


class PanelRowStream(torch.utils.data.IterableDataset):
    """Yield one panel-aligned CSR row (``[1, len(panel)]``) at a time from several sources.

    Args:
        sources: ``.h5ad`` paths (opened backed, lazily in each worker) or in-memory AnnData objects.
        panel: the model's gene panel; every source is harmonised onto it once, up front.
        layer: matrix to read (default: the count contract's choice).
        block_size: cells per contiguous read.
        shuffle: shuffle blocks and rows inside blocks (deterministic given ``seed`` and the pass number).
        seed: base seed; ``start_pass`` lets a resumed run continue with fresh block orders.
        skip_zero_count: drop cells without counts on the panel (nothing to learn from them).
        infinite: repeat passes forever (training); ``False`` gives one pass (evaluation).
        gene_kwargs: forwarded to :func:`msfm.data.harmonize_genes` (``gene_column``, ``species``, ...).
    """

    def __init__(
        self,
        sources: Sequence[str | os.PathLike[str] | AnnData],
        panel: GenePanel,
        *,
        layer: str | None = None,
        block_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        start_pass: int = 0,
        skip_zero_count: bool = True,
        infinite: bool = True,
        **gene_kwargs: Any,
    ) -> None:
        super().__init__()
        if not sources:
            msg = "No training data given: pass one or more .h5ad files (or AnnData objects)."
            raise MsfmInputError(msg)
        self.panel = panel
        self.layer = layer
        self.block_size = int(block_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.start_pass = int(start_pass)
        self.skip_zero_count = skip_zero_count
        self.infinite = infinite
        self.entries: list[_Entry] = []
        for src in sources:
            if isinstance(src, AnnData):
                CellSource(src, layer=layer)  # validate the count contract now, not in a worker
                mapping = harmonize_genes(src.var, panel, **gene_kwargs)
                self.entries.append(_Entry(None, src, src.n_obs, mapping))
                continue
            path = Path(src)
            adata = read(path, backed=path.suffix == ".h5ad")
            try:
                CellSource(adata, layer=layer)
                mapping = harmonize_genes(adata.var, panel, **gene_kwargs)
                self.entries.append(_Entry(str(path), None, adata.n_obs, mapping))
            finally:
                if adata.isbacked:
                    adata.file.close()
        self.n_obs = sum(e.n_obs for e in self.entries)
        self._open: dict[int, CellSource] = {}

    def mapping_reports(self) -> list[dict[str, Any]]:
        """The gene-coverage report of every source (stored with the run)."""
        return [{"source": e.path or "<AnnData>", **e.mapping.to_uns()} for e in self.entries]

    def _source(self, i: int) -> CellSource:
        if i not in self._open:
            e = self.entries[i]
            adata = e.adata if e.adata is not None else read(e.path, backed=Path(e.path).suffix == ".h5ad")
            self._open[i] = CellSource(adata, layer=self.layer)
        return self._open[i]

    def _blocks(self, pass_idx: int) -> list[tuple[int, int]]:
        blocks = [(i, s) for i, e in enumerate(self.entries) for s in range(0, e.n_obs, self.block_size)]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, pass_idx])
            blocks = [blocks[j] for j in rng.permutation(len(blocks))]
        return blocks

    def __iter__(self) -> Iterator[sp.csr_matrix]:
        rank, world = rank_world()
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, n_shards = rank * n_workers + worker, world * n_workers
        pass_idx = self.start_pass
        while True:
            blocks = self._blocks(pass_idx)
            # Every shard gets the same number of blocks (wrapping around), so DDP ranks stay in step.
            per_shard = max(1, -(-len(blocks) // n_shards))
            mine = [blocks[(shard + k * n_shards) % len(blocks)] for k in range(per_shard)]
            rng = np.random.default_rng([self.seed, pass_idx, shard])
            for i, start in mine:
                src = self._source(i)
                stop = min(start + self.block_size, self.entries[i].n_obs)
                panel_rows = self.entries[i].mapping.apply(src.rows(np.arange(start, stop)))
                order = (
                    rng.permutation(panel_rows.shape[0]) if self.shuffle else np.arange(panel_rows.shape[0])
                )
                totals = np.asarray(panel_rows.sum(axis=1)).ravel()
                for j in order:
                    if self.skip_zero_count and totals[j] <= 0:
                        continue
                    yield panel_rows[j]
            pass_idx += 1
            if not self.infinite:
                return
