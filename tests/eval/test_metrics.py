"""Evaluation metrics on small arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from msfm.errors import MsfmInputError
from msfm.eval import classification_scores, clustering_scores, leiden_or_kmeans_clusters, silhouette


def _blobs(n_per: int = 30, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(k, 8) * 20.0
    x = np.concatenate([c + rng.normal(size=(n_per, 8)) for c in centers])
    return x, np.repeat(np.arange(k), n_per)


def test_clustering_scores_known_values() -> None:
    truth = ["a", "a", "b", "b", "c", "c"]
    assert clustering_scores(truth, [5, 5, 1, 1, 7, 7]) == {"ari": 1.0, "nmi": 1.0, "ami": 1.0}
    # Worked example: partitions {0,1}{2,3} vs {0,2}{1,3} share nothing beyond chance.
    scores = clustering_scores([0, 0, 1, 1], [0, 1, 0, 1])
    assert scores["nmi"] == pytest.approx(0.0)
    assert scores["ari"] == pytest.approx(-0.5)
    assert scores["ami"] < 0
    one_cluster = clustering_scores([0, 0, 1, 1], [0, 0, 0, 0])
    assert one_cluster["ari"] == pytest.approx(0.0)


def test_clustering_scores_errors() -> None:
    with pytest.raises(MsfmInputError, match="labels_true has 3 samples but labels_pred has 2"):
        clustering_scores([0, 1, 1], [0, 1])
    with pytest.raises(MsfmInputError, match="1-D"):
        clustering_scores(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(MsfmInputError, match="empty"):
        clustering_scores([], [])


def test_classification_scores_known_values() -> None:
    y_true = ["a", "a", "a", "a", "b", "b", "c", "c"]
    y_pred = ["a", "a", "a", "b", "b", "b", "c", "a"]
    s = classification_scores(y_true, y_pred)
    assert s["labels"] == ["a", "b", "c"]
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    f1_a, f1_b, f1_c = 2 * 0.75 * 0.75 / 1.5, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5
    assert s["macro_f1"] == pytest.approx((f1_a + f1_b + f1_c) / 3)
    assert s["per_class"]["a"] == {"precision": 0.75, "recall": 0.75, "f1": pytest.approx(f1_a), "support": 4}
    np.testing.assert_array_equal(s["confusion"], [[3, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_classification_scores_with_proba_and_labels() -> None:
    y_true = np.array([0, 1, 1, 0])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    s = classification_scores(y_true, proba.argmax(1), proba=proba, labels=[0, 1])
    assert s["accuracy"] == 1.0
    assert s["roc_auc"] == pytest.approx(1.0)
    assert s["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6, 0.7])))
    # A class present only in the predictions is reported but does not dilute macro F1.
    s = classification_scores([0, 0, 1], [0, 2, 1], labels=[0, 1, 2])
    assert s["per_class"]["2"]["support"] == 0
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(MsfmInputError, match="proba must have shape"):
        classification_scores(y_true, y_true, proba=proba[:, :1], labels=[0, 1])
    with pytest.raises(MsfmInputError, match="not in labels"):
        classification_scores([0, 3], [0, 0], labels=[0, 1])


def test_silhouette() -> None:
    x, y = _blobs()
    assert silhouette(x, y) > 0.8
    assert silhouette(x, np.random.default_rng(0).permutation(y)) < 0.05
    assert silhouette(x, y, sample_size=60, seed=1) > 0.8
    with pytest.raises(MsfmInputError, match="between 2 and n_samples - 1"):
        silhouette(x, np.zeros(len(y)))
    with pytest.raises(MsfmInputError, match=r"\[n, d\]"):
        silhouette(x[:5], y)


@pytest.mark.parametrize("method", ["leiden", "kmeans", "auto"])
def test_clusters_recover_blobs(method: str) -> None:
    x, y = _blobs()
    labels = leiden_or_kmeans_clusters(x, 4, seed=0, method=method)
    assert labels.shape == y.shape
    assert labels.dtype == np.int64
    assert np.unique(labels).size == 4
    assert clustering_scores(y, labels)["ari"] == pytest.approx(1.0)


def test_leiden_hits_requested_count() -> None:
    # One connected cloud: the resolution search can cut it into any small number of clusters.
    x = np.random.default_rng(0).normal(size=(200, 5))
    for k in (2, 4, 6):
        labels = leiden_or_kmeans_clusters(x, k, seed=0, method="leiden")
        assert np.unique(labels).size == k


def test_leiden_returns_closest_count_when_unreachable() -> None:
    # Four disconnected kNN components cannot be merged into two by Leiden; the closest count comes back.
    x, y = _blobs(n_per=25, k=4)
    with pytest.warns(UserWarning, match="Leiden found 4 clusters instead of the requested 2"):
        labels = leiden_or_kmeans_clusters(x, 2, seed=0, method="leiden", max_iter=8)
    assert np.unique(labels).size == 4
    assert clustering_scores(y, labels)["ari"] == pytest.approx(1.0)


def test_cluster_errors() -> None:
    x, _ = _blobs()
    with pytest.raises(MsfmInputError, match="n_clusters must be between 1"):
        leiden_or_kmeans_clusters(x, 0)
    with pytest.raises(MsfmInputError, match="non-empty"):
        leiden_or_kmeans_clusters(np.zeros(5), 2)
    with pytest.raises(MsfmInputError, match="Unknown method"):
        leiden_or_kmeans_clusters(x, 2, method="spectral")  # type: ignore[arg-type]
    assert np.unique(leiden_or_kmeans_clusters(x, 1)).size == 1
