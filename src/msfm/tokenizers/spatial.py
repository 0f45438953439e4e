"""GeST spatial tokenisation: the meta-cell vocabulary, window sampling and cell serialisation.

GeST (paper only, no public code; see ``roam_gest.md`` B3/B4) turns a square tissue window into a sequence:

* **Cell tokens** come from a *meta-cell vocabulary*: PCA of model-space expression (``log1p(normalize_total)``),
  k-means into ``K`` meta-cells, each storing its PCA centre and the mean expression of its member cells. A cell's
  token is its nearest centre in PCA space. K-means is run again on the meta-cells to give nested coarser labels
  (``K > K1 > K2 > K3``) for the hierarchical loss.
* **Windows**: squares of side ``side_um`` (600 µm by default) cropped from one section around a random anchor cell.
* **Serialisation**: a *corner sweep*: start at one of the four corners of the window and order the cells by distance
  to it, perturbed with Gumbel noise (a Plackett-Luce draw with weights ``exp(-d / jitter)``), so that nearby cells
  get nearby indices while the order still varies between epochs. ``random`` and ``raster`` orders exist for
  ablations.

Everything here is numpy/scipy (scikit-learn for k-means); torch only appears in the tensor export of the vocabulary.
Everything is deterministic given a seed.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from msfm.errors import CheckpointError, MsfmInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MetaCellVocab",
    "Window",
    "WindowSampler",
    "normalize_positions",
    "serialize",
    "tile_windows",
    "window_cells",
]

Order = Literal["corner_sweep", "random", "raster"]
Subsample = Literal["random", "nearest"]
Bounds = tuple[float, float, float, float]

_VOCAB_FORMAT = "msfm.metacell_vocab"
_VOCAB_FORMAT_VERSION = 1
_SAFETENSORS_META_KEY = "msfm_metacell_vocab"
#: Above this many fit cells k-means switches from Lloyd (``KMeans``) to ``MiniBatchKMeans``.
_MINIBATCH_THRESHOLD = 20_000
#: Rows per chunk when dense input is upcast to float64 (bounds the temporary copy to ~chunk x T x 8 bytes).
_ROW_CHUNK = 8192
#: Corner id -> (use x1 instead of x0, use y1 instead of y0); counter-clockwise from (x0, y0).
_CORNERS = ((False, False), (True, False), (True, True), (False, True))
_ORDERS = ("corner_sweep", "random", "raster")
_TENSOR_NAMES = ("pca_mean", "pca_components", "centroids_pca", "centroids_expr", "hierarchy", "cell_counts")


# ---------------------------------------------------------------------------------------------------------------
# Input helpers
# ---------------------------------------------------------------------------------------------------------------


def _as_matrix(X: Any, what: str = "X") -> np.ndarray | sp.csr_matrix:
    """Dense float array or CSR matrix, 2-D; other sparse formats become CSR, integers become float32."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if not np.issubdtype(X.dtype, np.floating):
            X = X.astype(np.float32)
    else:
        if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor, without importing torch
            X = X.detach().cpu().numpy()
        X = np.asarray(X)
        if not np.issubdtype(X.dtype, np.floating):
            if not np.issubdtype(X.dtype, np.number) and X.dtype != bool:
                msg = f"{what} has dtype {X.dtype}; expected a numeric expression matrix (float, cells x genes)."
                raise MsfmInputError(msg)
            X = X.astype(np.float32)
    if X.ndim != 2:
        msg = f"{what} has shape {X.shape}; expected a 2-D matrix [cells, genes]."
        raise MsfmInputError(msg)
    return X


def _row_chunks(n: int, chunk: int = _ROW_CHUNK) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _check_model_space(X: np.ndarray | sp.csr_matrix, what: str = "X") -> None:
    """Finite and non-negative, as ``log1p(normalize_total(counts))`` always is."""
    if sp.issparse(X):
        blocks: Iterator[np.ndarray] = iter([X.data])
    else:
        blocks = (X[s] for s in _row_chunks(X.shape[0]))
    for block in blocks:
        if block.size == 0:
            continue
        if not np.isfinite(block).all():
            msg = (
                f"{what} contains NaN or infinite values; expected finite model-space expression "
                "(log1p(normalize_total(counts))). Remove or fix those cells first."
            )
            raise MsfmInputError(msg)
        low = float(block.min())
        if low < 0:
            msg = (
                f"{what} has negative values (minimum {low:.4g}); expected model-space expression "
                "log1p(normalize_total(counts, 1e4)), which is >= 0. Scaled or centred data (for example after "
                "sc.pp.scale) cannot be used: pass the log-normalised layer instead."
            )
            raise MsfmInputError(msg)


