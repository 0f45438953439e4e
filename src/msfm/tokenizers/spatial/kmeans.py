"""k-means for the meta-cell vocabulary: nearest centres, seeded k-means, and repairs of empty clusters."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from msfm.errors import MsfmInputError
from msfm.tokenizers.spatial._inputs import _row_chunks


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
