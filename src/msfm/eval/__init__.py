"""msfm.eval: evaluation metrics (pure functions on arrays)."""

from __future__ import annotations

from msfm.eval.metrics import classification_scores, clustering_scores, leiden_or_kmeans_clusters, silhouette

__all__ = ["classification_scores", "clustering_scores", "leiden_or_kmeans_clusters", "silhouette"]
