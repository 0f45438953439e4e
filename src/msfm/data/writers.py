"""Write large ``.h5ad`` files block by block, without building the matrix in memory.

Used for scale tests and benchmarks (e.g. a 100k-cell backed file) and for any producer that yields cells in chunks.
The file is a normal AnnData h5ad (``X`` stored as CSR) readable with ``anndata.read_h5ad(path, backed="r")``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["write_h5ad_streaming"]


def write_h5ad_streaming(
    path: str | os.PathLike[str],
    chunks: Iterable[sp.spmatrix | sp.sparray],
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    counts_layer: bool = False,
    uns: dict | None = None,
) -> Path:
    """Stream CSR row blocks into an ``.h5ad`` file; only one block is in memory at a time.

    Args:
        path: output file (overwritten; written to a hidden temporary first and renamed when complete).
        chunks: row blocks ``[b_i, n_vars]`` in cell order; their rows must add up to ``len(obs)``.
        obs: cell metadata (``len(obs)`` rows; its index becomes ``obs_names``).
        var: gene metadata (``n_vars`` rows; its index becomes ``var_names``).
        counts_layer: also store the same matrix as ``layers["counts"]`` (doubles the file size). Leave it off for
            files meant for backed reading: anndata loads layers into memory even with ``backed="r"``, while ``X``
            stays on disk (and :class:`msfm.data.CellSource` reads integer ``X`` as counts).
        uns: unstructured metadata to store.

    Returns:
        The path written.

    Raises:
        MsfmInputError: a block with the wrong number of columns or a total row count different from ``len(obs)``.
    """
    from msfm.runtime.atomic import atomic_path
    from msfm.runtime.h5ad import open_hdf5

    path = Path(path)
    n_obs, n_vars = len(obs), len(var)
    # The skeleton (obs, var, uns, empty mappings) is written by anndata's own element writer so that the layout
    # stays valid for the installed anndata version; only the matrix is appended by hand. atomic_path: an
    # unpredictable temporary, removed if anything fails, renamed into place when complete. open_hdf5: a full disk
    # is an OutputError, not an HDF5 crash.
    from anndata.io import write_elem

    skeleton = ad.AnnData(obs=obs.copy(), var=var.copy(), uns=dict(uns or {}))
    skeleton.strings_to_categoricals()
    with atomic_path(path, suffix=".h5ad") as tmp, open_hdf5(tmp) as h5:
        root = h5.file
        root.attrs["encoding-type"] = "anndata"
        root.attrs["encoding-version"] = "0.1.0"
        for key, value in (
            ("obs", skeleton.obs),
            ("var", skeleton.var),
            ("obsm", {}),
            ("varm", {}),
            ("obsp", {}),
            ("varp", {}),
            ("layers", {}),
            ("uns", dict(skeleton.uns)),
        ):
            write_elem(root, key, value)
        nnz = _append_matrix(root, chunks, n_obs, n_vars, ["X", "layers/counts"] if counts_layer else ["X"])
        h5.check()
    logger.info("wrote %s: %d cells x %d genes, %d stored values", path, n_obs, n_vars, nnz)
    return path


def _append_matrix(
    fh: Any, chunks: Iterable[sp.spmatrix | sp.sparray], n_obs: int, n_vars: int, targets: list[str]
) -> int:
    groups = []
    for name in targets:
        group = fh.require_group(name)
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = (n_obs, n_vars)
        group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 16,))
        group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
        groups.append(group)
    indptr = [np.zeros(1, dtype=np.int64)]
    nnz = 0
    rows = 0
    for block in chunks:
        csr = sp.csr_matrix(block, dtype=np.float32)
        if csr.shape[1] != n_vars:
            msg = f"A block has {csr.shape[1]} columns; expected {n_vars} (len(var))."
            raise MsfmInputError(msg)
        csr.sort_indices()
        for group in groups:
            for key, values in (("data", csr.data), ("indices", csr.indices.astype(np.int32))):
                dset = group[key]
                dset.resize((nnz + csr.nnz,))
                dset[nnz:] = values
        indptr.append(csr.indptr[1:].astype(np.int64) + nnz)
        nnz += csr.nnz
        rows += csr.shape[0]
    if rows != n_obs:
        msg = f"The blocks hold {rows} rows in total; expected {n_obs} (len(obs))."
        raise MsfmInputError(msg)
    full_indptr = np.concatenate(indptr)
    # Matching index dtypes matter: scipy upcasts a CSR with int32 indices and int64 indptr on every row
    # gather (a full copy of the indices), which slows in-memory use of the file ~20x.
    if nnz < np.iinfo(np.int32).max:
        full_indptr = full_indptr.astype(np.int32)
    for group in groups:
        group.create_dataset("indptr", data=full_indptr)
    return nnz
