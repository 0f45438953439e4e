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
from msfm.runtime.warn_once import warn_once

if TYPE_CHECKING:
    from msfm.data.genes import GeneMapping
    from msfm.data.source import CellSource

__all__ = [
    "LOG1P_CP10K_MAX",
    "PRE_NORMALIZED_MAX",
    "TARGET_SUM",
    "canonical_csr",
    "check_log1p_values",
    "log1p_cp10k",
    "normalized_rows",
    "row_totals",
]

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


# ----------------------------------------------------------------------------------------- pre-normalised input
#: The largest log1p CP10k value: a cell whose counts all fall on one gene, ``log1p(1e4)`` = 9.21.
LOG1P_CP10K_MAX = float(np.log1p(TARGET_SUM))
#: Values above this cannot be log-normalised expression of any common scale (log1p CPM peaks at 13.8 and
#: log2(CPM + 1) at 19.9); ``pre_normalized=True`` refuses them.
PRE_NORMALIZED_MAX = 20.0
_FIX = (
    "Fix: pass the raw counts without pre_normalized (CLI: drop --pre-normalized; msfm normalises counts itself), "
    "or log1p-normalise the values first (`sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata)`, "
    "which also turns TPM/CPM into log1p CP10k)."
)


def _row_of(block: Any, position: int) -> int:
    if sp.issparse(block):
        return int(np.searchsorted(sp.csr_matrix(block).indptr, position, side="right") - 1)
    return position // max(1, np.asarray(block).shape[1])


def check_log1p_values(
    block: Any,
    *,
    matrix_name: str = "X",
    cell_names: Any = None,
    start: int = 0,
    row_positions: np.ndarray | None = None,
    check_integers: bool = True,
    warn: bool = True,
) -> float:
    """Refuse values that cannot be log1p-normalised expression (the check behind ``pre_normalized=True``).

    Every family that accepts pre-normalised values calls this through :class:`msfm.data.CellSource`, on the whole
    matrix when it is in memory and on each block read when it is backed (so large files stay cheap).

    Args:
        block: ``[b, g]`` values, sparse or dense (non-negative and finite: checked before).
        matrix_name: where the values come from, for messages (``"X"``, ``"layers['counts']"``).
        cell_names: names of the rows (for messages), or None.
        start: row position of the first row of ``block``.
        row_positions: row position of every row of ``block`` (rows read out of order); overrides ``start``.
        check_integers: refuse a block whose non-zero values are all integers (raw counts). Backed sources check
            only the block that decides the kind of matrix.
        warn: warn when the maximum lies above log1p CP10k's range but below :data:`PRE_NORMALIZED_MAX`.

    Returns:
        The largest value of ``block`` (0 for an empty block).

    Raises:
        MsfmInputError: a value above :data:`PRE_NORMALIZED_MAX` (TPM, CPM or counts), or only integer values.
    """
    csr = sp.csr_matrix(block) if sp.issparse(block) else None
    data = csr.data if csr is not None else np.asarray(block).ravel()
    if data.size == 0:
        return 0.0
    position = int(np.argmax(data))
    vmax = float(data[position])
    if vmax > PRE_NORMALIZED_MAX:
        local = _row_of(csr if csr is not None else block, position)
        row = int(row_positions[local]) if row_positions is not None else start + local
        cell = f" (cell {cell_names[row]!r}, row {row})" if cell_names is not None else f" (row {row})"
        msg = (
            f"pre_normalized=True, but {matrix_name} holds values up to {vmax:,.6g}{cell}: these are not "
            f"log1p-normalised values (log1p of counts per 10k lies in [0, {LOG1P_CP10K_MAX:.2f}]; msfm accepts up "
            f"to {PRE_NORMALIZED_MAX:g}). They look like TPM, CPM or raw counts. {_FIX}"
        )
        raise MsfmInputError(msg)
    if check_integers:
        nonzero = data[data != 0]
        if nonzero.size and bool(np.all(np.abs(nonzero - np.rint(nonzero)) <= 1e-3)):
            msg = (
                f"pre_normalized=True, but {matrix_name} holds only integer values (max {vmax:g}): these look like "
                f"raw counts, not log1p-normalised values (log1p CP10k values are not integers). {_FIX}"
            )
            raise MsfmInputError(msg)
    if warn and vmax > LOG1P_CP10K_MAX + 1e-3:
        # Every reader of the same matrix gets here (each verb, each pass): say it once per process.
        warn_once(
            f"pre_normalized=True: {matrix_name} holds values up to {vmax:.4g}, above {LOG1P_CP10K_MAX:.2f}, the "
            "largest log1p CP10k value (log1p(count / total * 1e4)). The models expect log1p CP10k; values of "
            "another scale (log1p CPM, log2) shift every gene. Normalise raw counts with msfm (drop "
            "pre_normalized) or rescale to log1p CP10k.",
            UserWarning,
            stacklevel=3,
        )
    return vmax
