"""The one expression normalisation of msfm: ``log1p(count / total * 1e4)`` per cell (log1p CP10k).

Every family uses it. What differs between families is only *which total* divides a cell's counts:

* scFoundation divides by the total over its 19,264-gene panel (the official code normalises the panel-aligned
  matrix), so :func:`log1p_cp10k` is called on the panel counts without ``totals``.
* scMulan and GeST divide by the total over **all** genes of the cell, then keep their genes (the scMulan release
  normalises the whole matrix with scanpy before ``GeneSymbolUniform``); :func:`normalized_rows` does this.

Numerics (decided once): the division and ``log1p`` run in float64 and the result is cast to float32. Integer
counts sum exactly in float64 in any order, so a cell's values do not depend on how it was batched, and the result
matches the official scFoundation code bit for bit after the cast. scanpy's float32 path differs by at most one
float32 ulp (measured in ``tests/data/test_normalize.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from msfm.errors import MsfmInputError

if TYPE_CHECKING:
    from msfm.data.genes import GeneMapping
    from msfm.data.source import CellSource

__all__ = ["TARGET_SUM", "canonical_csr", "log1p_cp10k", "normalized_rows", "row_totals"]

#: Library size after scaling (counts per 10k).
TARGET_SUM = 1e4


def canonical_csr(csr: sp.csr_matrix) -> sp.csr_matrix:
    """Sorted indices without duplicates; copies first so that the caller's matrix is never changed."""
    if csr.has_canonical_format:
        return csr
    csr = csr.copy()
    csr.sum_duplicates()
    return csr


def row_totals(x: Any) -> np.ndarray:
    """Per-row sums in float64.

    Shape: ``[n, g]`` (dense or sparse) -> ``[n]``.
    """
    if sp.issparse(x):
        csr = sp.csr_matrix(x)
        data = csr.data.astype(np.float64)
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        return np.bincount(rows, weights=data, minlength=csr.shape[0])
    return np.asarray(x, dtype=np.float64).sum(axis=1)


def log1p_cp10k(
    counts: Any, *, totals: np.ndarray | None = None, target_sum: float = TARGET_SUM
) -> sp.csr_matrix:
    """``log1p(c / total * target_sum)`` per row, computed in float64 and cast to float32.

    The operation order (divide by the total, then multiply) matches the official scFoundation code. Rows whose
    total is 0 stay 0; the sparsity pattern is kept; the input is never modified.

    Args:
        counts: ``[n, g]`` non-negative counts, sparse or dense.
        totals: ``[n]`` library sizes; default: the row sums of ``counts``. Pass the totals over all genes of
            the cells when ``counts`` holds only some of them.
        target_sum: library size after scaling.

    Returns:
        ``[n, g]`` CSR float32.

    Raises:
        MsfmInputError: ``totals`` of the wrong length, or negative / non-finite totals.
    """
    csr = canonical_csr(sp.csr_matrix(counts))
    n = csr.shape[0]
    if totals is None:
        totals = row_totals(csr)
    else:
        totals = np.asarray(totals, dtype=np.float64).ravel()
        if totals.shape != (n,):
            msg = f"totals has {totals.size} values for {n} cells; pass one library size per cell."
            raise MsfmInputError(msg)
        if not np.all(np.isfinite(totals)) or (totals < 0).any():
            msg = "totals must be finite and non-negative (library sizes of raw counts)."
            raise MsfmInputError(msg)
    per_entry = np.repeat(totals, np.diff(csr.indptr))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log1p(csr.data.astype(np.float64) / per_entry * target_sum)
    values[per_entry == 0] = 0.0
    return sp.csr_matrix((values.astype(np.float32), csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)


def normalized_rows(
    source: CellSource,
    rows: np.ndarray | None = None,
    mapping: GeneMapping | None = None,
    *,
    target_sum: float = TARGET_SUM,
) -> sp.csr_matrix:
    """Model-space rows of a cell source: log1p CP10k over **all** of each cell's genes, then its genes.

    Pre-normalised sources (``source.kind == "normalized"``) are returned as they are (mapped when ``mapping``
    is given).

    Args:
        source: validated row access to an AnnData's counts.
        rows: cell positions (None: all), in the order wanted.
        mapping: re-indexes the columns onto a model's genes after normalising (None: keep the data's genes).
        target_sum: library size after scaling.

    Returns:
        CSR float32 ``[len(rows), n_genes]`` (``mapping``'s panel size, or ``source.n_vars``).
    """
    idx = np.arange(source.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    x = source.rows(idx)
    if source.kind != "counts":
        return mapping.apply(x) if mapping is not None else sp.csr_matrix(x, dtype=np.float32)
    totals = row_totals(x)  # over every gene of the cell, before any gene is dropped
    if mapping is not None:
        x = mapping.apply(x)
    return log1p_cp10k(x, totals=totals, target_sum=target_sum)
