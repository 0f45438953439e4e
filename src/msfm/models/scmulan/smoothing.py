"""kNN smoothing of predicted cell types (the release's ``cell_type_smoothing``), a tool without a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.errors import MsfmInputError
from msfm.runtime.adata import check_key_added, field_key, obsm_key, store_uns

__all__ = ["smooth_labels"]

UNCLASSIFIED = "Unclassified"


def smooth_labels(
    data: AnnData,
    *,
    key_added: str = "scmulan",
    n_neighbors: int = 15,
    threshold: float = 0.1,
    use_rep: str | None = None,
    labels: str | None = None,
    n_pcs: int = 10,
) -> AnnData:
    """kNN smoothing of the fine cell-type labels of :func:`msfm.scmulan.predict`.

    The representation (default ``obsm["X_<key_added>"]``) is reduced to ``n_pcs`` principal components; every
    cell takes a vote among its ``n_neighbors`` nearest other cells, each neighbour weighted by its inverse
    distance (weights normalised to sum to 1). The label with the largest weight wins; if that weight is below
    ``threshold`` the cell becomes ``Unclassified``.

    Args:
        data: an AnnData with the labels (default ``obs["<key_added>_cell_type_fine"]``) and the representation.
        key_added: the prefix ``predict`` wrote under (and the prefix of what is written here).
        use_rep, labels: other ``obsm`` / ``obs`` keys to use.

    Returns:
        ``data``, with ``obs["<key>_cell_type_smoothed"]`` and ``obs["<key>_smoothing_score"]`` (the winning
        weight), and ``uns[key]["smooth_labels"]`` when ``uns[key]`` exists.
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    adata = data
    key = check_key_added(key_added)
    rep_key = use_rep or obsm_key(key)
    label_key = labels or field_key(key, "cell_type_fine")
    if rep_key not in adata.obsm:
        msg = f"obsm[{rep_key!r}] not found; run msfm.scmulan.predict first or pass use_rep= (have {list(adata.obsm)})."
        raise MsfmInputError(msg)
    if label_key not in adata.obs:
        msg = f"obs[{label_key!r}] not found; run msfm.scmulan.predict first or pass labels=."
        raise MsfmInputError(msg)
    if isinstance(n_neighbors, bool) or int(n_neighbors) < 1:
        msg = f"n_neighbors must be a positive integer, got {n_neighbors!r}."
        raise MsfmInputError(msg)
    rep = np.asarray(adata.obsm[rep_key], dtype=np.float64)
    values = adata.obs[label_key].astype(str).to_numpy()
    n = rep.shape[0]
    smoothed_key, score_key = field_key(key, "cell_type_smoothed"), field_key(key, "smoothing_score")
    if n < 2:
        adata.obs[smoothed_key] = pd.Categorical(values)
        adata.obs[score_key] = np.ones(n, dtype=np.float32)
        return adata
    n_comp = min(int(n_pcs), rep.shape[1], n - 1)
    z = PCA(n_components=n_comp, random_state=0).fit_transform(rep) if rep.shape[1] > n_comp else rep
    k = min(int(n_neighbors), n - 1)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    # Drop each cell itself (not necessarily column 0 when several cells coincide).
    not_self = idx != np.arange(n)[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(idx, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    weight = 1.0 / np.maximum(dist, 1e-8)
    weight /= weight.sum(axis=1, keepdims=True)
    cats, codes = np.unique(values, return_inverse=True)
    scores = np.zeros((n, len(cats)))
    np.add.at(scores, (np.repeat(np.arange(n), k), codes[idx].ravel()), weight.ravel())
    best = scores.argmax(axis=1)
    score = scores[np.arange(n), best]
    smoothed = np.where(score >= float(threshold), cats[best], UNCLASSIFIED)
    adata.obs[smoothed_key] = pd.Categorical(smoothed)
    adata.obs[score_key] = score.astype(np.float32)
    if isinstance(adata.uns.get(key), Mapping):
        params = {"n_neighbors": k, "threshold": float(threshold), "use_rep": rep_key, "labels": label_key}
        store_uns(adata, key, "smooth_labels", {**params, "n_pcs": n_comp})
    return adata
