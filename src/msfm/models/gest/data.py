"""From AnnData to GeST tensors: model-space expression, tokens, windows and padded batches.

Everything here is numpy/scipy until :func:`collate_windows`, which makes the tensors a batch needs. The
expression space is ``log1p(normalize_total(counts, 1e4))`` over the model's genes (the total is taken over all
genes of the data, before selecting the model's genes); pre-normalised data (already log1p) is used as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from msfm.data import CellSource, GenePanel, harmonize_genes
from msfm.data.normalize import TARGET_SUM, normalized_rows
from msfm.data.spatial import SpatialCoords, spatial_coords
from msfm.errors import MsfmInputError
from msfm.tokenizers.spatial import normalize_positions

logger = logging.getLogger(__name__)

__all__ = [
    "TARGET_SUM",
    "SpatialCells",
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
        expr: model-space expression over the model's genes (CSR float32 ``[n, T]``).
        mapping_report: how the data's genes were matched to the model's genes.
        kind: ``"counts"`` or ``"normalized"`` (what the source held).
    """

    coords: SpatialCoords
    expr: sp.csr_matrix
    mapping_report: dict[str, Any]
    kind: str

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return int(self.expr.shape[0])

    def dense(self) -> np.ndarray:
        """``[n, T]`` float32 dense copy of the expression (for baselines, edits and scores)."""
        return self.expr.toarray() if sp.issparse(self.expr) else np.asarray(self.expr, dtype=np.float32)

    @property
    def xy(self) -> np.ndarray:
        """``[n, 2]`` positions in µm."""
        return self.coords.xy

    @property
    def section(self) -> np.ndarray:
        """``[n]`` section codes."""
        return self.coords.section


def spatial_cells(
    adata: AnnData,
    genes: list[str] | None,
    *,
    layer: str | None = None,
    pre_normalized: bool = False,
    spatial_key: str = "spatial",
    scale: float | None = None,
    section_key: str | None = None,
    duplicates: str = "error",
    min_gene_fraction: float = 0.5,
) -> SpatialCells:
    """Validate coordinates and expression of ``adata`` and express it over ``genes``.

    Args:
        adata: cells (or spots) with ``obsm[spatial_key]``; never modified.
        genes: the model's genes (None: keep the data's genes, for training a new vocabulary).
        layer: matrix to read (default: ``layers['counts']`` if present, else ``X``).
        pre_normalized: the matrix is already log1p-normalised.
        spatial_key: ``obsm`` key of the coordinates.
        scale: µm per coordinate unit (None: ``uns['msfm_spatial']['um_per_unit']`` or 1).
        section_key: ``obs`` column naming the section of each cell.
        duplicates: what to do with cells at identical coordinates (see :func:`msfm.data.spatial.spatial_coords`).
        min_gene_fraction: fewer of the model's genes found than this fraction raises.

    Returns:
        The prepared cells.

    Raises:
        MsfmInputError: bad coordinates, bad values, or too few of the model's genes in the data.
    """
    coords = spatial_coords(
        adata, key=spatial_key, scale=scale, section_key=section_key, duplicates=duplicates
    )
    source = CellSource(adata, layer=layer, pre_normalized=pre_normalized)
    x = model_space(source)
    if genes is None:
        return SpatialCells(coords, x, {"n_mapped": int(x.shape[1]), "identity": True}, source.kind)
    panel = GenePanel.from_symbols(list(genes), name="gest")
    mapping = harmonize_genes(adata.var, panel, min_panel_fraction=0.0, warn_panel_fraction=0.0)
    found = float(mapping.report["fraction_of_panel_found"])
    if found < min_gene_fraction:
        msg = (
            f"Only {found:.0%} of the model's {len(genes)} genes were found in the data "
            f"({mapping.report['n_mapped']} matched; e.g. missing {list(mapping.report.get('unmatched_examples', []))[:5]}). "
            f"Expected at least {min_gene_fraction:.0%}. Check that var_names hold gene symbols (or pass the data of "
            "the same panel the model was trained on)."
        )
        raise MsfmInputError(msg)
    if found < 1.0:
        logger.warning(
            "%d of the model's %d genes are missing from the data; they are read as 0.",
            len(genes) - int(mapping.report["n_mapped"]),
            len(genes),
        )
    return SpatialCells(coords, mapping.apply(x).astype(np.float32), dict(mapping.report), source.kind)


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
