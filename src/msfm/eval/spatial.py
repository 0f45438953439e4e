"""Evaluation of spatial generation, niche clustering and in-silico spatial perturbation (GeST, B10/B11).

Pure functions on arrays (numpy/scipy/scikit-learn; pandas for the per-gene perturbation table):

- :func:`generation_metrics`: RMSE over all genes (the paper's ``R.all``), over top spatially variable genes
  (``R.200`` / ``R.50``) and Spearman / Pearson correlations of predicted against true expression.
- :func:`morans_i` and :func:`spatially_variable_genes`: Moran's I on a kNN graph, used to pick the ``R.top``
  genes. The paper ranks genes with SOMDE; Moran's I is a standard, dependency-free stand-in.
- :func:`niche_clustering_scores`: cluster an embedding (KMeans or Leiden) and score it against niche labels
  (AMI, ARI), as in the zero-shot niche clustering table.
- :func:`perturbation_report` and :func:`perturbation_summary`: per-gene comparison of control and perturbed
  generations (log fold change, paired Wilcoxon, Benjamini-Hochberg FDR), DEG direction accuracy and PCC to a
  reference profile (B11).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = [
    "benjamini_hochberg",
    "generation_metrics",
    "morans_i",
    "niche_clustering_scores",
    "perturbation_report",
    "perturbation_summary",
    "spatially_variable_genes",
]


# --------------------------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------------------------


def _dense_2d(x: Any, name: str) -> np.ndarray:
    """A dense float64 ``[n, T]`` copy-free view when possible (sparse matrices are densified)."""
    if hasattr(x, "toarray"):
        x = x.toarray()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        msg = f"{name} must be a 2-D [n_cells, n_genes] array; got shape {arr.shape}."
        raise MsfmInputError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"{name} contains NaN or inf values; pass finite expression values (e.g. log1p-normalised)."
        raise MsfmInputError(msg)
    return arr


def _coords(xy: Any, n: int, name: str = "xy") -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] != n:
        msg = f"{name} must be [n_cells, 2] with n_cells = {n} (one position per row of X); got shape {arr.shape}."
        raise MsfmInputError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"{name} contains NaN or inf coordinates; drop those cells first."
        raise MsfmInputError(msg)
    return arr


def _rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows; NaN where either row is constant.

    Shape:
        a, b: ``[n, T]`` -> ``[n]``.
    """
    ac = a - a.mean(axis=1, keepdims=True)
    bc = b - b.mean(axis=1, keepdims=True)
    num = np.einsum("ij,ij->i", ac, bc)
    den = np.sqrt(np.einsum("ij,ij->i", ac, ac) * np.einsum("ij,ij->i", bc, bc))
    out = np.full(a.shape[0], np.nan)
    # A zero norm means a constant row: the correlation is undefined, so it stays NaN and is skipped.
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return np.clip(out, -1.0, 1.0)


def _constant_rows(a: np.ndarray) -> np.ndarray:
    return np.all(a == a[:, :1], axis=1) if a.shape[1] else np.ones(a.shape[0], dtype=bool)


