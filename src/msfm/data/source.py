"""Row access to the count matrix of one AnnData (in memory or backed), with the count contract enforced.

The contract (``docs/architecture.md``): models read raw integer counts from ``layers["counts"]`` or from ``X``;
a normalised matrix is accepted only when the user says so (``pre_normalized=True``). Values must be finite and
non-negative. Cells without any count are kept and flagged, never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.data.normalize import check_log1p_values
from msfm.errors import MsfmInputError
from msfm.runtime.warn_once import warn_once

logger = logging.getLogger(__name__)

__all__ = ["CellChunk", "CellSource"]

#: Values within this distance of an integer count as integers (float32 storage of counts is exact, but
#: counts recovered or converted through float math may carry tiny rounding noise).
INTEGER_TOLERANCE = 1e-3


class CellChunk(NamedTuple):
    """A block of rows read from a :class:`CellSource`.

    Attributes:
        obs_idx: ``[b]`` int64 row positions in the AnnData.
        X: ``[b, n_vars]`` CSR float32 matrix.
        zero_count: ``[b]`` bool, True for cells whose values sum to 0.
    """

    obs_idx: np.ndarray
    X: sp.csr_matrix
    zero_count: np.ndarray


class CellSource:
    """Validated row access to the count (or pre-normalised) matrix of an AnnData.

    Args:
        adata: in-memory or backed (``backed="r"``) AnnData, cells x genes. It is never modified.
        layer: layer to read. Default: ``layers["counts"]`` when present, else ``X``.
        pre_normalized: the chosen matrix holds log-normalised values to be used as they are (warns). Without it,
            a non-integer matrix is an error. With it, values that cannot be log1p-normalised (above 20, or only
            integers) are an error (:func:`msfm.data.normalize.check_log1p_values`; backed: checked per block).
        chunk_size: rows per block for validation and :meth:`iter_chunks`.

    Attributes:
        kind: ``"counts"`` or ``"normalized"``.
        matrix_name: where the values come from, e.g. ``"layers['counts']"`` or ``"X"``.

    float16 matrices are read as float32 (exact); bool, complex, object and text matrices are refused.

    Raises:
        MsfmInputError: empty data, duplicated gene names, unknown layer, an unsupported dtype, negative / NaN /
            inf values, non-integer values without ``pre_normalized=True``, or values that are not log1p-normalised
            with it.

    Example:
        >>> src = CellSource(adata)                      # doctest: +SKIP
        >>> x = src.rows([5, 1, 3])                      # CSR float32, rows in the order asked
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        pre_normalized: bool = False,
        chunk_size: int = 2048,
    ) -> None:
        if chunk_size < 1:
            msg = f"chunk_size must be a positive integer; received {chunk_size}."
            raise MsfmInputError(msg)
        self.adata = adata
        self.chunk_size = int(chunk_size)
        self.pre_normalized = bool(pre_normalized)
        n_obs, n_vars = adata.n_obs, adata.n_vars
        if n_obs == 0 or n_vars == 0:
            msg = (
                f"The AnnData is empty ({n_obs} cells x {n_vars} genes); expected at least one cell and one gene. "
                "Check the filters applied before this step."
            )
            raise MsfmInputError(msg)
        if adata.var_names.has_duplicates:
            dups = adata.var_names[adata.var_names.duplicated()].unique().tolist()
            msg = (
                f"The AnnData has {len(dups)} duplicated gene names (e.g. {dups[:10]}); each gene must appear once. "
                "Fix: call `adata.var_names_make_unique()` (msfm then maps the copies via var['gene_ids'] when "
                "present), or sum/drop the duplicates before harmonising genes."
            )
            raise MsfmInputError(msg)

        self.layer, self.matrix_name, self._matrix = self._choose_matrix(layer)
        self._matrix = self._check_dtype(self._matrix)
        if sp.issparse(self._matrix) and self._matrix.format != "csr":
            # Row access needs CSR; this copies the matrix once (the AnnData itself is left as it is).
            logger.info("converting %s from %s to CSR for row access", self.matrix_name, self._matrix.format)
            self._matrix = sp.csr_matrix(self._matrix)
        # In backed mode only X stays on disk (anndata loads layers into memory).
        self.backed = not (sp.issparse(self._matrix) or isinstance(self._matrix, np.ndarray))
        # In memory: validate everything once. Backed: decide counts vs normalised on the first block (reading all
        # of X would defeat backing); every later block is checked against that decision as it is read.
        probe = self._read_slice(0, min(n_obs, self.chunk_size)) if self.backed else self._matrix
        integer, n_bad, first_bad = self._check_block(probe, 0)
        if self.pre_normalized:
            # Refuses TPM/CPM/counts (values above any log scale, or integers only); in memory the whole matrix
            # is checked, backed data the first block here and every later block as it is read.
            check_log1p_values(probe, matrix_name=self.matrix_name, cell_names=adata.obs_names)
        if integer and not self.pre_normalized:
            self.kind: Literal["counts", "normalized"] = "counts"
        elif self.pre_normalized:
            self.kind = "normalized"
            # Every reader of the same matrix (each verb, each pass over the data) gets here: say it once.
            warn_once(
                f"pre_normalized=True: the values of {self.matrix_name} are used as already log-normalised "
                "(log1p(x / total * 1e4)) and no read depth is known; models that need one take it from the "
                "sum of these values.",
                UserWarning,
                stacklevel=2,
            )
        else:
            self._raise_not_counts(n_bad, first_bad)
        self._totals: np.ndarray | None = None

    # -- matrix choice and validation ---------------------------------------------------------------------------

    def _choose_matrix(self, layer: str | None) -> tuple[str | None, str, Any]:
        adata = self.adata
        if layer is not None:
            if layer not in adata.layers:
                msg = (
                    f"layer={layer!r} is not in the AnnData; available layers: {list(adata.layers)}. "
                    "Pass one of them, or layer=None to use layers['counts'] (if present) else X."
                )
                raise MsfmInputError(msg)
            return layer, f"layers[{layer!r}]", adata.layers[layer]
        if "counts" in adata.layers:
            return "counts", "layers['counts']", adata.layers["counts"]
        if adata.X is None:
            msg = "The AnnData has no X and no layers['counts']; store raw counts in one of them."
            raise MsfmInputError(msg)
        return None, "X", adata.X

    def _check_dtype(self, matrix: Any) -> Any:
        """float16 is read as float32 (exact; scipy.sparse has no float16); non-numeric dtypes are refused."""
        dtype = np.dtype(getattr(matrix, "dtype", np.float32))
        if dtype.kind in "iuf" and dtype != np.float16:
            return matrix
        if dtype == np.float16:
            logger.info("%s is float16: its values are read as float32 (exact)", self.matrix_name)
            if isinstance(matrix, np.ndarray):
                return matrix.astype(np.float32)
            if getattr(matrix, "format", None) is None:
                return matrix  # a backed dense array: every block read is cast (see _to_csr32)
            return _Float16Rows(matrix, self.matrix_name)
        what = {"b": "bool", "c": "complex", "O": "object", "U": "text", "S": "bytes"}.get(
            dtype.kind, str(dtype)
        )
        fix = (
            "If the 0/1 values are counts, convert them: `adata.X = adata.X.astype(np.float32)`."
            if dtype.kind == "b"
            else "Store the counts as integers or float32/float64, e.g. `adata.X = adata.X.astype(np.float32)` "
            "(complex values: keep the real part with `.real`)."
        )
        named = f"{dtype}" if what == str(dtype) else f"{dtype} ({what})"
        msg = (
            f"{self.matrix_name} has dtype {named}; expected numbers: integer counts, or float32/float64 "
            f"(float16 is read as float32). {fix}"
        )
        raise MsfmInputError(msg)

    def _raise_not_counts(self, n_bad: int, first_bad: int) -> None:
        hint = ""
        if "counts" not in self.adata.layers and self.layer is None:
            if self.adata.raw is not None:
                hint = " If adata.raw holds the counts, use `adata = adata.raw.to_adata()` first."
            others = [k for k in self.adata.layers if k != self.layer]
            if others:
                hint += f" Available layers: {others}."
        msg = (
            f"{self.matrix_name} does not hold raw integer counts: {n_bad} values are not integers (first in cell "
            f"{self.adata.obs_names[first_bad]!r}, row {first_bad}). Fix: pass layer='counts' (or the layer with "
            "raw counts), or pre_normalized=True (CLI: --pre-normalized) if the values are already log-normalised."
            f"{hint}"
        )
        raise MsfmInputError(msg)

    def _check_block(self, block: Any, start: int) -> tuple[bool, int, int]:
        """Validate a block whose first row is ``start``; return (all integer?, n non-integer, first such row)."""
        data = block.data if sp.issparse(block) else np.asarray(block)
        if sp.issparse(block) and not isinstance(block, sp.csr_matrix | sp.csr_array):
            block = sp.csr_matrix(block)
            data = block.data
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int((~finite).sum()) - n_nan
            first = start + _first_row(block, ~finite)
            msg = (
                f"{self.matrix_name} contains {n_nan} NaN and {n_inf} infinite values (first in cell "
                f"{self.adata.obs_names[first]!r}, row {first}). Expected finite counts. Fix the upstream "
                "processing or drop those cells before using msfm."
            )
            raise MsfmInputError(msg)
        negative = data < 0
        if negative.any():
            first = start + _first_row(block, negative)
            msg = (
                f"{self.matrix_name} contains {int(negative.sum())} negative values (first in cell "
                f"{self.adata.obs_names[first]!r}, row {first}, value {float(data[negative].flat[0]):g}). Expected "
                "non-negative counts; scaled/centred data (e.g. after sc.pp.scale) cannot be used. Pass the layer "
                "with raw counts (layer='counts')."
            )
            raise MsfmInputError(msg)
        off = np.abs(data - np.rint(data)) > INTEGER_TOLERANCE
        n_bad = int(off.sum())
        return n_bad == 0, n_bad, start + _first_row(block, off) if n_bad else -1

    def _validate_rows(self, block: sp.csr_matrix, obs_idx: np.ndarray) -> None:
        """Validate rows read from disk; ``obs_idx`` are their positions (sorted, one per row)."""
        data = block.data
        bad = ~np.isfinite(data) | (data < 0)
        if self.kind == "counts":
            bad |= np.abs(data - np.rint(data)) > INTEGER_TOLERANCE
        elif not bad.any():
            check_log1p_values(
                block,
                matrix_name=self.matrix_name,
                cell_names=self.adata.obs_names,
                row_positions=obs_idx,
                check_integers=False,
                warn=False,
            )
        if bad.any():
            # Re-check the first offending row alone to raise the detailed message with the right cell.
            row = int(obs_idx[_first_row(block, bad)])
            _, n_bad, first = self._check_block(self._read_slice(row, row + 1), row)
            self._raise_not_counts(n_bad, first)

    # -- reading ------------------------------------------------------------------------------------------------

    def _read_slice(self, start: int, stop: int) -> sp.csr_matrix:
        return _to_csr32(self._matrix[start:stop])

    def _read_rows(self, sorted_unique: np.ndarray) -> sp.csr_matrix:
        """Read backed rows given sorted, unique positions."""
        if sorted_unique.size == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=np.float32)
        first, last = int(sorted_unique[0]), int(sorted_unique[-1])
        if last - first + 1 == sorted_unique.size:
            return self._read_slice(first, last + 1)
        # anndata's sorted fancy indexing reads only the needed rows in one pass (h5py needs increasing indices);
        # it is ~20x faster than one slice per row for scattered rows.
        return _to_csr32(self._matrix[sorted_unique])

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self.adata.n_obs

    @property
    def n_vars(self) -> int:
        """Number of genes."""
        return self.adata.n_vars

    @property
    def var_names(self) -> pd.Index:
        """Gene names, in column order."""
        return self.adata.var_names

    @property
    def obs_names(self) -> pd.Index:
        """Cell names, in row order."""
        return self.adata.obs_names

    def rows(self, idx: Any) -> sp.csr_matrix:
        """Read rows as a CSR float32 matrix, in the order of ``idx`` (duplicates allowed).

        Backed data are read once, in sorted order without duplicates (a contiguous slice when the rows are
        contiguous), validated, then put in the order asked.

        Args:
            idx: integer positions (array-like or slice).

        Returns:
            ``[len(idx), n_vars]`` CSR float32.

        Raises:
            MsfmInputError: positions out of range, or invalid values in the rows read (backed data).
        """
        if isinstance(idx, slice):
            idx = np.arange(self.n_obs)[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            msg = "rows() expects integer positions, not a boolean mask; use np.flatnonzero(mask)."
            raise MsfmInputError(msg)
        idx = idx.astype(np.int64, copy=False).ravel()
        if idx.size and (idx.min() < -self.n_obs or idx.max() >= self.n_obs):
            msg = f"Row positions must lie in [0, {self.n_obs}); received min {idx.min()}, max {idx.max()}."
            raise MsfmInputError(msg)
        idx = np.where(idx < 0, idx + self.n_obs, idx)
        if not self.backed:
            return _to_csr32(self._matrix[idx] if idx.size else self._matrix[:0])
        uniq, inverse = np.unique(idx, return_inverse=True)
        block = self._read_rows(uniq)
        self._validate_rows(block, uniq)
        return block[inverse] if not np.array_equal(uniq, idx) else block

    def iter_chunks(self, chunk_size: int | None = None) -> Iterator[CellChunk]:
        """Iterate over all cells in file order, ``chunk_size`` rows at a time (contiguous reads).

        Yields:
            :class:`CellChunk` with row positions, the CSR float32 block and the zero-count flags.
        """
        size = int(chunk_size or self.chunk_size)
        for start in range(0, self.n_obs, size):
            stop = min(start + size, self.n_obs)
            block = self.rows(slice(start, stop))
            totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
            yield CellChunk(np.arange(start, stop, dtype=np.int64), block, totals == 0)

    def totals(self) -> np.ndarray:
        """Per-cell sum of the values (float64; the read depth for counts). Cached after the first call."""
        if self._totals is None:
            if not self.backed:
                self._totals = np.asarray(self._matrix.sum(axis=1), dtype=np.float64).ravel()
            else:
                self._totals = np.concatenate(
                    [np.asarray(c.X.sum(axis=1), dtype=np.float64).ravel() for c in self.iter_chunks()]
                )
        return self._totals

    def zero_count_cells(self) -> np.ndarray:
        """Boolean ``[n_obs]`` mask of cells whose values sum to 0 (kept, but flagged in model outputs)."""
        return self.totals() == 0

    def __repr__(self) -> str:
        mode = "backed" if self.backed else "in memory"
        return f"CellSource({self.n_obs} cells x {self.n_vars} genes, {self.matrix_name}, kind={self.kind!r}, {mode})"


def _to_csr32(block: Any) -> sp.csr_matrix:
    if sp.issparse(block):
        out = sp.csr_matrix(block)
    else:
        dense = np.asarray(block)
        out = sp.csr_matrix(dense.astype(np.float32) if dense.dtype == np.float16 else dense)
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    return out


def _first_row(block: Any, flags: np.ndarray) -> int:
    """Row of the first flagged stored value (CSR ``data`` order, or dense row-major order)."""
    position = int(np.flatnonzero(np.ravel(flags))[0])
    if sp.issparse(block):
        return int(np.searchsorted(block.indptr, position, side="right") - 1)
    return position // max(1, np.asarray(block).shape[1])


class _Float16Rows:
    """Row reads of a backed sparse matrix stored as float16, returned as CSR float32 (exact).

    anndata's backed sparse reader builds scipy matrices of the stored dtype, and scipy.sparse has no float16, so
    the rows are read here from the HDF5/zarr group itself, one contiguous read per run of consecutive rows.
    """

    def __init__(self, dataset: Any, name: str) -> None:
        group = getattr(dataset, "group", None)
        if group is None or dataset.format != "csr":
            msg = (
                f"{name} is a backed float16 {dataset.format} matrix, which msfm "
                "reads only as CSR. Read the file in memory (backed=False: float16 is read as float32), or store "
                "X as float32 CSR."
            )
            raise MsfmInputError(msg)
        self._data, self._indices = group["data"], group["indices"]
        self._indptr = np.asarray(group["indptr"][()], dtype=np.int64)
        self.shape = tuple(int(v) for v in dataset.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, idx: Any) -> sp.csr_matrix:
        if isinstance(idx, slice):
            rows = np.arange(self.shape[0])[idx]
        else:
            rows = np.asarray(idx, dtype=np.int64).ravel()
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        # Runs of consecutive rows: each is one slice of data/indices.
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        parts = []
        for run in np.split(rows, breaks):
            lo, hi = int(self._indptr[run[0]]), int(self._indptr[run[-1] + 1])
            indptr = self._indptr[run[0] : run[-1] + 2] - lo
            data = np.asarray(self._data[lo:hi], dtype=np.float32)
            parts.append(
                sp.csr_matrix(
                    (data, np.asarray(self._indices[lo:hi]), indptr), shape=(run.size, self.shape[1])
                )
            )
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
