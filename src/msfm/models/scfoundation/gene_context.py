"""``embed_genes``: context-aware gene embeddings from the decoder, ``[cells, genes, decoder_dim]``.

One cell over the whole 19,264-gene panel is 39.5 MB in float32, so the result is either small enough for memory
(chosen genes and cells) or streamed to an HDF5 file (``out=``), one cell per chunk.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from msfm.data import GenePanel, as_anndata, prepare_cells
from msfm.errors import MsfmInputError
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.decoding import decode_batches
from msfm.models.scfoundation.loading import CheckpointLike, backbone_of, load
from msfm.runtime.atomic import atomic_path, check_free_space, check_output_free
from msfm.runtime.h5ad import open_hdf5
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.runtime.results import Result
from msfm.tokenizers.gene_panel import TargetDepth

__all__ = ["GeneEmbeddings", "embed_genes"]


@dataclasses.dataclass(frozen=True, eq=False)
class GeneEmbeddings(Result):
    """Decoder context embeddings of chosen genes in chosen cells.

    Attributes:
        embeddings: ``[cells, genes, decoder_dim]`` float32, or None when they were streamed to ``path``.
        genes: gene symbols, in the order of axis 1.
        cells: obs names, in the order of axis 0.
        path: the HDF5 file written with ``out=`` (datasets ``embeddings``, ``genes``, ``cells``), else None.
        params: target depth, precision and the checkpoint.
    """

    embeddings: np.ndarray | None
    genes: tuple[str, ...]
    cells: tuple[str, ...]
    path: Path | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def array(self) -> np.ndarray:
        """The embeddings in memory (read from ``path`` when they were streamed there)."""
        if self.embeddings is not None:
            return self.embeddings
        import h5py

        with h5py.File(self.path, "r") as h5:
            return np.asarray(h5["embeddings"][:])


def embed_genes(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    genes: list[str] | None = None,
    cells: np.ndarray | list | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    target_depth: str = "t4",
    batch_size: int = 4,
    device: str = "auto",
    precision: str = "auto",
    max_in_memory_gb: float = 2.0,
    progress: bool = True,
    **read_options: Any,
) -> GeneEmbeddings:
    """Context-aware gene embeddings from the decoder, ``[cells, genes, decoder_dim]``.

    Args:
        data: cells x genes with raw counts, or a path to read.
        checkpoint: an scFoundation checkpoint (the official ``gene`` variant is the one upstream uses here).
        genes: panel gene symbols to keep (default: the whole panel; large!).
        cells: obs names, integer positions or a boolean mask selecting cells (default: all), in result order.
        out: stream the embeddings to this HDF5 file (datasets ``embeddings`` [cells, genes, dim] chunked per
            cell, ``genes``, ``cells``), written atomically; required above ``max_in_memory_gb``.
        overwrite: replace an existing ``out``.
        target_depth: see ``embed``.
        batch_size: cells per decoder batch.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        precision: ``auto`` (bf16 where the device computes it fast, else fp32; the choice is recorded in
            ``params["precision"]`` as ``{"requested", "chosen", "reason"}``), ``32``, ``bf16`` or ``16`` (autocast).
        max_in_memory_gb: largest result kept in memory.
        progress: show a progress bar.
        **read_options: :class:`msfm.data.CellReadOptions`.

    Returns:
        :class:`GeneEmbeddings` (``embeddings`` in memory, or ``path`` of the HDF5 file).

    Raises:
        MsfmInputError: genes not in the panel, unknown or repeated cells, a result too large for memory without
            ``out``, or ``out`` exists without ``overwrite``.
        OutputError: ``out`` cannot be written: a read-only folder or a disk with clearly too little space
            (both checked before compute), a disk that fills up while streaming (no file is left), or ``out``
            appeared while this run computed and ``overwrite`` is False (with it, the last writer wins).
    """
    TargetDepth.parse(target_depth)
    canonical_precision(precision)
    options = parse_read_options(embed_genes, read_options)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
    adata = as_anndata(data)
    loaded = backbone_of(load(checkpoint, device=device))
    choice = resolve_precision(precision, loaded.device)
    rows = select_cells(adata, cells)
    gene_names, gene_idx = _select_genes(loaded.vocab, genes)
    dim = loaded.config.decoder_dim
    size_gb = len(rows) * len(gene_idx) * dim * 4 / 1e9
    if out is None and size_gb > max_in_memory_gb:
        msg = (
            f"Gene embeddings for {len(rows)} cells x {len(gene_idx)} genes x {dim} dims need {size_gb:.1f} GB. "
            "Pass out='file.h5' to stream them to disk, or select fewer genes=/cells=."
        )
        raise MsfmInputError(msg)
    if len(np.unique(rows)) != len(rows):
        msg = "cells= selects some cells more than once; pass each cell once."
        raise MsfmInputError(msg)
    if out is not None:
        check_free_space(out, len(rows) * len(gene_idx) * dim * 4, what="the gene embeddings")
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    # Batches come back in source order; remember where each source row goes in the caller's order.
    caller_pos = {int(r): i for i, r in enumerate(rows)}
    decoded = decode_batches(
        loaded,
        source,
        mapping,
        target_depth=target_depth,
        batch_size=batch_size,
        precision=choice.precision,
        pre_normalized=options.pre_normalized,
        head=False,
        progress=progress,
        desc="scFoundation gene embeddings",
        rows=np.sort(rows),
    )
    cell_names = tuple(str(c) for c in adata.obs_names[rows])
    params = {"target_depth": target_depth, "precision": choice.record(), "checkpoint": str(loaded.path)}
    shape = (len(rows), len(gene_idx), dim)
    if out is None:
        result = np.zeros(shape, dtype=np.float32)
        for src_rows, z in decoded:
            result[[caller_pos[int(r)] for r in src_rows]] = z[:, gene_idx]
        return GeneEmbeddings(result, tuple(gene_names), cell_names, params=params)
    import h5py

    path = Path(out)
    # open_hdf5: a full disk mid-stream is an OutputError (and no file), never an HDF5 crash.
    with atomic_path(path, suffix=".h5", replace=overwrite) as tmp, open_hdf5(tmp) as output:
        h5 = output.file
        ds = h5.create_dataset("embeddings", shape=shape, dtype="f4", chunks=(1, *shape[1:]))
        h5.create_dataset("genes", data=np.array(gene_names, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("cells", data=np.array(cell_names, dtype=object), dtype=h5py.string_dtype())
        h5.attrs["target_depth"] = target_depth
        h5.attrs["checkpoint"] = str(loaded.path)
        h5.attrs["precision"] = choice.precision
        for src_rows, z in decoded:
            for r, zi in zip(src_rows, z):
                ds[caller_pos[int(r)]] = zi[gene_idx]
            output.check()
    return GeneEmbeddings(None, tuple(gene_names), cell_names, path=path, params=params)


def select_cells(adata: AnnData, cells: Any) -> np.ndarray:
    """Row positions chosen by ``cells=`` (None, obs names, integer positions or a boolean mask), in the given order."""
    n = adata.n_obs
    if cells is None:
        return np.arange(n)
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            msg = f"cells= boolean mask has shape {arr.shape}, expected ({n},)."
            raise MsfmInputError(msg)
        return np.flatnonzero(arr)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            msg = f"cells= positions must lie in [0, {n}); got range [{arr.min()}, {arr.max()}]."
            raise MsfmInputError(msg)
        return arr.astype(np.int64)
    idx = adata.obs_names.get_indexer(arr.astype(str))
    if (idx < 0).any():
        missing = arr[idx < 0][:5].tolist()
        msg = f"cells= names not found in obs_names: {missing} ({int((idx < 0).sum())} missing)."
        raise MsfmInputError(msg)
    return idx.astype(np.int64)


def _select_genes(panel: GenePanel, genes: list[str] | None) -> tuple[list[str], np.ndarray]:
    symbols = list(panel.symbols)
    if genes is None:
        return symbols, np.arange(len(symbols))
    index = {s: i for i, s in enumerate(symbols)}
    missing = [g for g in genes if g not in index]
    if missing:
        msg = (
            f"{len(missing)} of the requested genes are not in the model's gene panel, e.g. {missing[:5]}. "
            "Use current HGNC symbols as in the panel (msfm.data.GenePanel.scfoundation().symbols)."
        )
        raise MsfmInputError(msg)
    return list(genes), np.array([index[g] for g in genes], dtype=np.int64)
