"""Evaluation metrics as pure functions on arrays.

Clustering agreement (ARI, NMI, AMI), classification scores (accuracy, balanced accuracy, macro F1, per-class
report, confusion matrix), silhouette, and clustering of an embedding into a requested number of clusters with
Leiden on a kNN graph (resolution searched to hit the count) or KMeans.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["classification_scores", "clustering_scores", "leiden_or_kmeans_clusters", "silhouette"]


def _labels_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        msg = f"{name} must be 1-D (one label per sample); got shape {arr.shape}."
        raise MsfmInputError(msg)
    return arr


def _paired(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    x, y = _labels_1d(a, names[0]), _labels_1d(b, names[1])
    if x.shape[0] != y.shape[0]:
        msg = f"{names[0]} has {x.shape[0]} samples but {names[1]} has {y.shape[0]}; they must align."
        raise MsfmInputError(msg)
    if x.shape[0] == 0:
        msg = f"{names[0]} and {names[1]} are empty; metrics need at least one sample."
        raise MsfmInputError(msg)
    return x, y


def clustering_scores(
    labels_true: Sequence[Any] | np.ndarray, labels_pred: Sequence[Any] | np.ndarray
) -> dict[str, float]:
    """Agreement between a reference labelling and a clustering.

    Args:
        labels_true: Reference labels (e.g. cell types), one per sample.
        labels_pred: Cluster assignments, one per sample.

    Returns:
        ``{"ari", "nmi", "ami"}``: adjusted Rand index, normalised mutual information (arithmetic mean
        normalisation) and adjusted mutual information. All equal 1.0 for identical partitions, whatever the label
        names.

    Raises:
        MsfmInputError: If the inputs are not 1-D, differ in length or are empty.
    """
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

    y_true, y_pred = _paired(labels_true, labels_pred, ("labels_true", "labels_pred"))
    return {
        "ari": float(adjusted_rand_score(y_true, y_pred)),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ami": float(adjusted_mutual_info_score(y_true, y_pred)),
    }


def classification_scores(
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    proba: np.ndarray | None = None,
    labels: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Scores of a classifier (e.g. cell-type annotation).

    Args:
        y_true: True labels.
        y_pred: Predicted labels.
        proba: Optional class probabilities ``[n, k]`` with columns in the order of ``labels``; adds ``log_loss``
            and, when every class occurs in ``y_true``, macro one-vs-rest ``roc_auc``.
        labels: Class order for ``per_class``, the confusion matrix and ``proba`` columns; default: sorted union of
            ``y_true`` and ``y_pred``.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (floats), ``per_class`` (label -> precision, recall, f1,
        support), ``confusion`` (``[k, k]`` int array, rows true, columns predicted) and ``labels`` (the class
        order); plus ``log_loss``/``roc_auc`` when ``proba`` is given.

    Raises:
        MsfmInputError: On misaligned inputs, or ``proba`` whose shape does not match ``labels``.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    t, p = _paired(y_true, y_pred, ("y_true", "y_pred"))
    classes = list(labels) if labels is not None else sorted(set(t.tolist()) | set(p.tolist()), key=str)
    unknown = sorted(set(t.tolist()) - set(classes), key=str)
    if unknown:
        msg = (
            f"y_true contains labels {unknown[:5]} that are not in labels={classes[:10]}. Add them to labels."
        )
        raise MsfmInputError(msg)
    with warnings.catch_warnings():
        # Balanced accuracy warns when y_pred has classes absent from y_true; the score is still defined.
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(t, p))
    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=classes, zero_division=0)
    # Macro F1 over the classes present in y_true, so predicted-only spurious classes are not averaged in.
    present = [c for c in classes if c in set(t.tolist())]
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(t, p)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(t, p, labels=present, average="macro", zero_division=0)),
        "per_class": {
            str(c): {"precision": float(a), "recall": float(b), "f1": float(f), "support": int(s)}
            for c, a, b, f, s in zip(classes, prec, rec, f1, support)
        },
        "confusion": confusion_matrix(t, p, labels=classes),
        "labels": classes,
    }
    if proba is not None:
        prob = np.asarray(proba, dtype=np.float64)
        if prob.ndim != 2 or prob.shape != (t.shape[0], len(classes)):
            msg = f"proba must have shape (n_samples, n_classes) = ({t.shape[0]}, {len(classes)}); got {prob.shape}."
            raise MsfmInputError(msg)
        out["log_loss"] = float(log_loss(t, prob, labels=classes))
        if len(present) == len(classes) and len(classes) > 1:
            if len(classes) == 2:
                out["roc_auc"] = float(roc_auc_score(t == classes[1], prob[:, 1]))
            else:
                out["roc_auc"] = float(
                    roc_auc_score(t, prob, multi_class="ovr", average="macro", labels=classes)
                )
    return out


def silhouette(
    embedding: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    metric: str = "euclidean",
    sample_size: int | None = None,
    seed: int = 0,
) -> float:
    """Mean silhouette width of ``labels`` in ``embedding``.

    Args:
        embedding: ``[n, d]`` array.
        labels: One label per row (at least 2 distinct labels, fewer than ``n``).
        metric: Distance metric (scikit-learn name).
        sample_size: Subsample this many rows (silhouette is O(n^2)); None uses all.
        seed: Seed of the subsample.

    Returns:
        The silhouette score in [-1, 1] (higher: tighter, better separated groups).

    Raises:
        MsfmInputError: On misaligned inputs or fewer than 2 / as many labels as samples.
    """
    from sklearn.metrics import silhouette_score

    x = np.asarray(embedding)
    y = _labels_1d(labels, "labels")
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        msg = f"embedding must be [n, d] with n = len(labels) = {y.shape[0]}; got shape {x.shape}."
        raise MsfmInputError(msg)
    n_labels = np.unique(y).size
    if not 2 <= n_labels < y.shape[0]:
        msg = f"silhouette needs between 2 and n_samples - 1 distinct labels; got {n_labels} for {y.shape[0]} samples."
        raise MsfmInputError(msg)
    return float(silhouette_score(x, y, metric=metric, sample_size=sample_size, random_state=seed))


def _knn_graph(x: np.ndarray, n_neighbors: int) -> Any:
    import igraph
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, x.shape[0] - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    _, idx = nn.kneighbors(x)
    src = np.repeat(np.arange(x.shape[0]), k)
    dst = idx[:, 1:].reshape(-1)
    edges = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist()) if a != b}
    return igraph.Graph(n=x.shape[0], edges=sorted(edges), directed=False)


def _leiden(graph: Any, resolution: float, seed: int) -> np.ndarray:
    import leidenalg

    part = leidenalg.find_partition(
        graph, leidenalg.RBConfigurationVertexPartition, resolution_parameter=resolution, seed=seed
    )
    return np.asarray(part.membership, dtype=np.int64)


def leiden_or_kmeans_clusters(
    embedding: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    *,
    method: Literal["auto", "leiden", "kmeans"] = "auto",
    n_neighbors: int = 15,
    max_iter: int = 30,
) -> np.ndarray:
    """Cluster an embedding into (about) ``n_clusters`` groups.

    With ``method="auto"`` Leiden is used when ``igraph`` and ``leidenalg`` are installed: a symmetric kNN graph
    is clustered at resolutions found by bisection until the number of clusters equals ``n_clusters`` (the
    closest count found is returned, with a ``UserWarning``, if no resolution hits it exactly). Otherwise KMeans.

    Args:
        embedding: ``[n, d]`` array.
        n_clusters: Target number of clusters (e.g. the number of annotated cell types).
        seed: Seed of Leiden / KMeans.
        method: ``"auto"``, ``"leiden"`` (fails without the packages) or ``"kmeans"``.
        n_neighbors: Neighbours per node of the kNN graph.
        max_iter: Bisection steps of the resolution search.

    Returns:
        Integer cluster labels, one per row.

    Raises:
        MsfmInputError: On a bad shape or ``n_clusters`` outside ``[1, n]``.
        ImportError: If ``method="leiden"`` and igraph/leidenalg are missing.
    """
    x = np.asarray(embedding, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        msg = f"embedding must be a non-empty [n, d] array; got shape {x.shape}."
        raise MsfmInputError(msg)
    if not 1 <= n_clusters <= x.shape[0]:
        msg = f"n_clusters must be between 1 and the number of samples ({x.shape[0]}); got {n_clusters}."
        raise MsfmInputError(msg)
    use_leiden = method == "leiden"
    if method == "auto":
        try:
            import igraph
            import leidenalg

            use_leiden = True
        except ImportError:
            logger.info("igraph/leidenalg not installed; clustering with KMeans")
    elif method == "leiden":
        try:
            import igraph  # noqa: F401
            import leidenalg  # noqa: F401
        except ImportError as err:
            msg = "method='leiden' needs igraph and leidenalg: pip install igraph leidenalg (or use method='kmeans')."
            raise ImportError(msg) from err
    elif method != "kmeans":
        msg = f"Unknown method {method!r}; expected 'auto', 'leiden' or 'kmeans'."
        raise MsfmInputError(msg)
    if not use_leiden or n_clusters == 1 or x.shape[0] < 3:
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)

    graph = _knn_graph(x, n_neighbors)
    lo, hi = 0.0, 1.0
    # Grow the upper bound until it over-segments (more clusters means higher resolution).
    best = _leiden(graph, hi, seed)
    while np.unique(best).size < n_clusters and hi < 1e3:
        lo, hi = hi, hi * 2
        best = _leiden(graph, hi, seed)
    for _ in range(max_iter):
        count = np.unique(best).size
        if count == n_clusters:
            return best
        mid = (lo + hi) / 2
        labels = _leiden(graph, mid, seed)
        m = np.unique(labels).size
        if abs(m - n_clusters) <= abs(count - n_clusters):
            best = labels
        if m < n_clusters:
            lo = mid
        else:
            hi = mid
    msg = (
        f"Leiden found {np.unique(best).size} clusters instead of the requested {n_clusters} (closest over "
        f"{max_iter} resolution steps; the kNN graph may have more components than that). Use method='kmeans' "
        "for an exact count."
    )
    warnings.warn(msg, UserWarning, stacklevel=2)
    return best