def _gene_index(
    top_genes: Any, gene_names: Sequence[str] | None, n_genes: int, name: str = "top_genes"
) -> np.ndarray:
    """Resolve integer indices, a boolean mask or gene names to integer column indices."""
    arr = np.asarray(top_genes)
    if arr.ndim != 1 or arr.size == 0:
        msg = f"{name} must be a non-empty 1-D list of gene indices or names; got shape {arr.shape}."
        raise MsfmInputError(msg)
    if arr.dtype == bool:
        if arr.shape[0] != n_genes:
            msg = f"{name} as a boolean mask must have one entry per gene ({n_genes}); got {arr.shape[0]}."
            raise MsfmInputError(msg)
        return np.flatnonzero(arr)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < -n_genes or arr.max() >= n_genes:
            msg = f"{name} has indices outside [0, {n_genes}); got min {arr.min()}, max {arr.max()}."
            raise MsfmInputError(msg)
        return arr.astype(np.int64) % n_genes
    if gene_names is None:
        msg = (
            f"{name} holds gene names ({arr[:3].tolist()} ...) but gene_names was not given; pass gene_names."
        )
        raise MsfmInputError(msg)
    lookup = {str(g): i for i, g in enumerate(gene_names)}
    missing = [str(g) for g in arr.tolist() if str(g) not in lookup]
    if missing:
        msg = f"{name}: {len(missing)} gene(s) not in gene_names, e.g. {missing[:5]}. Check the spelling."
        raise MsfmInputError(msg)
    return np.asarray([lookup[str(g)] for g in arr.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def generation_metrics(
    pred: Any,
    true: Any,
    *,
    gene_names: Sequence[str] | None = None,
    top_genes: Any = None,
) -> dict[str, float | int]:
    """Scores of generated expression against the held-out truth (GeST Table 1 style).

    Definitions (``e = pred - true``, ``n`` cells, ``T`` genes):

    - ``rmse_all``: ``sqrt(mean over all n*T entries of e**2)``, the RMSE over all genes (the paper's ``R.all``;
      the paper does not say whether it averages per cell first, so both are reported).
    - ``rmse_cell_mean``: mean over cells of the per-cell RMSE ``sqrt(mean over genes of e**2)``.
    - ``rmse_top`` / ``rmse_top_cell_mean``: the same on the ``top_genes`` columns only (``R.200``), when given.
    - ``spearman_cell`` / ``pearson_cell``: mean over cells of the correlation between the predicted and the true
      profile across genes. Cells where either profile is constant have no correlation: they are skipped and
      counted in ``n_cells_constant``.
    - ``spearman_gene``: mean over genes of the Spearman correlation across cells, skipping genes that are
      constant in either array (counted in ``n_genes_constant``).

    Correlations are NaN when every cell (gene) was skipped.

    Args:
        pred: Generated expression, in the same space as ``true`` (model space: log1p-normalised).
        true: Held-out expression at the same cells.
        gene_names: Column names, needed when ``top_genes`` holds names.
        top_genes: Columns of the top genes (e.g. :func:`spatially_variable_genes`): integer indices, a boolean
            mask or gene names.

    Returns:
        A dict of floats and counts (``n_cells``, ``n_genes``, ``n_top_genes`` with ``top_genes``).

    Raises:
        MsfmInputError: On shapes that differ, non-finite values, empty input or unknown top genes.

    Shape:
        pred, true: ``[n, T]``.
    """
    from scipy.stats import rankdata

    p = _dense_2d(pred, "pred")
    t = _dense_2d(true, "true")
    if p.shape != t.shape:
        msg = (
            f"pred has shape {p.shape} but true has {t.shape}; they must be the same cells x the same genes."
        )
        raise MsfmInputError(msg)
    n, n_genes = t.shape
    if n == 0 or n_genes == 0:
        msg = f"generation_metrics needs at least one cell and one gene; got shape {t.shape}."
        raise MsfmInputError(msg)
    if gene_names is not None and len(gene_names) != n_genes:
        msg = f"gene_names has {len(gene_names)} names but the arrays have {n_genes} genes."
        raise MsfmInputError(msg)

    sq = (p - t) ** 2
    out: dict[str, float | int] = {
        "rmse_all": float(np.sqrt(sq.mean())),
        "rmse_cell_mean": float(np.sqrt(sq.mean(axis=1)).mean()),
    }
    if top_genes is not None:
        idx = _gene_index(top_genes, gene_names, n_genes)
        sq_top = sq[:, idx]
        out["rmse_top"] = float(np.sqrt(sq_top.mean()))
        out["rmse_top_cell_mean"] = float(np.sqrt(sq_top.mean(axis=1)).mean())
        out["n_top_genes"] = int(idx.size)

    skip_cells = _constant_rows(p) | _constant_rows(t)
    keep = ~skip_cells
    if keep.any():
        # Spearman = Pearson of average ranks (ties get their mean rank, as scipy.stats.spearmanr).
        rp, rt = rankdata(p[keep], axis=1), rankdata(t[keep], axis=1)
        out["spearman_cell"] = float(np.mean(_rowwise_corr(rp, rt)))
        out["pearson_cell"] = float(np.mean(_rowwise_corr(p[keep], t[keep])))
    else:
        out["spearman_cell"] = out["pearson_cell"] = float("nan")
    skip_genes = _constant_rows(p.T) | _constant_rows(t.T)
    gkeep = ~skip_genes
    if gkeep.any():
        rp, rt = rankdata(p[:, gkeep], axis=0), rankdata(t[:, gkeep], axis=0)
        out["spearman_gene"] = float(np.mean(_rowwise_corr(rp.T, rt.T)))
    else:
        out["spearman_gene"] = float("nan")
    out.update(
        n_cells=int(n),
        n_genes=int(n_genes),
        n_cells_constant=int(skip_cells.sum()),
        n_genes_constant=int(skip_genes.sum()),
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# Spatial autocorrelation
# --------------------------------------------------------------------------------------------------------------


def _knn_indices(xy: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    n = xy.shape[0]
    if not 1 <= k < n:
        msg = (
            f"k must be between 1 and n_cells - 1 = {n - 1} (neighbours exclude the cell itself); got k={k}."
        )
        raise MsfmInputError(msg)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(xy)
    _, idx = nn.kneighbors(xy)
    # Drop the cell itself. With duplicate positions the self hit may not come first, so remove it explicitly.
    rows = np.arange(n)[:, None]
    not_self = idx != rows
    # Keep the first k non-self neighbours of each row (every row has at least k of them among k+1 hits).
    order = np.argsort(~not_self, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)[:, :k]


def morans_i(X: Any, xy: Any, *, k: int = 6, chunk_size: int | None = None) -> np.ndarray:
    """Moran's I of every gene on a row-standardised kNN graph of the cell positions.

    ``I = (n / S0) * sum_ij w_ij z_i z_j / sum_i z_i**2`` with ``z`` the centred expression and ``w_ij = 1 / k``
    for the ``k`` nearest neighbours ``j`` of ``i`` (so ``S0 = n`` and ``I = sum_i z_i * mean_{j in N(i)} z_j /
    sum_i z_i**2``). Positive for spatially smooth genes, about ``-1 / (n - 1)`` for spatially random ones.

    Args:
        X: Expression ``[n, T]`` (dense or scipy sparse).
        xy: Positions ``[n, 2]`` (µm).
        k: Neighbours per cell.
        chunk_size: Genes per block (bounds the memory to ``n * chunk_size`` floats); default ~2e7 / n.

    Returns:
        Moran's I per gene; NaN for constant genes.

    Raises:
        MsfmInputError: On misaligned shapes, non-finite values or ``k`` outside ``[1, n - 1]``.

    Shape:
        X: ``[n, T]``; xy: ``[n, 2]`` -> ``[T]``.
    """
    if hasattr(X, "tocsc"):
        # Sparse: column blocks are densified one at a time (CSC slices columns cheaply).
        X = X.tocsc()
        if len(X.shape) != 2:
            msg = f"X must be a 2-D [n_cells, n_genes] matrix; got shape {X.shape}."
            raise MsfmInputError(msg)
    else:
        X = _dense_2d(X, "X")
    n_rows, n_genes = X.shape
    pos = _coords(xy, n_rows)
    idx = _knn_indices(pos, k)
    step = chunk_size or max(1, int(2e7 // max(n_rows, 1)))
    out = np.empty(n_genes, dtype=np.float64)
    for start in range(0, n_genes, step):
        block = _dense_2d(X[:, start : start + step], "X")
        z = block - block.mean(axis=0, keepdims=True)
        # Spatial lag accumulated one neighbour rank at a time: memory n*chunk instead of n*k*chunk.
        lag = np.zeros_like(z)
        for j in range(k):
            lag += z[idx[:, j]]
        lag /= k
        num = np.einsum("ij,ij->j", z, lag)
        den = np.einsum("ij,ij->j", z, z)
        res = np.full(z.shape[1], np.nan)
        ok = den > 0
        res[ok] = num[ok] / den[ok]
        out[start : start + z.shape[1]] = res
    return out


def spatially_variable_genes(X: Any, xy: Any, n_top: int = 200, *, k: int = 6) -> np.ndarray:
    """Indices of the ``n_top`` genes with the highest Moran's I (the ``R.top`` gene set).

    Ties keep the column order; constant genes (NaN) come last. ``n_top`` larger than the number of genes returns
    every gene.

    Args:
        X: Expression ``[n, T]``.
        xy: Positions ``[n, 2]``.
        n_top: Number of genes to return (the paper uses 200 SOMDE SVGs, 50 in the ablation).
        k: Neighbours of the kNN graph.

    Returns:
        Integer column indices, most spatially variable first.

    Raises:
        MsfmInputError: If ``n_top < 1`` or on the errors of :func:`morans_i`.

    Shape:
        -> ``[min(n_top, T)]`` int64.
    """
    if n_top < 1:
        msg = f"n_top must be at least 1; got {n_top}."
        raise MsfmInputError(msg)
    scores = morans_i(X, xy, k=k)
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-key, kind="stable")
    return order[: min(n_top, order.size)].astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Niche clustering
# --------------------------------------------------------------------------------------------------------------


def niche_clustering_scores(
    embedding: Any,
    labels: Sequence[Any] | np.ndarray,
    *,
    n_clusters: int | None = None,
    method: Literal["kmeans", "leiden"] = "kmeans",
    seed: int = 0,
    standardize: bool = False,
    n_pcs: int | None = None,
    n_neighbors: int = 15,
    return_labels: bool = False,
) -> dict[str, Any]:
    """Cluster a niche embedding and score the clusters against niche labels (GeST Table 2: AMI).

    Cells with a missing label (None/NaN) are clustered with the others but left out of the scores.

    ``method="leiden"`` clusters a kNN graph with Leiden and bisects the resolution until the number of clusters
    equals ``n_clusters`` (:func:`msfm.eval.metrics.leiden_or_kmeans_clusters`, igraph + leidenalg directly rather
    than through scanpy, so the count search is shared with the rest of the toolkit); ``"kmeans"`` runs
    scikit-learn KMeans with ``n_init=10``.

    Args:
        embedding: ``[n, d]`` cell or niche embedding.
        labels: Niche labels (e.g. brain division / region), one per cell.
        n_clusters: Clusters to find; default the number of distinct (non-missing) labels.
        method: ``"kmeans"`` or ``"leiden"``.
        seed: Seed of KMeans / Leiden.
        standardize: Scale every embedding dimension to zero mean and unit variance first.
        n_pcs: Reduce to this many principal components first (None: no PCA).
        n_neighbors: Neighbours of the Leiden kNN graph.
        return_labels: Add the cluster of every cell under ``"clusters"``.

    Returns:
        ``{"ami", "ari", "nmi", "n_clusters", "n_clusters_found", "method", "n_scored"}`` (+ ``"clusters"``).

    Raises:
        MsfmInputError: On misaligned inputs, an unknown method or a bad ``n_clusters`` / ``n_pcs``.
        ImportError: With ``method="leiden"`` when igraph/leidenalg are missing (use ``method="kmeans"``).

    Shape:
        embedding: ``[n, d]``; labels: ``[n]``.
    """
    import pandas as pd

    from msfm.eval.metrics import clustering_scores, leiden_or_kmeans_clusters

    x = np.asarray(embedding, dtype=np.float64)
    y = np.asarray(labels, dtype=object)
    if x.ndim != 2 or x.shape[0] == 0:
        msg = f"embedding must be a non-empty [n, d] array; got shape {x.shape}."
        raise MsfmInputError(msg)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        msg = f"labels must be 1-D with one label per embedding row ({x.shape[0]}); got shape {y.shape}."
        raise MsfmInputError(msg)
    if not np.all(np.isfinite(x)):
        msg = "embedding contains NaN or inf; drop or impute those cells first."
        raise MsfmInputError(msg)
    if method not in ("kmeans", "leiden"):
        msg = f"Unknown method {method!r}; expected 'kmeans' or 'leiden'."
        raise MsfmInputError(msg)
    labelled = ~pd.isna(pd.Series(y)).to_numpy()
    if not labelled.any():
        msg = "Every label is missing (None/NaN); pass the niche labels to score against."
        raise MsfmInputError(msg)
    y_str = y[labelled].astype(str)
    k = int(np.unique(y_str).size) if n_clusters is None else int(n_clusters)
    if not 1 <= k <= x.shape[0]:
        msg = f"n_clusters must be between 1 and the number of cells ({x.shape[0]}); got {k}."
        raise MsfmInputError(msg)

    if standardize:
        sd = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    if n_pcs is not None:
        limit = min(x.shape)
        if not 1 <= n_pcs <= limit:
            msg = f"n_pcs must be between 1 and min(n_cells, n_dims) = {limit}; got {n_pcs}."
            raise MsfmInputError(msg)
        from sklearn.decomposition import PCA

        x = PCA(n_components=n_pcs, random_state=seed).fit_transform(x)

    clusters = leiden_or_kmeans_clusters(x, k, seed, method=method, n_neighbors=n_neighbors)
    scores = clustering_scores(y_str, clusters[labelled])
    out: dict[str, Any] = {
        "ami": scores["ami"],
        "ari": scores["ari"],
        "nmi": scores["nmi"],
        "n_clusters": k,
        "n_clusters_found": int(np.unique(clusters).size),
        "method": method,
        "n_scored": int(labelled.sum()),
    }
    if return_labels:
        out["clusters"] = clusters
    return out


# --------------------------------------------------------------------------------------------------------------
# Perturbation
# --------------------------------------------------------------------------------------------------------------


def benjamini_hochberg(pvalues: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR), in the input order.

    ``q_(i) = min_{j >= i} p_(j) * m / j`` over the ascending p-values, capped at 1. NaN p-values stay NaN and
    do not count towards ``m``.

    Shape:
        pvalues: ``[m]`` -> ``[m]``.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        msg = f"pvalues must be 1-D; got shape {p.shape}."
        raise MsfmInputError(msg)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    # Cumulative minimum from the largest p-value down keeps the adjusted values monotone.
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out[order] = np.clip(q, 0.0, 1.0)
    return out


def _gene_list(genes: Any, n_genes: int) -> list[str]:
    names = [str(g) for g in genes]
    if len(names) != n_genes:
        msg = f"genes has {len(names)} names but the expression arrays have {n_genes} columns."
        raise MsfmInputError(msg)
    if len(set(names)) != len(names):
        msg = "genes contains duplicate names; make them unique (e.g. anndata's var_names_make_unique)."
        raise MsfmInputError(msg)
    return names


def _reference_sets(reference_up: Any, reference_down: Any) -> tuple[list[str], list[str]]:
    up = [str(g) for g in (reference_up or [])]
    down = [str(g) for g in (reference_down or [])]
    both = sorted(set(up) & set(down))
    if both:
        msg = f"{len(both)} gene(s) are in both reference_up and reference_down, e.g. {both[:5]}; each reference DEG needs one direction."
        raise MsfmInputError(msg)
    return up, down


_EXACT_MAX = 12


def _signflip_pvalues(diff: np.ndarray, n: int) -> np.ndarray:
    """Exact two-sided Wilcoxon signed-rank p-values of columns with exactly ``n`` non-zero differences.

    Every one of the ``2**n`` sign assignments of the ranks is equally likely under the null; ties get average
    ranks. Shape: diff ``[cells, g]`` -> ``[g]``.
    """
    from scipy.stats import rankdata

    g = diff.shape[1]
    nz = np.zeros((n, g))
    pos = np.zeros((n, g), dtype=bool)
    for j in range(g):
        d = diff[:, j][diff[:, j] != 0]
        nz[:, j] = rankdata(np.abs(d))
        pos[:, j] = d > 0
    observed = (nz * pos).sum(axis=0)
    centre = nz.sum(axis=0) / 2.0
    signs = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)  # [2**n, n]
    null = signs @ nz  # [2**n, g]
    extreme = np.abs(null - centre) >= np.abs(observed - centre) - 1e-9
    return extreme.mean(axis=0)


def perturbation_report(
    control: Any,
    perturbed: Any,
    genes: Sequence[str],
    *,
    reference_up: Sequence[str] | None = None,
    reference_down: Sequence[str] | None = None,
    reference_profile: Any = None,
):
    """Per-gene comparison of the control and the perturbed generation at the same target cells (GeST B11).

    ``log_fc`` is ``mean(perturbed) - mean(control)`` over the target cells, both in the model space
    (``log1p``-normalised), i.e. the natural log of the ratio of the geometric means of ``1 + expression``; it is
    not a ratio of mean counts. ``wilcoxon_p`` is the two-sided Wilcoxon signed-rank test of the paired
    per-cell differences (zero differences dropped; exact over all sign flips for at most 12 non-zero differences,
    ties by average ranks, else scipy's normal approximation with tie correction); a gene whose difference is
    zero in every cell gets ``p = 1``. ``fdr`` is the Benjamini-Hochberg adjustment over all genes.

    Args:
        control: Generated expression with the region unperturbed.
        perturbed: Generated expression at the same cells after the perturbation.
        genes: Gene names of the columns.
        reference_up: Reference up-regulated DEGs (e.g. of the peri-infarct area); adds ``reference_direction``
            (+1 up, -1 down, 0 not a reference DEG) and ``direction_correct`` (NaN for non-reference genes).
        reference_down: Reference down-regulated DEGs.
        reference_profile: Reference mean profile ``[T]``; added as the ``reference_profile`` column.

    Returns:
        A DataFrame indexed by gene with ``mean_control``, ``mean_perturbed``, ``log_fc``, ``n_changed`` (cells
        with a non-zero difference), ``wilcoxon_p``, ``fdr`` (+ the reference columns), in the order of
        ``genes``.

    Raises:
        MsfmInputError: On shapes that differ, too few names, duplicates or a gene in both reference lists.

    Shape:
        control, perturbed: ``[n, T]``; reference_profile: ``[T]``.
    """
    import pandas as pd
    from scipy.stats import wilcoxon

    c = _dense_2d(control, "control")
    p = _dense_2d(perturbed, "perturbed")
    if c.shape != p.shape:
        msg = f"control has shape {c.shape} but perturbed has {p.shape}; both must be the same target cells x genes."
        raise MsfmInputError(msg)
    if c.shape[0] == 0:
        msg = "control and perturbed have no cells; pass the generated target cells."
        raise MsfmInputError(msg)
    names = _gene_list(genes, c.shape[1])
    diff = p - c
    changed = diff != 0
    n_changed = changed.sum(axis=0)
    pvals = np.ones(c.shape[1])
    cols = np.flatnonzero(n_changed > 0)
    if cols.size:
        with warnings.catch_warnings():
            # Few non-zero differences make scipy warn about the normal approximation.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            # Exact p-values for up to 12 non-zero differences (all 2**n sign flips, ties handled by average
            # ranks), the normal approximation with tie correction above. scipy's "auto" would run a permutation
            # test per gene for small samples with ties, which takes minutes over a few thousand genes.
            n_nz = n_changed[cols]
            small = cols[n_nz <= _EXACT_MAX]
            for n in np.unique(n_changed[small]):
                group = small[n_changed[small] == n]
                pvals[group] = _signflip_pvalues(diff[:, group], int(n))
            rest = cols[n_nz > _EXACT_MAX]
            if rest.size:
                res = wilcoxon(diff[:, rest], axis=0, zero_method="wilcox", method="asymptotic")
                pvals[rest] = np.asarray(res.pvalue, dtype=np.float64)
        pvals = np.nan_to_num(pvals, nan=1.0)
    table = pd.DataFrame(
        {
            "mean_control": c.mean(axis=0),
            "mean_perturbed": p.mean(axis=0),
            "log_fc": diff.mean(axis=0),
            "n_changed": n_changed.astype(np.int64),
            "wilcoxon_p": pvals,
            "fdr": benjamini_hochberg(pvals),
        },
        index=pd.Index(names, name="gene"),
    )
    if reference_up is not None or reference_down is not None:
        up, down = _reference_sets(reference_up, reference_down)
        direction = np.zeros(len(names), dtype=np.int64)
        pos = {g: i for i, g in enumerate(names)}
        for g in up:
            if g in pos:
                direction[pos[g]] = 1
        for g in down:
            if g in pos:
                direction[pos[g]] = -1
        table["reference_direction"] = direction
        correct = np.where(direction != 0, (np.sign(table["log_fc"].to_numpy()) == direction), np.nan)
        table["direction_correct"] = correct.astype(np.float64)
    if reference_profile is not None:
        ref = np.asarray(reference_profile, dtype=np.float64).reshape(-1)
        if ref.shape[0] != len(names):
            msg = f"reference_profile has {ref.shape[0]} values but there are {len(names)} genes."
            raise MsfmInputError(msg)
        table["reference_profile"] = ref
    return table


def perturbation_summary(
    report,
    *,
    reference_up: Sequence[str] | None = None,
    reference_down: Sequence[str] | None = None,
    control: Any = None,
    perturbed: Any = None,
    reference_profile: Any = None,
    atol: float = 0.0,
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
) -> dict[str, Any]:
    """Headline numbers of a perturbation (GeST B11: DEG direction accuracy, PCC to the reference profile).

    Direction accuracy: among the reference DEGs present in ``report``, the fraction whose ``log_fc`` has the
    reference sign. A gene with ``|log_fc| <= atol`` (no change; with the paper's re-quantised inputs small edits
    are often no-ops) counts as wrong and is also counted in ``n_no_change``. Reference genes absent from the
    report are listed in ``missing_reference_genes`` and not scored.

    PCC: with ``control``, ``perturbed`` and ``reference_profile``, the Pearson correlation of every generated
    cell with the reference profile (e.g. the mean expression of the proximal peri-infarct area), averaged per
    condition, and a paired t-test (``scipy.stats.ttest_rel``, perturbed vs control; cells constant in either
    condition are dropped) as the paper's "PCC higher after perturbation" test.

    Args:
        report: The DataFrame of :func:`perturbation_report` (index = genes, ``log_fc`` column).
        reference_up: Reference up-regulated DEGs.
        reference_down: Reference down-regulated DEGs.
        control: Control generation ``[n, T]`` (columns in the order of ``report``).
        perturbed: Perturbed generation ``[n, T]``.
        reference_profile: Reference profile ``[T]``.
        atol: Largest ``|log_fc|`` treated as no change.
        alternative: Alternative hypothesis of the t-test (``"greater"``: perturbed PCC higher).

    Returns:
        ``direction_accuracy`` (NaN without reference genes), ``n_reference_genes``, ``n_correct``, ``n_wrong``,
        ``n_no_change``, ``missing_reference_genes``; with the PCC inputs also ``pcc_control``,
        ``pcc_perturbed``, ``pcc_delta``, ``ttest_statistic``, ``ttest_p`` and ``n_pcc_cells``.

    Raises:
        MsfmInputError: If ``report`` lacks ``log_fc``, a gene is in both lists, only some PCC inputs are given or
            their shapes do not match the report.

    Shape:
        control, perturbed: ``[n, T]``; reference_profile: ``[T]``.
    """
    from scipy.stats import ttest_rel

    if not hasattr(report, "columns") or "log_fc" not in report.columns:
        msg = "report must be the DataFrame returned by perturbation_report (with a 'log_fc' column)."
        raise MsfmInputError(msg)
    up, down = _reference_sets(reference_up, reference_down)
    index = [str(g) for g in report.index]
    lfc = dict(zip(index, report["log_fc"].to_numpy(dtype=np.float64)))
    expected = [(g, 1) for g in up] + [(g, -1) for g in down]
    present = [(g, s) for g, s in expected if g in lfc]
    missing = [g for g, _ in expected if g not in lfc]
    no_change = [g for g, _ in present if abs(lfc[g]) <= atol]
    correct = [g for g, s in present if abs(lfc[g]) > atol and np.sign(lfc[g]) == s]
    n_ref = len(present)
    out: dict[str, Any] = {
        "direction_accuracy": (len(correct) / n_ref) if n_ref else float("nan"),
        "n_reference_genes": n_ref,
        "n_correct": len(correct),
        "n_wrong": n_ref - len(correct),
        "n_no_change": len(no_change),
        "missing_reference_genes": missing,
    }
    if missing:
        logger.info("%d reference genes are not in the report and were not scored", len(missing))

    given = [v is not None for v in (control, perturbed, reference_profile)]
    if any(given) and not all(given):
        msg = "PCC to the reference needs control, perturbed and reference_profile together; got only some of them."
        raise MsfmInputError(msg)
    if all(given):
        c = _dense_2d(control, "control")
        p = _dense_2d(perturbed, "perturbed")
        ref = np.asarray(reference_profile, dtype=np.float64).reshape(-1)
        if c.shape != p.shape or c.shape[1] != len(index) or ref.shape[0] != len(index):
            msg = (
                f"control {c.shape}, perturbed {p.shape} and reference_profile {ref.shape} must share the "
                f"{len(index)} genes of the report (same column order)."
            )
            raise MsfmInputError(msg)
        refs = np.broadcast_to(ref, c.shape)
        pcc_c = _rowwise_corr(c, refs)
        pcc_p = _rowwise_corr(p, refs)
        ok = ~(np.isnan(pcc_c) | np.isnan(pcc_p))
        out["n_pcc_cells"] = int(ok.sum())
        out["pcc_control"] = float(pcc_c[ok].mean()) if ok.any() else float("nan")
        out["pcc_perturbed"] = float(pcc_p[ok].mean()) if ok.any() else float("nan")
        out["pcc_delta"] = out["pcc_perturbed"] - out["pcc_control"]
        diff = pcc_p[ok] - pcc_c[ok]
        if ok.sum() >= 2 and np.any(diff != diff[0]):
            res = ttest_rel(pcc_p[ok], pcc_c[ok], alternative=alternative)
            out["ttest_statistic"] = float(res.statistic)
            out["ttest_p"] = float(res.pvalue)
        else:
            # Identical differences (e.g. no change at all) have zero variance: the t-test is undefined.
            out["ttest_statistic"] = float("nan")
            out["ttest_p"] = float("nan")
    return out