def _column_sums(X: np.ndarray | sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Float64 column sums and column sums of squares."""
    if sp.issparse(X):
        s = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel()
        sq = np.asarray(X.multiply(X).sum(axis=0, dtype=np.float64)).ravel()
        return s, sq
    s = np.zeros(X.shape[1])
    sq = np.zeros(X.shape[1])
    for rows in _row_chunks(X.shape[0]):
        block = X[rows].astype(np.float64)
        s += block.sum(axis=0)
        sq += (block * block).sum(axis=0)
    return s, sq


def _centered_matmul(X: np.ndarray | sp.csr_matrix, mean: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``(X - mean) @ M`` in float64 without forming the centred (dense) matrix.

    Shape:
        X ``[n, T]``, mean ``[T]``, M ``[T, l]`` -> ``[n, l]``.
    """
    shift = mean @ M
    if sp.issparse(X):
        return np.asarray(X @ M, dtype=np.float64) - shift[None, :]
    out = np.empty((X.shape[0], M.shape[1]))
    for rows in _row_chunks(X.shape[0]):
        out[rows] = X[rows].astype(np.float64) @ M - shift[None, :]
    return out


def _centered_rmatmul(X: np.ndarray | sp.csr_matrix, mean: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``(X - mean).T @ Q`` in float64 without forming the centred matrix.

    Shape:
        X ``[n, T]``, mean ``[T]``, Q ``[n, l]`` -> ``[T, l]``.
    """
    shift = np.outer(mean, Q.sum(axis=0))
    if sp.issparse(X):
        return np.asarray(X.T @ Q, dtype=np.float64) - shift
    out = np.zeros((X.shape[1], Q.shape[1]))
    for rows in _row_chunks(X.shape[0]):
        out += X[rows].astype(np.float64).T @ Q[rows]
    return out - shift


def _randomized_pca(
    X: np.ndarray | sp.csr_matrix, n_components: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Randomized PCA (Halko et al. 2011) with implicit centring, so sparse input is never densified.

    Only products of ``X`` with thin matrices are formed; dense input is upcast to float64 in row chunks. With
    ``n_components + 10 >= min(n, T)`` the range finder spans the whole space and the result is exact.

    Returns:
        ``(mean [T], components [p, T], explained_variance [p], total_variance)``, all float64. Component signs are
        fixed so that each component's largest-magnitude loading is positive (deterministic output).
    """
    n, T = X.shape
    col_sum, col_sq = _column_sums(X)
    mean = col_sum / n
    total_var = float(max((col_sq - n * mean * mean).sum(), 0.0) / max(n - 1, 1))
    width = min(n_components + 10, n, T)
    # sklearn's heuristic: more power iterations when few components are asked for (slow spectral decay).
    n_iter = 7 if n_components < 0.1 * min(n, T) else 4
    Y = _centered_matmul(X, mean, rng.standard_normal((T, width)))
    for _ in range(n_iter):
        # LU (not QR) keeps the power iterations well conditioned at a fraction of the cost on tall matrices
        # (sklearn's randomized_svd does the same); only the final basis must be orthonormal.
        Y = scipy.linalg.lu(Y, permute_l=True)[0]
        Z = scipy.linalg.lu(_centered_rmatmul(X, mean, Y), permute_l=True)[0]
        Y = _centered_matmul(X, mean, Z)
    Q = scipy.linalg.qr(Y, mode="economic")[0]
    B = _centered_rmatmul(X, mean, Q).T  # [width, T]
    _, s, vt = np.linalg.svd(B, full_matrices=False)
    comps = vt[:n_components]
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    comps = comps * signs[:, None]
    explained = s[:n_components] ** 2 / max(n - 1, 1)
    return mean, comps, explained, total_var


def _nearest(P: np.ndarray, C: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Index of the nearest row of ``C`` for every row of ``P`` (squared Euclidean; ties -> lowest index).

    ``||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2``; the ``||p||^2`` term is the same for every centre and is dropped.

    Shape:
        P ``[n, p]``, C ``[K, p]`` -> ``[n]`` int64.
    """
    C64 = C.astype(np.float64)
    c_norm = (C64 * C64).sum(axis=1)
    # Bound the [batch, K] distance block to ~16M float64 (128 MB).
    batch = batch_size or max(1, (1 << 24) // max(C.shape[0], 1))
    out = np.empty(P.shape[0], dtype=np.int64)
    for rows in _row_chunks(P.shape[0], batch):
        d = c_norm[None, :] - 2.0 * (P[rows].astype(np.float64) @ C64.T)
        out[rows] = d.argmin(axis=1)  # argmin returns the first minimum: ties go to the lowest index
    return out


def _kmeans(
    points: np.ndarray, k: int, seed: int, *, weights: np.ndarray | None = None, minibatch: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """k-means centres ``[k, p]`` and labels ``[n]`` (scikit-learn ``KMeans(n_init=3)`` or ``MiniBatchKMeans``)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    if minibatch:
        # One k-means++ initialisation (sklearn's own default for it): on 10^5 cells and K in the thousands the
        # initialisation dominates the run time, and mini-batch updates make extra restarts of little value.
        model: Any = MiniBatchKMeans(
            n_clusters=k, n_init=1, random_state=seed, batch_size=max(1024, min(points.shape[0], 2 * k))
        )
    else:
        model = KMeans(n_clusters=k, n_init=3, random_state=seed)
    with warnings.catch_warnings():
        # "Number of distinct clusters found smaller than n_clusters": empty clusters are repaired by the caller.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(points, sample_weight=weights)
    return np.asarray(model.cluster_centers_, dtype=np.float64), np.asarray(model.labels_, dtype=np.int64)


def _fill_empty_labels(points: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Give every label in ``0..k-1`` at least one point by moving outliers of multi-member clusters.

    Used for the coarse levels, where labels are only a partition (no centre has to stay nearest): the point
    farthest from its cluster mean (among clusters with >= 2 members) moves to an empty label, until none is empty.
    Terminates because there are more points than labels.
    """
    labels = labels.copy()
    while True:
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            return labels
        means = np.zeros((k, points.shape[1]))
        np.add.at(means, labels, points)
        means /= np.maximum(counts, 1)[:, None]
        d = ((points - means[labels]) ** 2).sum(axis=1)
        d[counts[labels] < 2] = -np.inf
        labels[int(np.argmax(d))] = empty[0]


def _relabel_by_first_appearance(row: np.ndarray, k: int) -> np.ndarray:
    """Map labels so that they appear as 0, 1, 2, ... along ``row`` (a canonical, seed-independent naming)."""
    _, first = np.unique(row, return_index=True)
    old_in_order = row[np.sort(first)]
    remap = np.empty(k, dtype=np.int64)
    remap[old_in_order] = np.arange(k)
    return remap


# ---------------------------------------------------------------------------------------------------------------
# Meta-cell vocabulary
# ---------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class MetaCellVocab:
    """The GeST meta-cell vocabulary: PCA + k-means quantisation of model-space expression, with a label hierarchy.

    Build one with :meth:`fit`; every array is validated on construction.

    Attributes:
        genes: The T genes, in the column order :meth:`project` and :meth:`assign` expect.
        pca_mean: Gene means of the fit cells. Shape: ``[T]`` float32.
        pca_components: PCA loadings (rows orthonormal). Shape: ``[p, T]`` float32.
        centroids_pca: Meta-cell centres in PCA space (the k-means centres on the fit cells). Shape: ``[K, p]``
            float32.
        centroids_expr: Mean model-space expression of the cells assigned to each meta-cell (all cells given to
            :meth:`fit`, assigned with :meth:`assign`). Shape: ``[K, T]`` float32.
        hierarchy: Row 0 is ``arange(K)``; row ``i`` is each meta-cell's label at level ``i``. Each level is a
            coarsening of the previous one (nested). Shape: ``[n_levels, K]`` int64.
        level_sizes: Number of labels per level, for example ``(2048, 15, 10, 5)``.
        cell_counts: Number of fit-input cells assigned to each meta-cell (all >= 1). Shape: ``[K]`` int64.
        meta: Fit parameters and statistics (JSON-serialisable).
    """

    genes: list[str]
    pca_mean: np.ndarray
    pca_components: np.ndarray
    centroids_pca: np.ndarray
    centroids_expr: np.ndarray
    hierarchy: np.ndarray
    level_sizes: tuple[int, ...]
    cell_counts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        self.pca_mean = np.ascontiguousarray(self.pca_mean, dtype=np.float32)
        self.pca_components = np.ascontiguousarray(self.pca_components, dtype=np.float32)
        self.centroids_pca = np.ascontiguousarray(self.centroids_pca, dtype=np.float32)
        self.centroids_expr = np.ascontiguousarray(self.centroids_expr, dtype=np.float32)
        self.hierarchy = np.ascontiguousarray(self.hierarchy, dtype=np.int64)
        self.cell_counts = np.ascontiguousarray(self.cell_counts, dtype=np.int64)
        self.level_sizes = tuple(int(s) for s in self.level_sizes)
        self.meta = dict(self.meta)
        self._validate()

    def _validate(self) -> None:
        def bad(what: str) -> CheckpointError:
            return CheckpointError(
                f"Inconsistent meta-cell vocabulary: {what}. Rebuild it with MetaCellVocab.fit() or load a file "
                "written by MetaCellVocab.save()."
            )

        T = len(self.genes)
        if T == 0 or len(set(self.genes)) != T:
            raise bad(f"{T} genes, {T - len(set(self.genes))} duplicated (need >= 1 unique gene)")
        if self.pca_mean.shape != (T,):
            raise bad(f"pca_mean has shape {self.pca_mean.shape}, expected ({T},)")
        if (
            self.pca_components.ndim != 2
            or self.pca_components.shape[1] != T
            or self.pca_components.shape[0] < 1
        ):
            raise bad(f"pca_components has shape {self.pca_components.shape}, expected (p, {T})")
        p = self.pca_components.shape[0]
        if (
            self.centroids_pca.ndim != 2
            or self.centroids_pca.shape[1] != p
            or self.centroids_pca.shape[0] < 1
        ):
            raise bad(f"centroids_pca has shape {self.centroids_pca.shape}, expected (K, {p})")
        K = self.centroids_pca.shape[0]
        if self.centroids_expr.shape != (K, T):
            raise bad(f"centroids_expr has shape {self.centroids_expr.shape}, expected ({K}, {T})")
        if self.cell_counts.shape != (K,):
            raise bad(f"cell_counts has shape {self.cell_counts.shape}, expected ({K},)")
        L = len(self.level_sizes)
        if self.hierarchy.shape != (L, K):
            raise bad(f"hierarchy has shape {self.hierarchy.shape}, expected ({L}, {K}) from level_sizes")
        if L < 1 or self.level_sizes[0] != K:
            raise bad(f"level_sizes {self.level_sizes} must start with K={K}")
        if not np.array_equal(self.hierarchy[0], np.arange(K)):
            raise bad("hierarchy row 0 is not arange(K)")
        for i in range(1, L):
            row, size = self.hierarchy[i], self.level_sizes[i]
            if size >= self.level_sizes[i - 1] or size < 1:
                raise bad(f"level_sizes {self.level_sizes} are not strictly decreasing positive integers")
            if row.min() < 0 or row.max() >= size or np.unique(row).size != size:
                raise bad(f"hierarchy row {i} does not use exactly the labels 0..{size - 1}")
            # Nesting: every label of level i-1 maps to a single label of level i.
            prev = self.hierarchy[i - 1]
            parent = np.full(self.level_sizes[i - 1], -1, dtype=np.int64)
            parent[prev] = row
            if not np.array_equal(parent[prev], row):
                raise bad(f"hierarchy level {i} is not a coarsening of level {i - 1}")
        for name in ("pca_mean", "pca_components", "centroids_pca", "centroids_expr"):
            if not np.isfinite(getattr(self, name)).all():
                raise bad(f"{name} has NaN or infinite values")

    # -- sizes ---------------------------------------------------------------------------------------------------

    @property
    def n_metacells(self) -> int:
        """K, the number of meta-cells (cell tokens)."""
        return int(self.centroids_pca.shape[0])

    @property
    def n_genes(self) -> int:
        """T, the number of genes."""
        return len(self.genes)

    @property
    def n_pcs(self) -> int:
        """p, the number of principal components actually used."""
        return int(self.pca_components.shape[0])

    @property
    def n_levels(self) -> int:
        """Number of hierarchy levels, including level 0 (the meta-cells themselves)."""
        return len(self.level_sizes)

    def __repr__(self) -> str:
        return (
            f"MetaCellVocab(K={self.n_metacells}, genes={self.n_genes}, pcs={self.n_pcs}, "
            f"level_sizes={self.level_sizes})"
        )

    # -- fitting -------------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        X: Any,
        genes: Sequence[str],
        *,
        n_metacells: int = 2048,
        n_pcs: int = 50,
        levels: Sequence[int] = (15, 10, 5),
        seed: int = 0,
        max_cells: int = 200_000,
    ) -> MetaCellVocab:
        """Build the vocabulary: PCA, k-means into ``n_metacells``, then nested k-means for the coarse levels.

        PCA is a randomized SVD with implicit centring (sparse input is never densified; dense input is upcast in
        row chunks). k-means runs on at most ``max_cells`` cells (a seeded subsample); it uses Lloyd's ``KMeans``
        (``n_init=3``) up to 20,000 fit cells and ``MiniBatchKMeans`` (one k-means++ start) above. Every input
        cell is then assigned to its nearest centre, which gives ``centroids_expr`` and ``cell_counts``. Level 1
        clusters the K centres (weighted by their cell counts) into ``levels[0]`` groups, level 2 clusters the
        level-1 group centres into ``levels[1]`` groups, and so on, so every level is a coarsening of the previous
        one. Memory stays near ``n x p`` float64 plus one chunk of ``X``; ``X`` itself is never copied densely.

        Args:
            X: Model-space expression ``log1p(normalize_total(counts, 1e4))``, dense or sparse, columns in
                ``genes`` order.
            genes: The T gene names (unique).
            n_metacells: K, the number of meta-cells. At most the number of (fit) cells.
            n_pcs: Requested PCA dimensions; clamped to ``min(n_pcs, n_fit_cells - 1, T)`` (stored in ``meta``).
            levels: Sizes of the coarse levels, strictly decreasing and below ``n_metacells``; ``()`` for none.
            seed: Seed of the subsample, the PCA range finder and k-means.
            max_cells: Most cells used for PCA and k-means.

        Returns:
            The fitted vocabulary.

        Raises:
            MsfmInputError: Shape/gene mismatch, negative or non-finite values, too many meta-cells for the
                number of cells (or of distinct expression profiles), bad ``levels``.

        Shape:
            X: ``[n, T]``.
        """
        X = _as_matrix(X)
        genes = [str(g) for g in genes]
        n, T = X.shape
        if len(genes) != T:
            msg = (
                f"X has {T} gene columns but {len(genes)} gene names were given; they must match one to one."
            )
            raise MsfmInputError(msg)
        if len(set(genes)) != T:
            dupes = sorted({g for g in genes if genes.count(g) > 1})[:5]
            msg = f"Gene names must be unique; duplicated: {dupes}. Make them unique (var_names_make_unique)."
            raise MsfmInputError(msg)
        K = _positive_int(n_metacells, "n_metacells")
        max_cells = _positive_int(max_cells, "max_cells")
        n_pcs = _positive_int(n_pcs, "n_pcs")
        seed = _seed_int(seed)
        levels = tuple(_positive_int(v, "levels entries") for v in levels)
        sizes = (K, *levels)
        if any(b >= a for a, b in itertools.pairwise(sizes)):
            msg = (
                f"levels={levels} with n_metacells={K}: level sizes must be strictly decreasing and each below the "
                f"previous one (got sizes {sizes}). For example levels=(15, 10, 5) with n_metacells >= 16."
            )
            raise MsfmInputError(msg)
        if n < 2:
            msg = f"X has {n} cells; fitting a meta-cell vocabulary needs at least 2 cells."
            raise MsfmInputError(msg)
        n_fit = min(n, max_cells)
        if K > n_fit:
            where = (
                f"{n} cells" if n_fit == n else f"{n_fit} fit cells (max_cells={max_cells}, {n} cells in X)"
            )
            msg = (
                f"n_metacells={K} but only {where}: every meta-cell needs at least one cell. Use fewer meta-cells, "
                f"for example n_metacells={max(1, n_fit // 4)} (about 4 cells per meta-cell), or give more cells."
            )
            raise MsfmInputError(msg)
        _check_model_space(X)

        rng = np.random.default_rng(seed)
        fit_idx = np.sort(rng.choice(n, size=n_fit, replace=False)) if n_fit < n else np.arange(n)
        X_fit = X[fit_idx] if n_fit < n else X
        p = min(n_pcs, n_fit - 1, T)
        mean, comps, explained, total_var = _randomized_pca(X_fit, p, rng)

        # The vocabulary's own float32 parameters define the PCA space, so fit-time and later assignments agree.
        pca_mean = mean.astype(np.float32)
        pca_components = comps.astype(np.float32)
        P_fit = _project64(X_fit, pca_mean, pca_components)
        minibatch = n_fit > _MINIBATCH_THRESHOLD
        centres, _ = _kmeans(P_fit, K, seed, minibatch=minibatch)
        centroids_pca = _repair_empty_centres(P_fit, centres.astype(np.float32))

        labels = (
            _nearest(P_fit, centroids_pca)
            if n_fit == n
            else _nearest(_project64(X, pca_mean, pca_components), centroids_pca)
        )
        cell_counts = np.bincount(labels, minlength=K).astype(np.int64)
        centroids_expr = _group_means(X, labels, K, cell_counts)

        hierarchy = [np.arange(K, dtype=np.int64)]
        points = centroids_pca.astype(np.float64)
        weights = cell_counts.astype(np.float64)
        for i, k in enumerate(levels, start=1):
            # Weighted k-means on the previous level's group centres (weights = cells per group).
            _, lab = _kmeans(points, k, seed + i, weights=weights)
            lab = _fill_empty_labels(points, lab, k)
            row = lab[hierarchy[-1]]
            remap = _relabel_by_first_appearance(row, k)
            lab, row = remap[lab], remap[row]
            hierarchy.append(row)
            group_w = np.bincount(lab, weights=weights, minlength=k)
            group_pts = np.zeros((k, points.shape[1]))
            np.add.at(group_pts, lab, points * weights[:, None])
            points, weights = group_pts / group_w[:, None], group_w

        meta = {
            "n_cells": int(n),
            "n_fit_cells": int(n_fit),
            "n_metacells": int(K),
            "n_pcs_requested": int(n_pcs),
            "n_pcs": int(p),
            "levels": [int(v) for v in levels],
            "seed": int(seed),
            "max_cells": int(max_cells),
            "kmeans": "MiniBatchKMeans" if minibatch else "KMeans",
            "pca": "randomized_svd_implicit_centring",
            "explained_variance_ratio": [float(v / total_var) if total_var > 0 else 0.0 for v in explained],
            "input": "model space: log1p(normalize_total(counts, 1e4))",
        }
        return cls(
            genes=genes,
            pca_mean=pca_mean,
            pca_components=pca_components,
            centroids_pca=centroids_pca,
            centroids_expr=centroids_expr,
            hierarchy=np.stack(hierarchy),
            level_sizes=sizes,
            cell_counts=cell_counts,
            meta=meta,
        )

    # -- use -----------------------------------------------------------------------------------------------------

    def _checked(self, X: Any) -> np.ndarray | sp.csr_matrix:
        X = _as_matrix(X)
        if X.shape[1] != self.n_genes:
            msg = (
                f"X has {X.shape[1]} gene columns; this vocabulary expects {self.n_genes} genes in vocab.genes "
                "order. Subset and reorder the columns to vocab.genes first (missing genes as zeros)."
            )
            raise MsfmInputError(msg)
        _check_model_space(X)
        return X

    def project(self, X: Any) -> np.ndarray:
        """PCA coordinates of cells.

        Args:
            X: Model-space expression, dense or sparse, columns in :attr:`genes` order.

        Returns:
            ``(X - pca_mean) @ pca_components.T`` computed in float64, returned as float32.

        Raises:
            MsfmInputError: Wrong number of genes, negative or non-finite values.

        Shape:
            X ``[n, T]`` -> ``[n, p]``.
        """
        return _project64(self._checked(X), self.pca_mean, self.pca_components).astype(np.float32)

    def assign(self, X: Any, *, batch_size: int | None = None) -> np.ndarray:
        """Meta-cell token of every cell: the nearest centre in PCA space (ties -> lowest index).

        Args:
            X: Model-space expression, dense or sparse, columns in :attr:`genes` order.
            batch_size: Cells per distance block; default keeps the ``[batch, K]`` block near 128 MB.

        Returns:
            Token ids in ``0..K-1``.

        Raises:
            MsfmInputError: Wrong number of genes, negative or non-finite values.

        Shape:
            X ``[n, T]`` -> ``[n]`` int64.
        """
        P = _project64(self._checked(X), self.pca_mean, self.pca_components)
        return _nearest(P, self.centroids_pca, batch_size)

    def level_of(self, tokens: Any, level: int) -> Any:
        """Labels of meta-cell tokens at a hierarchy level.

        Negative entries (padding / ``ignore_index`` such as -100) pass through unchanged, so padded target
        tensors can be mapped directly.

        Args:
            tokens: Meta-cell ids, a numpy array (or sequence) or a torch tensor.
            level: ``0`` (the tokens themselves) to ``n_levels - 1``.

        Returns:
            Labels in ``0..level_sizes[level]-1``, same type (and device) and shape as ``tokens``.

        Raises:
            MsfmInputError: ``level`` or a token id out of range.
        """
        if not isinstance(level, int | np.integer) or not 0 <= int(level) < self.n_levels:
            msg = f"level={level!r}; expected an integer in 0..{self.n_levels - 1} (level_sizes {self.level_sizes})."
            raise MsfmInputError(msg)
        table = self.hierarchy[int(level)]
        is_torch = hasattr(tokens, "detach") and hasattr(tokens, "device")
        arr = tokens.detach().cpu().numpy() if is_torch else np.asarray(tokens)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            msg = f"tokens have dtype {arr.dtype}; expected integer meta-cell ids."
            raise MsfmInputError(msg)
        if arr.size and int(arr.max()) >= self.n_metacells:
            msg = f"token id {int(arr.max())} is out of range; this vocabulary has {self.n_metacells} meta-cells."
            raise MsfmInputError(msg)
        out = np.where(arr >= 0, table[np.clip(arr, 0, None)], arr).astype(np.int64)
        if is_torch:
            import torch

            return torch.from_numpy(out).to(tokens.device)
        return out

    # -- persistence ---------------------------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The arrays as CPU tensors (float32 / int64), named like the attributes."""
        import torch

        return {name: torch.from_numpy(np.array(getattr(self, name))) for name in _TENSOR_NAMES}

    def meta_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (format, genes, level sizes, fit metadata) to go with :meth:`to_tensors`."""
        return {
            "format": _VOCAB_FORMAT,
            "format_version": _VOCAB_FORMAT_VERSION,
            "genes": list(self.genes),
            "level_sizes": list(self.level_sizes),
            "meta": json.loads(json.dumps(self.meta)),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> MetaCellVocab:
        """Rebuild a vocabulary from :meth:`to_tensors` and :meth:`meta_dict` output.

        Raises:
            CheckpointError: Missing arrays, unknown format or inconsistent shapes.
        """
        if meta.get("format") != _VOCAB_FORMAT:
            msg = f"Metadata format is {meta.get('format')!r}; expected {_VOCAB_FORMAT!r} (MetaCellVocab.meta_dict())."
            raise CheckpointError(msg)
        if int(meta.get("format_version", 0)) > _VOCAB_FORMAT_VERSION:
            msg = (
                f"Meta-cell vocabulary format version {meta.get('format_version')} is newer than this msfm supports "
                f"({_VOCAB_FORMAT_VERSION}); upgrade msfm."
            )
            raise CheckpointError(msg)
        missing = [name for name in _TENSOR_NAMES if name not in tensors]
        if missing or "genes" not in meta or "level_sizes" not in meta:
            msg = f"Meta-cell vocabulary lacks {missing or ['genes/level_sizes metadata']}; expected {_TENSOR_NAMES}."
            raise CheckpointError(msg)

        def arr(v: Any) -> np.ndarray:
            return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

        return cls(
            genes=list(meta["genes"]),
            level_sizes=tuple(meta["level_sizes"]),
            meta=dict(meta.get("meta", {})),
            **{name: arr(tensors[name]) for name in _TENSOR_NAMES},
        )

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``: arrays + JSON metadata in the header) and a readable ``.json`` sidecar.

        Both writes are atomic. The safetensors file is self-contained (:meth:`load` reads its header); the sidecar
        (same name, ``.json`` suffix) is a human-readable copy of :meth:`meta_dict`, written first.

        Returns:
            The ``.safetensors`` path.

        Raises:
            MsfmInputError: ``path`` does not end in ``.safetensors`` or its folder does not exist.
        """
        from msfm.runtime.atomic import atomic_write_json
        from msfm.runtime.safetensors import write_safetensors_atomic

        path = Path(path)
        if path.suffix != ".safetensors":
            msg = f"Meta-cell vocabulary path {path} must end in '.safetensors' (a JSON sidecar is written next to it)."
            raise MsfmInputError(msg)
        meta = self.meta_dict()
        atomic_write_json(path.with_suffix(".json"), meta)
        write_safetensors_atomic(self.to_tensors(), path, metadata={_SAFETENSORS_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> MetaCellVocab:
        """Read a vocabulary written by :meth:`save` (metadata from the header, else from the sidecar).

        Raises:
            MsfmInputError: The file does not exist.
            CheckpointError: The file is not a meta-cell vocabulary or is inconsistent.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            msg = f"Meta-cell vocabulary {path} does not exist. Pass the .safetensors file written by save()."
            raise MsfmInputError(msg)
        try:
            with safe_open(str(path), framework="numpy") as fh:
                header = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError) as err:
            msg = (
                f"{path} is not a readable safetensors file ({err}). Re-create it with MetaCellVocab.save()."
            )
            raise CheckpointError(msg) from None
        if _SAFETENSORS_META_KEY in header:
            meta = json.loads(header[_SAFETENSORS_META_KEY])
        elif path.with_suffix(".json").is_file():
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        else:
            msg = f"{path} has no meta-cell vocabulary metadata and no .json sidecar; it was not written by save()."
            raise CheckpointError(msg)
        return cls.from_tensors(tensors, meta)


def _project64(X: np.ndarray | sp.csr_matrix, mean32: np.ndarray, comps32: np.ndarray) -> np.ndarray:
    """``(X - mean) @ comps.T`` in float64 (one formula for dense and sparse input)."""
    return _centered_matmul(X, mean32.astype(np.float64), comps32.astype(np.float64).T)


def _group_means(X: np.ndarray | sp.csr_matrix, labels: np.ndarray, k: int, counts: np.ndarray) -> np.ndarray:
    """Mean row of ``X`` per label, float32 ``[k, T]`` (accumulated in float64, dense input in row chunks)."""
    sums = np.zeros((k, X.shape[1]))
    for rows in _row_chunks(X.shape[0]):
        m = rows.stop - rows.start
        indicator = sp.csr_matrix((np.ones(m), (labels[rows], np.arange(m))), shape=(k, m))
        block = X[rows]
        if sp.issparse(block):
            sums += (indicator @ block.astype(np.float64)).toarray()
        else:
            sums += indicator @ np.asarray(block, dtype=np.float64)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def _repair_empty_centres(P: np.ndarray, C: np.ndarray, max_rounds: int = 50) -> np.ndarray:
    """Make every centre the nearest one of at least one fit cell.

    k-means leaves a centre without members when the data has duplicate points (duplicate centres; ties go to
    the lowest index). Such a centre is moved onto the fit cell farthest from its own centre, taken from clusters
    with >= 2 members, until none is empty. A centre empty on the fit cells stays empty on any superset, so
    repairing the fit cells suffices.

    Raises:
        MsfmInputError: The fit cells have fewer distinct PCA profiles than centres.
    """
    K = C.shape[0]
    for _ in range(max_rounds):
        labels = _nearest(P, C)
        counts = np.bincount(labels, minlength=K)
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            return C
        n_distinct = np.unique(P.astype(np.float32), axis=0).shape[0]
        if n_distinct < K:
            msg = (
                f"n_metacells={K} but the fit cells have only {n_distinct} distinct expression profiles (in PCA "
                f"space), so some meta-cells would be empty. Use n_metacells <= {n_distinct}, for example "
                f"{max(1, n_distinct // 4)}, or remove duplicated cells."
            )
            raise MsfmInputError(msg)
        d = ((P - C[labels].astype(np.float64)) ** 2).sum(axis=1)
        d[counts[labels] < 2] = -np.inf
        # The farthest eligible cells, one per empty centre (stable order for determinism).
        donors = np.argsort(-d, kind="stable")[: empty.size]
        C = C.copy()
        C[empty[: donors.size]] = P[donors].astype(np.float32)
    msg = f"Could not give every one of the {K} meta-cells a member; use fewer meta-cells (n_metacells)."
    raise MsfmInputError(msg)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        msg = f"{name}={value!r}; expected a positive integer."
        raise MsfmInputError(msg)
    return int(value)


def _seed_int(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or int(seed) < 0:
        msg = f"seed={seed!r}; expected a non-negative integer."
        raise MsfmInputError(msg)
    return int(seed)


# ---------------------------------------------------------------------------------------------------------------
# Positions, windows and serialisation
# ---------------------------------------------------------------------------------------------------------------


def _as_xy(xy: Any, what: str = "xy") -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        msg = f"{what} has shape {arr.shape}; expected [n, 2] coordinates in micrometres."
        raise MsfmInputError(msg)
    if not np.isfinite(arr).all():
        msg = f"{what} contains NaN or infinite coordinates; remove those cells first."
        raise MsfmInputError(msg)
    return arr


def _as_bounds(bounds: Any) -> Bounds:
    try:
        x0, y0, x1, y1 = (float(v) for v in bounds)
    except (TypeError, ValueError):
        msg = f"bounds={bounds!r}; expected four numbers (x0, y0, x1, y1) in micrometres."
        raise MsfmInputError(msg) from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        msg = f"bounds={bounds!r}; expected finite (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0."
        raise MsfmInputError(msg)
    return (x0, y0, x1, y1)


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else _seed_int(rng))


def serialize(
    xy: Any,
    *,
    order: Order = "corner_sweep",
    corner: int | None = None,
    jitter_um: float | None = None,
    bounds: Any = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Order the cells of a window into a sequence.

    ``corner_sweep`` (GeST's default): pick a corner of ``bounds`` (0 = (x0, y0), 1 = (x1, y0), 2 = (x1, y1),
    3 = (x0, y1); drawn from ``rng`` unless given), then sort the cells by ``d_i - jitter_um * G_i`` with ``d_i``
    the distance to the corner and ``G_i ~ Gumbel(0, 1)``. This draws the order without replacement with
    probabilities proportional to ``exp(-d_i / jitter_um)`` (Plackett-Luce via the Gumbel trick): a diagonal
    wavefront from the corner, with local shuffling. ``jitter_um=0`` is a pure distance sort (ties by index).
    ``random`` is a uniform permutation; ``raster`` sorts by y, then x, then index.

    Args:
        xy: Cell positions in micrometres.
        order: ``"corner_sweep"``, ``"random"`` or ``"raster"``.
        corner: Corner id 0..3 for ``corner_sweep``; None draws one.
        jitter_um: Gumbel scale in µm; None = 5 % of the window side (the longer side of ``bounds``).
        bounds: ``(x0, y0, x1, y1)`` of the window; default the bounding box of ``xy``.
        rng: A numpy Generator (advanced in place), a seed, or None (= seed 0, deterministic).

    Returns:
        The permutation: ``xy[perm]`` is the sequence.

    Raises:
        MsfmInputError: Unknown order, bad corner, negative jitter or malformed input.

    Shape:
        xy ``[n, 2]`` -> ``[n]`` int64.
    """
    xy = _as_xy(xy)
    if order not in _ORDERS:
        msg = f"order={order!r}; expected one of {_ORDERS}."
        raise MsfmInputError(msg)
    gen = _as_rng(rng)
    n = xy.shape[0]
    if order == "random":
        return gen.permutation(n).astype(np.int64)
    if order == "raster":
        return np.lexsort((np.arange(n), xy[:, 0], xy[:, 1])).astype(np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if bounds is None:
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        box = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    else:
        box = _as_bounds(bounds)
    if corner is None:
        corner = int(gen.integers(4))
    elif isinstance(corner, bool) or not isinstance(corner, int | np.integer) or not 0 <= int(corner) <= 3:
        msg = f"corner={corner!r}; expected 0 (x0, y0), 1 (x1, y0), 2 (x1, y1), 3 (x0, y1) or None (random)."
        raise MsfmInputError(msg)
    use_x1, use_y1 = _CORNERS[int(corner)]
    origin = np.array([box[2] if use_x1 else box[0], box[3] if use_y1 else box[1]])
    d = np.sqrt(((xy - origin) ** 2).sum(axis=1))
    jitter = 0.05 * max(box[2] - box[0], box[3] - box[1]) if jitter_um is None else float(jitter_um)
    if not math.isfinite(jitter) or jitter < 0:
        msg = f"jitter_um={jitter_um!r}; expected a non-negative number of micrometres (0 = no jitter)."
        raise MsfmInputError(msg)
    key = d - jitter * gen.gumbel(size=n) if jitter > 0 else d
    return np.argsort(key, kind="stable").astype(np.int64)


@dataclass(eq=False)
class Window:
    """A square crop of one section.

    Attributes:
        section: Section code of the window.
        bounds: ``(x0, y0, x1, y1)`` in micrometres; cells with ``x0 <= x < x1`` and ``y0 <= y < y1`` belong.
        cells: Indices into the full data, in serialised order (ascending for :func:`tile_windows`). Shape:
            ``[m]`` int64.
        anchor: The anchor cell a :class:`WindowSampler` drew the window around (-1 for tiles). With
            ``subsample="nearest"`` the anchor may have been dropped from ``cells``.
    """

    section: int
    bounds: Bounds
    cells: np.ndarray
    anchor: int = -1

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    @property
    def side(self) -> float:
        """The longer side of the window in micrometres."""
        return max(self.bounds[2] - self.bounds[0], self.bounds[3] - self.bounds[1])


def window_cells(xy: Any, bounds: Any) -> np.ndarray:
    """Indices of the cells inside ``bounds`` (half-open: ``x0 <= x < x1``, ``y0 <= y < y1``), ascending.

    Shape:
        xy ``[n, 2]`` -> ``[m]`` int64.
    """
    xy = _as_xy(xy)
    x0, y0, x1, y1 = _as_bounds(bounds)
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    return np.flatnonzero(inside).astype(np.int64)


def normalize_positions(xy: Any, bounds: Any) -> np.ndarray:
    """Window-relative positions: ``(xy - window centre) / side``, so the window maps to ``[-0.5, 0.5]^2``.

    The side is the longer side of ``bounds``, used for both axes (aspect ratio kept). Positions outside the
    window map outside ``[-0.5, 0.5]``.

    Raises:
        MsfmInputError: A window of zero size or malformed input.

    Shape:
        xy ``[n, 2]`` -> ``[n, 2]`` float32.
    """
    xy = _as_xy(xy)
    x0, y0, x1, y1 = _as_bounds(bounds)
    side = max(x1 - x0, y1 - y0)
    if side <= 0:
        msg = f"bounds={bounds!r} has zero size; positions cannot be normalised by a zero side."
        raise MsfmInputError(msg)
    centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    return ((xy - centre) / side).astype(np.float32)


def _as_sections(section: Any, n: int) -> np.ndarray:
    """Integer section codes ``[n]``: None -> zeros; non-integer labels -> codes of the sorted unique labels."""
    if section is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(section)
    if arr.shape != (n,):
        msg = f"section has shape {arr.shape}; expected one section per cell ({n},)."
        raise MsfmInputError(msg)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    _, codes = np.unique(arr.astype(str), return_inverse=True)
    return codes.astype(np.int64)


def _edges(lo: float, hi: float, side: float, stride: float) -> tuple[np.ndarray, np.ndarray]:
    """Tile starts and ends along one axis so that ``[lo, hi]`` is covered.

    With ``stride == side`` each tile ends exactly where the next starts (same float), so half-open tiles
    partition the axis and every cell falls in exactly one tile.
    """
    count = math.floor((hi - lo) / stride) + 1
    while True:
        starts = lo + np.arange(count + 1) * stride
        ends = starts[1:] if stride == side else starts[:-1] + side
        if ends[-1] > hi:  # the last tile must contain the maximum (guards rounding in the division)
            return starts[:-1], ends
        count += 1


def tile_windows(
    coords: Any,
    side_um: float,
    *,
    stride_um: float | None = None,
    min_cells: int = 2,
    section: Any = None,
) -> list[Window]:
    """Cover every section with a grid of square windows (for evaluation and embedding).

    Each section's bounding box is tiled from its lower-left corner with the given stride; tiles with fewer than
    ``min_cells`` cells are dropped. With ``stride_um = side_um`` (default) every cell lies in exactly one tile
    (before dropping); a smaller stride gives overlapping tiles, a larger one leaves gaps.

    Args:
        coords: A :class:`~msfm.data.spatial.SpatialCoords`-like object (``.xy`` in µm and ``.section`` codes) or
            an ``[n, 2]`` array of positions in µm (then ``section`` gives the sections, default one).
        side_um: Tile side in micrometres.
        stride_um: Distance between tile starts; default ``side_um``.
        min_cells: Smallest number of cells a kept tile has.
        section: Section of each cell when ``coords`` is an array.

    Returns:
        Windows ordered by section, then row (y), then column (x); ``cells`` ascending.

    Raises:
        MsfmInputError: Non-positive side or stride, bad ``min_cells`` or malformed coordinates.
    """
    if hasattr(coords, "xy"):
        xy = _as_xy(coords.xy, "coords.xy")
        sections = _as_sections(getattr(coords, "section", None), xy.shape[0])
    else:
        xy = _as_xy(coords, "coords")
        sections = _as_sections(section, xy.shape[0])
    side = _positive_float(side_um, "side_um")
    stride = side if stride_um is None else _positive_float(stride_um, "stride_um")
    min_cells = _positive_int(min_cells, "min_cells")
    out: list[Window] = []
    for s in np.unique(sections):
        idx = np.flatnonzero(sections == s)
        sx, sy = xy[idx, 0], xy[idx, 1]
        x_starts, x_ends = _edges(float(sx.min()), float(sx.max()), side, stride)
        y_starts, y_ends = _edges(float(sy.min()), float(sy.max()), side, stride)
        # Sort by x once, then by y inside each column: every tile is a pair of searchsorted ranges, which matches
        # window_cells' half-open test exactly (side='left' on both ends).
        by_x = idx[np.argsort(sx, kind="stable")]
        xs = xy[by_x, 0]
        tiles: list[tuple[int, int, Window]] = []
        for ci, (xa, xb) in enumerate(zip(x_starts, x_ends)):
            col = by_x[np.searchsorted(xs, xa, "left") : np.searchsorted(xs, xb, "left")]
            if col.size < min_cells:
                continue
            col = col[np.argsort(xy[col, 1], kind="stable")]
            ys = xy[col, 1]
            for ri, (ya, yb) in enumerate(zip(y_starts, y_ends)):
                cells = col[np.searchsorted(ys, ya, "left") : np.searchsorted(ys, yb, "left")]
                if cells.size >= min_cells:
                    bounds = (float(xa), float(ya), float(xb), float(yb))
                    tiles.append((ri, ci, Window(int(s), bounds, np.sort(cells).astype(np.int64))))
        tiles.sort(key=lambda t: (t[0], t[1]))
        out.extend(t[2] for t in tiles)
    return out


def _positive_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or v <= 0:
        msg = f"{name}={value!r}; expected a positive number of micrometres."
        raise MsfmInputError(msg)
    return v


class _GridIndex:
    """Bucket cells by (section, grid cell of size ``side``) so a window query touches only ~4 buckets."""

    def __init__(self, xy: np.ndarray, sections: np.ndarray, cell: float):
        self.xy = xy
        self.cell = cell
        self.origin = xy.min(axis=0) if xy.shape[0] else np.zeros(2)
        g = np.floor((xy - self.origin) / cell).astype(np.int64)
        self.ny = int(g[:, 1].max()) + 1 if xy.shape[0] else 1
        self.nx = int(g[:, 0].max()) + 1 if xy.shape[0] else 1
        keys = (sections * self.nx + g[:, 0]) * self.ny + g[:, 1]
        self.order = np.argsort(keys, kind="stable")
        self.keys, self.starts = np.unique(keys[self.order], return_index=True)
        self.ends = np.append(self.starts[1:], keys.shape[0])

    def query(self, section: int, bounds: Bounds) -> np.ndarray:
        x0, y0, x1, y1 = bounds
        gx0, gy0 = np.floor((np.array([x0, y0]) - self.origin) / self.cell).astype(np.int64)
        gx1, gy1 = np.floor((np.array([x1, y1]) - self.origin) / self.cell).astype(np.int64)
        parts = []
        for gx in range(max(int(gx0), 0), min(int(gx1), self.nx - 1) + 1):
            for gy in range(max(int(gy0), 0), min(int(gy1), self.ny - 1) + 1):
                key = (section * self.nx + gx) * self.ny + gy
                pos = np.searchsorted(self.keys, key)
                if pos < self.keys.shape[0] and self.keys[pos] == key:
                    parts.append(self.order[self.starts[pos] : self.ends[pos]])
        if not parts:
            return np.zeros(0, dtype=np.int64)
        cand = np.concatenate(parts)
        p = self.xy[cand]
        inside = (p[:, 0] >= x0) & (p[:, 0] < x1) & (p[:, 1] >= y0) & (p[:, 1] < y1)
        return np.sort(cand[inside]).astype(np.int64)


class WindowSampler:
    """Random square windows for GeST training: a pure function of ``(seed, k)``.

    ``window(k)`` draws an anchor cell uniformly from the allowed ``cells``, places a square of side ``side_um``
    around it with the anchor uniformly inside (the window is not clipped to the tissue), keeps the cells of the
    anchor's section inside it, subsamples to ``max_cells`` if denser, and serialises them. A window with fewer
    than ``min_cells`` cells (a lone cell gives no (context, target) pair) is discarded and another anchor is drawn,
    up to ``max_tries`` times; then a :class:`~msfm.errors.MsfmInputError` says the data is too sparse.

    ``cells`` restricts the anchors only: a window may contain any cell of the anchor's section. To keep cells out
    of every window (a held-out region), subset ``xy``/``section`` before building the sampler.

    Args:
        xy: Cell positions in micrometres. Shape: ``[n, 2]``.
        section: Section code (or label) of each cell; None = one section. Shape: ``[n]``.
        side_um: Window side in micrometres (GeST default 600).
        max_cells: Most cells per window.
        order: Serialisation order (see :func:`serialize`).
        jitter_um: Corner-sweep jitter; None = 5 % of ``side_um``.
        subsample: ``"random"`` keeps a random subset that always includes the anchor; ``"nearest"`` keeps the
            ``max_cells`` cells nearest to the window centre (ties by index; the anchor may be dropped).
        min_cells: Smallest usable window.
        seed: Base seed; window ``k`` uses ``np.random.default_rng([seed, k])``.
        cells: Allowed anchor cells: indices or a boolean mask over the ``n`` cells; None = all.
        max_tries: Anchors tried per window before giving up.

    Raises:
        MsfmInputError: Malformed positions, sections or options.
    """

    def __init__(
        self,
        xy: Any,
        section: Any = None,
        *,
        side_um: float = 600.0,
        max_cells: int = 1024,
        order: Order = "corner_sweep",
        jitter_um: float | None = None,
        subsample: Subsample = "random",
        min_cells: int = 2,
        seed: int = 0,
        cells: Any = None,
        max_tries: int = 64,
    ):
        self.xy = _as_xy(xy)
        n = self.xy.shape[0]
        self.section = _as_sections(section, n)
        self.side_um = _positive_float(side_um, "side_um")
        self.max_cells = _positive_int(max_cells, "max_cells")
        self.min_cells = _positive_int(min_cells, "min_cells")
        if self.max_cells < self.min_cells:
            msg = f"max_cells={max_cells} is below min_cells={min_cells}; no window could be kept."
            raise MsfmInputError(msg)
        if order not in _ORDERS:
            msg = f"order={order!r}; expected one of {_ORDERS}."
            raise MsfmInputError(msg)
        self.order = order
        if subsample not in ("random", "nearest"):
            msg = f"subsample={subsample!r}; expected 'random' or 'nearest'."
            raise MsfmInputError(msg)
        self.subsample = subsample
        if jitter_um is not None and (not math.isfinite(float(jitter_um)) or float(jitter_um) < 0):
            msg = f"jitter_um={jitter_um!r}; expected a non-negative number of micrometres or None (5 % of side)."
            raise MsfmInputError(msg)
        self.jitter_um = 0.05 * self.side_um if jitter_um is None else float(jitter_um)
        self.seed = _seed_int(seed)
        self.max_tries = _positive_int(max_tries, "max_tries")
        self.cells = self._allowed(cells, n)
        self._index = _GridIndex(self.xy, self.section, self.side_um)

    @classmethod
    def from_coords(cls, coords: Any, **kwargs: Any) -> WindowSampler:
        """Build from a :class:`~msfm.data.spatial.SpatialCoords`-like object (``.xy`` µm, ``.section`` codes)."""
        return cls(coords.xy, getattr(coords, "section", None), **kwargs)

    @staticmethod
    def _allowed(cells: Any, n: int) -> np.ndarray:
        if cells is None:
            out = np.arange(n, dtype=np.int64)
        else:
            arr = np.asarray(cells)
            if arr.dtype == bool:
                if arr.shape != (n,):
                    msg = f"cells is a boolean mask of shape {arr.shape}; expected ({n},), one flag per cell."
                    raise MsfmInputError(msg)
                out = np.flatnonzero(arr).astype(np.int64)
            elif arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
                out = np.unique(arr.astype(np.int64))
                if out.size and (out[0] < 0 or out[-1] >= n):
                    msg = f"cells has indices outside 0..{n - 1} (min {out[0]}, max {out[-1]})."
                    raise MsfmInputError(msg)
            else:
                msg = f"cells has dtype {arr.dtype} and shape {arr.shape}; expected integer indices or a bool mask."
                raise MsfmInputError(msg)
        if out.size == 0:
            msg = "WindowSampler has no anchor cells (empty data or an empty `cells` selection)."
            raise MsfmInputError(msg)
        return out

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    def __iter__(self) -> Iterator[Window]:
        k = 0
        while True:
            yield self.window(k)
            k += 1

    def window(self, k: int) -> Window:
        """The ``k``-th window (deterministic in ``(seed, k)``).

        Raises:
            MsfmInputError: ``k`` is negative, or no anchor in ``max_tries`` gave ``min_cells`` cells.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 0:
            msg = f"window index k={k!r}; expected a non-negative integer."
            raise MsfmInputError(msg)
        rng = np.random.default_rng([self.seed, int(k)])
        side = self.side_um
        for _ in range(self.max_tries):
            anchor = int(self.cells[rng.integers(self.cells.shape[0])])
            ax, ay = self.xy[anchor]
            ux, uy = rng.random(2)
            x0, y0 = ax - ux * side, ay - uy * side
            bounds = (float(x0), float(y0), float(x0 + side), float(y0 + side))
            sec = int(self.section[anchor])
            members = self._index.query(sec, bounds)
            if not np.any(members == anchor):
                # Float rounding at the upper edge can drop the anchor; the anchor always belongs to its window.
                members = np.sort(np.append(members, anchor))
            if members.shape[0] < self.min_cells:
                continue
            if members.shape[0] > self.max_cells:
                members = self._subsample(members, anchor, bounds, rng)
            perm = serialize(
                self.xy[members], order=self.order, jitter_um=self.jitter_um, bounds=bounds, rng=rng
            )
            return Window(section=sec, bounds=bounds, cells=members[perm], anchor=anchor)
        msg = (
            f"WindowSampler found no window with at least {self.min_cells} cells after {self.max_tries} anchors "
            f"(side_um={side:g}): the data is too sparse for this window size. Use a larger side_um (for example "
            f"{2 * side:g}), check the coordinate unit (obsm positions must be in micrometres), or lower min_cells."
        )
        raise MsfmInputError(msg)

    def _subsample(
        self, members: np.ndarray, anchor: int, bounds: Bounds, rng: np.random.Generator
    ) -> np.ndarray:
        if self.subsample == "random":
            others = members[members != anchor]
            keep = rng.choice(others, size=self.max_cells - 1, replace=False)
            return np.sort(np.append(keep, anchor)).astype(np.int64)
        centre = np.array([(bounds[0] + bounds[2]) / 2.0, (bounds[1] + bounds[3]) / 2.0])
        d = ((self.xy[members] - centre) ** 2).sum(axis=1)
        return np.sort(members[np.argsort(d, kind="stable")[: self.max_cells]]).astype(np.int64)
