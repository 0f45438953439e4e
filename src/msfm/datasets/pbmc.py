"""PBMC datasets built from the file scanpy ships: ``scanpy/datasets/10x_pbmc68k_reduced.h5ad``.

The file holds 700 cells x 765 genes of the 10x Genomics "Fresh 68k PBMCs (Donor A)" data (Zheng et al. 2017,
Nat. Commun. 8:14049) with cell-type labels. Its ``raw.X`` is ``log1p(normalize_total(target_sum=1e4))`` computed
on the full gene set, and ``obs["n_counts"]`` is the full library size, so the raw counts are recovered exactly as
``rint(expm1(raw.X) * n_counts / 1e4)``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.data.resources import package_data_file, package_version, sha256_file
from msfm.data.writers import write_h5ad_streaming
from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["pbmc68k", "pbmc68k_resampled", "write_backed_h5ad"]

_PBMC_FILE = "datasets/10x_pbmc68k_reduced.h5ad"
_PBMC_SHA256_PREFIX = "e71d41e737c94155"
_CITATION = (
    "Zheng, G. X. Y. et al. Massively parallel digital transcriptional profiling of single cells. "
    "Nat. Commun. 8, 14049 (2017). doi:10.1038/ncomms14049"
)
_LICENCE = (
    "File shipped in scanpy (BSD-3-Clause); data: 10x Genomics 'Fresh 68k PBMCs (Donor A)' public dataset, "
    "Zheng et al. 2017"
)
#: Largest allowed distance from an integer before rounding (the bundled file gives 0.08).
_MAX_ROUNDING = 0.25


def _pbmc_path() -> Path:
    path = package_data_file("scanpy", _PBMC_FILE)
    digest = sha256_file(path)
    if not digest.startswith(_PBMC_SHA256_PREFIX):
        msg = (
            f"scanpy's bundled {_PBMC_FILE} at {path} has sha256 {digest[:16]}..., expected {_PBMC_SHA256_PREFIX}... "
            f"(scanpy {package_version('scanpy')}). The counts recovery is only verified for that file: install "
            "scanpy==1.11.5 (the version msfm pins)."
        )
        raise MsfmInputError(msg)
    return path


def pbmc68k() -> ad.AnnData:
    """700 PBMCs x 765 genes with raw counts and 10 cell-type labels (offline; read from scanpy's package data).

    Returns:
        AnnData with

        * ``X`` and ``layers["counts"]``: recovered raw counts (integer-valued float32 CSR, separate copies);
        * ``var_names``: the 765 genes of ``raw`` (the full stored gene set, not only the HVGs);
        * ``obs["cell_type"]``: ``bulk_labels`` (10 PBMC types), plus the original ``obs`` columns
          (``louvain``, ``n_counts``, ``phase``, ...); ``obsm["X_pca"]``, ``obsm["X_umap"]`` as shipped;
        * ``uns["dataset"]``: provenance (source package, version, path, sha256, licence, citation, recovery).

    Raises:
        MsfmInputError: scanpy is missing or ships a different file.
    """
    path = _pbmc_path()
    with warnings.catch_warnings():
        # The file predates the current h5ad encoding and obsp; anndata converts it and says so. Known file, known
        # notices: silence them rather than pass them on to the user.
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        src = ad.read_h5ad(path)
    lognorm = sp.csr_matrix(src.raw.X, dtype=np.float64)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)
    scaled = lognorm.copy()
    scaled.data = np.expm1(scaled.data) * np.repeat(n_counts, np.diff(scaled.indptr)) / 1e4
    rounded = np.rint(scaled.data)
    deviation = float(np.abs(scaled.data - rounded).max()) if scaled.data.size else 0.0
    if deviation > _MAX_ROUNDING:
        msg = f"Counts recovery failed: values lie up to {deviation:.3f} from an integer; the file is not the one expected."
        raise MsfmInputError(msg)
    counts = sp.csr_matrix((rounded.astype(np.float32), scaled.indices, scaled.indptr), shape=scaled.shape)
    counts.eliminate_zeros()

    obs = src.obs.copy()
    obs.insert(0, "cell_type", obs["bulk_labels"].astype("category"))
    var = pd.DataFrame(index=pd.Index(src.raw.var_names.astype(str), name=None))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.layers["counts"] = counts.copy()
    for key in ("X_pca", "X_umap"):
        if key in src.obsm:
            adata.obsm[key] = np.asarray(src.obsm[key])
    adata.uns["dataset"] = {
        "name": "pbmc68k",
        "source_package": "scanpy",
        "source_package_version": package_version("scanpy"),
        "source_path": _PBMC_FILE,
        "source_sha256": sha256_file(path),
        "licence": _LICENCE,
        "citation": _CITATION,
        "counts_recovery": "counts = rint(expm1(raw.X) * obs['n_counts'][:, None] / 1e4)",
        "max_rounding_deviation": round(deviation, 6),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "label_key": "cell_type",
    }
    return adata


def _resample_plan(
    base: ad.AnnData, n_cells: int, seed: int, min_fraction: float
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Which real cell each new cell copies and its thinning fraction (small; made up front)."""
    rng = np.random.default_rng([seed, 0])
    picks = rng.integers(0, base.n_obs, size=n_cells)
    fractions = rng.uniform(min_fraction, 1.0, size=n_cells)
    keep_cols = [c for c in ("cell_type", "bulk_labels", "louvain") if c in base.obs]
    obs = base.obs.iloc[picks][keep_cols].copy()
    obs["source_cell"] = base.obs_names[picks].to_numpy()
    obs["thinning_fraction"] = fractions.astype(np.float32)
    obs.index = pd.Index([f"r{i}" for i in range(n_cells)])
    return obs, picks, fractions


def _thinned_blocks(
    base: ad.AnnData, picks: np.ndarray, fractions: np.ndarray, seed: int, chunk_size: int
) -> Iterator[sp.csr_matrix]:
    rng = np.random.default_rng([seed, 1])
    counts = sp.csr_matrix(base.layers["counts"])
    for start in range(0, len(picks), chunk_size):
        block = counts[picks[start : start + chunk_size]]
        # Binomial thinning keeps each cell's expression profile but changes its depth and sampling noise, so
        # repeated cells are not identical.
        p = np.repeat(fractions[start : start + chunk_size], np.diff(block.indptr))
        block.data = rng.binomial(block.data.astype(np.int64), p).astype(np.float32)
        block.eliminate_zeros()
        yield block


def _check_resample_args(n_cells: int, chunk_size: int, min_fraction: float) -> None:
    if n_cells < 1 or chunk_size < 1:
        msg = f"n_cells and chunk_size must be >= 1; received n_cells={n_cells}, chunk_size={chunk_size}."
        raise MsfmInputError(msg)
    if not 0.0 < min_fraction <= 1.0:
        msg = f"min_fraction must be in (0, 1]; received {min_fraction}."
        raise MsfmInputError(msg)


def _derived_uns(base: ad.AnnData, n_cells: int, seed: int, min_fraction: float) -> dict[str, Any]:
    info = dict(base.uns["dataset"])
    info.update(
        {
            "name": "pbmc68k_resampled",
            "derived_from": "pbmc68k",
            "derivation": (
                "cells drawn with replacement from the 700 real pbmc68k cells; each count thinned binomially with a "
                f"per-cell fraction ~ Uniform({min_fraction}, 1). Synthetic scale data for tests and benchmarks: not "
                "independent biological replicates."
            ),
            "seed": int(seed),
            "n_cells": int(n_cells),
        }
    )
    return info


def pbmc68k_resampled(n_cells: int, seed: int = 0, *, min_fraction: float = 0.5) -> ad.AnnData:
    """A larger derived dataset: real pbmc68k cells resampled with binomial thinning (for scale tests).

    Args:
        n_cells: number of cells to generate.
        seed: random seed (same seed, same data).
        min_fraction: each cell keeps a fraction ~ Uniform(min_fraction, 1) of its counts.

    Returns:
        AnnData (``n_cells`` x 765) with counts in ``X`` and ``layers["counts"]``, ``obs`` with ``cell_type``,
        ``bulk_labels``, ``louvain``, ``source_cell`` and ``thinning_fraction``; ``uns["dataset"]`` says it is derived.
    """
    _check_resample_args(n_cells, 4096, min_fraction)
    base = pbmc68k()
    obs, picks, fractions = _resample_plan(base, n_cells, seed, min_fraction)
    x = sp.vstack(list(_thinned_blocks(base, picks, fractions, seed, 4096)), format="csr")
    adata = ad.AnnData(X=x, obs=obs, var=base.var.copy())
    adata.layers["counts"] = x.copy()
    adata.uns["dataset"] = _derived_uns(base, n_cells, seed, min_fraction)
    return adata


def write_backed_h5ad(
    path: str | os.PathLike[str],
    n_cells: int,
    *,
    chunk_size: int = 10_000,
    seed: int = 0,
    min_fraction: float = 0.5,
) -> Path:
    """Write a large resampled pbmc68k ``.h5ad`` chunk by chunk (never holds the whole matrix in memory).

    The counts go to ``X`` only, so that ``read_h5ad(path, backed="r")`` keeps them on disk (anndata loads layers into
    memory even in backed mode); :class:`msfm.data.CellSource` reads integer ``X`` as counts.

    Args:
        path: output ``.h5ad``.
        n_cells: number of cells (e.g. 100_000 for the backed benchmark).
        chunk_size: cells generated and written per block.
        seed: random seed.
        min_fraction: see :func:`pbmc68k_resampled`.

    Returns:
        The path written.
    """
    _check_resample_args(n_cells, chunk_size, min_fraction)
    base = pbmc68k()
    obs, picks, fractions = _resample_plan(base, n_cells, seed, min_fraction)
    return write_h5ad_streaming(
        path,
        _thinned_blocks(base, picks, fractions, seed, chunk_size),
        obs=obs,
        var=base.var.copy(),
        uns={"dataset": _derived_uns(base, n_cells, seed, min_fraction)},
    )
