"""From AnnData to GeST tensors: model-space expression, cell selections, windows and padded batches.

Everything here is numpy/scipy until :func:`collate_windows`, which makes the tensors a batch needs. The
expression space is ``log1p(normalize_total(counts, 1e4))`` over the model's genes (the total is taken over all
genes of the data, before selecting the model's genes); pre-normalised data (already log1p) is used as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from msfm.data import CellSource, GenePanel, harmonize_genes
from msfm.data.normalize import TARGET_SUM, normalized_rows
from msfm.data.options import SpatialReadOptions
from msfm.data.spatial import SpatialCoords, spatial_coords
from msfm.errors import MsfmInputError
from msfm.tokenizers.spatial import normalize_positions

logger = logging.getLogger(__name__)

__all__ = [
    "TARGET_SUM",
    "SpatialCells",
    "bool_column",
    "cell_selection",
    "collate_windows",
    "model_space",
    "select_genes",
    "spatial_cells",
]


def model_space(source: CellSource, rows: np.ndarray | None = None) -> sp.csr_matrix:
    """Model-space expression of some cells over all genes of the data (:func:`msfm.data.normalize.normalized_rows`).

    Returns:
        CSR float32 ``[n, n_vars]``: ``log1p(x / total * 1e4)`` for counts, the values as they are otherwise.
    """
    return normalized_rows(source, rows)


def select_genes(x: sp.csr_matrix, genes: np.ndarray | list[str], n_top: int) -> list[str]:
    """The ``n_top`` genes of highest variance in model space (ties broken by name; all genes if fewer).

    Shape:
        - x: ``[n, G]`` model-space expression
    """
    genes = np.asarray(genes, dtype=object)
    if n_top >= genes.size:
        return [str(g) for g in genes]
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    var = sq - mean**2
    order = np.lexsort((genes.astype(str), -var))
    return [str(g) for g in genes[np.sort(order[:n_top])]]


@dataclass
class SpatialCells:
    """Cells of one AnnData prepared for GeST.

    Attributes:
        coords: positions in µm and section codes.
        expr: model-space expression over ``genes`` (CSR float32 ``[n, T]``).
        genes: the genes of ``expr`` (the model's genes, or the data's genes before a vocabulary exists).
        mapping_report: how the data's genes were matched to the model's genes.
        kind: ``"counts"`` or ``"normalized"`` (what the source held).
    """

    coords: SpatialCoords
    expr: sp.csr_matrix
    genes: list[str]
    mapping_report: dict[str, Any]
    kind: str

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return int(self.expr.shape[0])

    def dense(self) -> np.ndarray:
        """``[n, T]`` float32 dense copy of the expression (for baselines, edits and scores)."""
        return self.expr.toarray() if sp.issparse(self.expr) else np.asarray(self.expr, dtype=np.float32)

    def subset_genes(self, genes: list[str]) -> SpatialCells:
        """The same cells over ``genes`` (a subset of :attr:`genes`, in the given order)."""
        index = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in index]
        if missing:
            msg = f"{len(missing)} requested genes are not in the data, e.g. {missing[:5]}."
            raise MsfmInputError(msg)
        cols = np.asarray([index[g] for g in genes], dtype=np.int64)
        return SpatialCells(self.coords, self.expr[:, cols], list(genes), self.mapping_report, self.kind)

    @property
    def xy(self) -> np.ndarray:
        """``[n, 2]`` positions in µm."""
        return self.coords.xy

    @property
    def section(self) -> np.ndarray:
        """``[n]`` section codes."""
        return self.coords.section


def _data_genes(adata: AnnData, gene_column: str | None) -> list[str]:
    if gene_column is None:
        return [str(g) for g in adata.var_names]
    if gene_column not in adata.var:
        msg = f"gene_column={gene_column!r} is not a var column; columns are {list(adata.var.columns)[:20]}."
        raise MsfmInputError(msg)
    return [str(g) for g in adata.var[gene_column].astype(str)]


def spatial_cells(
    adata: AnnData, genes: list[str] | None, options: SpatialReadOptions | None = None
) -> SpatialCells:
    """Validate coordinates and expression of ``adata`` and express it over ``genes``.

    Args:
        adata: cells (or spots) with coordinates in ``obsm[options.spatial_key]``; never modified.
        genes: the model's genes (None: keep the data's genes, named by ``gene_column`` or ``var_names``, for
            training a new vocabulary).
        options: how to read ``adata`` (:class:`msfm.data.SpatialReadOptions`; default: its defaults). The
            gene options (``gene_column``, ``species``, ``use_aliases``) drive the mapping onto ``genes``; fewer
            than ``min_panel_fraction`` of them found raises.

    Returns:
        The prepared cells.

    Raises:
        MsfmInputError: bad coordinates, bad values, or too few of the model's genes in the data.
    """
    opts = options or SpatialReadOptions()
    coords = spatial_coords(
        adata,
        key=opts.spatial_key,
        scale=opts.scale,
        section_key=opts.section_key,
        duplicates=opts.duplicates,
    )
    source = CellSource(adata, layer=opts.layer, pre_normalized=opts.pre_normalized)
    x = model_space(source)
    if genes is None:
        names = _data_genes(adata, opts.gene_column)
        report = {"n_mapped": int(x.shape[1]), "identity": True}
        return SpatialCells(coords, x, names, report, source.kind)
    panel = GenePanel.from_symbols(list(genes), name="gest")
    mapping = harmonize_genes(
        adata.var,
        panel,
        gene_column=opts.gene_column,
        species=opts.species,
        use_aliases=opts.use_aliases,
        min_panel_fraction=0.0,
        warn_panel_fraction=0.0,
    )
    found = float(mapping.report["fraction_of_panel_found"])
    if found < opts.min_panel_fraction:
        msg = (
            f"Only {found:.0%} of the model's {len(genes)} genes were found in the data "
            f"({mapping.report['n_mapped']} matched; e.g. missing {list(mapping.report.get('unmatched_examples', []))[:5]}). "
            f"Expected at least {opts.min_panel_fraction:.0%} (min_panel_fraction). Check that var_names hold gene "
            "symbols (or pass gene_column=), or pass the data of the same panel the model was trained on."
        )
        raise MsfmInputError(msg)
    if found < 1.0:
        logger.warning(
            "%d of the model's %d genes are missing from the data; they are read as 0.",
            len(genes) - int(mapping.report["n_mapped"]),
            len(genes),
        )
    expr = mapping.apply(x).astype(np.float32)
    return SpatialCells(coords, expr, list(genes), dict(mapping.report), source.kind)


_TRUE = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}


def bool_column(adata: AnnData, column: str, what: str) -> np.ndarray:
    """A boolean mask from an obs column of booleans, 0/1 or true/false strings.

    Raises:
        MsfmInputError: missing column or values that are not booleans.
    """
    if column not in adata.obs:
        msg = f"{what}={column!r} is not an obs column; columns are {list(adata.obs.columns)[:30]}."
        raise MsfmInputError(msg)
    col = adata.obs[column]
    if pd.api.types.is_bool_dtype(col) and not col.isna().any():
        return col.to_numpy(dtype=bool)
    values = col.astype(str).str.strip().str.lower()
    bad = sorted(set(values) - set(_TRUE))
    if bad:
        msg = (
            f"{what}={column!r}: the column must hold booleans (True/False, 1/0); found other values {bad[:5]}. "
            f"Add a boolean column, e.g. adata.obs['{column}'] = adata.obs['region'] == 'A'."
        )
        raise MsfmInputError(msg)
    return np.asarray([_TRUE[v] for v in values], dtype=bool)


def cell_selection(adata: AnnData, cells: Any, what: str) -> np.ndarray:
    """A boolean mask over ``adata.obs`` from a mask, a boolean obs column, obs names or integer positions.

    Raises:
        MsfmInputError: unknown names/column, a column that is not boolean, wrong length, or positions out of
            range.
    """
    n = adata.n_obs
    if isinstance(cells, str):
        return bool_column(adata, cells, what)
    if isinstance(cells, pd.Series):
        cells = cells.to_numpy()
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            msg = f"{what} as a boolean mask must have length n_obs={n}; got shape {arr.shape}."
            raise MsfmInputError(msg)
        return arr.copy()
    mask = np.zeros(n, dtype=bool)
    if arr.size == 0:
        return mask
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() >= n:
            msg = f"{what} positions must lie in [0, {n}); got {arr.min()}..{arr.max()}."
            raise MsfmInputError(msg)
        mask[arr] = True
        return mask
    names = pd.Index(adata.obs_names)
    pos = names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        missing = arr[pos < 0][:5].tolist()
        msg = f"{what} names {missing} are not in adata.obs_names ({(pos < 0).sum()} unknown)."
        raise MsfmInputError(msg)
    mask[pos] = True
    return mask


def collate_windows(
    sequences: list[tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]],
) -> dict[str, torch.Tensor]:
    """Right-pad serialised windows into a training batch.

    Args:
        sequences: per window ``(xy [n, 2] µm in serialised order, tokens [n], bounds)``.

    Returns:
        ``pos [b, N, 2]`` (window-normalised), ``tokens [b, N]`` and ``mask [b, N]`` (True = real), the batch
        contract of :func:`msfm.models.gest.objective.gest_objective`.
    """
    n_max = max(len(t) for _, t, _ in sequences)
    b = len(sequences)
    pos = torch.zeros(b, n_max, 2)
    tokens = torch.zeros(b, n_max, dtype=torch.long)
    mask = torch.zeros(b, n_max, dtype=torch.bool)
    for i, (xy, tok, bounds) in enumerate(sequences):
        n = len(tok)
        pos[i, :n] = torch.from_numpy(np.asarray(normalize_positions(xy, bounds), dtype=np.float32))
        tokens[i, :n] = torch.from_numpy(np.asarray(tok, dtype=np.int64))
        mask[i, :n] = True
    return {"pos": pos, "tokens": tokens, "mask": mask}
