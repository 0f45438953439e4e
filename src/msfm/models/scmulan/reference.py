"""The reference space of perturbation scores: a PCA of real cells in the binned space, and group centroids.

The reference is streamed once (chunk by chunk): the mean and the Gram matrix in the binned gene space (per-cell
levels / 10 over the vocabulary's genes) plus the sums of the wanted groups. Memory is ``G x G`` (the
vocabulary's genes), never cells x genes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from anndata import AnnData

from msfm.data import CellReadOptions, GeneMapping
from msfm.data.normalize import normalized_rows
from msfm.errors import MsfmInputError
from msfm.models.scmulan.cell_decode import prepare
from msfm.runtime.loaded import Loaded
from msfm.tokenizers.cell_sentence import CellSentenceTokenizer

__all__ = ["Reference", "reference_pca"]


@dataclass
class Reference:
    """PCA of real cells in the binned space and the group centroids (gene space)."""

    mean: np.ndarray  # [G]
    components: np.ndarray  # [n_pcs, G]
    source: np.ndarray  # [G] centroid of the source group
    targets: dict[str, np.ndarray]  # name -> [G]
    n_cells: int
    n_source: int
    mapping: GeneMapping

    def project(self, x: np.ndarray) -> np.ndarray:
        """Shape: ``[..., G]`` -> ``[..., n_pcs]``."""
        return (x - self.mean) @ self.components.T


def reference_pca(
    reference: AnnData,
    loaded: Loaded,
    *,
    group_key: str | None,
    source: str | None,
    targets: Sequence[str] | None,
    n_pcs: int,
    read: CellReadOptions | None = None,
    chunk_size: int = 4096,
) -> Reference:
    """Stream the reference once: mean and covariance in the binned gene space, plus group sums.

    Memory is ``G x G`` (the vocabulary's genes), never cells x genes.
    """
    if group_key is None and (source is not None or targets):
        msg = "source= and targets= name groups of reference.obs[group_key]; pass group_key= too."
        raise MsfmInputError(msg)
    groups: np.ndarray | None = None
    if group_key is not None:
        if group_key not in reference.obs:
            msg = f"group_key {group_key!r} is not a column of reference.obs ({list(reference.obs.columns)[:20]})."
            raise MsfmInputError(msg)
        groups = reference.obs[group_key].astype(str).to_numpy()
        known = set(groups)
        wanted = ([source] if source is not None else []) + list(targets or [])
        missing = [g for g in wanted if g not in known]
        if missing:
            msg = (
                f"Groups {missing} are not in reference.obs[{group_key!r}]; available: {sorted(known)[:30]}."
            )
            raise MsfmInputError(msg)
    src, mapping = prepare(reference, loaded, read or CellReadOptions())
    tokenizer = CellSentenceTokenizer(loaded.vocab, n_levels=loaded.config.n_levels)
    g = len(loaded.vocab.genes)
    total = np.zeros(g)
    gram = np.zeros((g, g))
    wanted_groups = ([source] if source is not None else []) + list(targets or [])
    sums = {name: np.zeros(g) for name in wanted_groups}
    counts = dict.fromkeys(wanted_groups, 0)
    n = src.n_obs
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(n, start + chunk_size))
        binned = tokenizer.binned_matrix(normalized_rows(src, rows, mapping)).astype(np.float64)
        total += np.asarray(binned.sum(axis=0)).ravel()
        gram += (binned.T @ binned).toarray()
        if groups is not None:
            for name in wanted_groups:
                sel = np.flatnonzero(groups[rows] == name)
                if sel.size:
                    sums[name] += np.asarray(binned[sel].sum(axis=0)).ravel()
                    counts[name] += sel.size
    if n < 2:
        msg = f"The reference has {n} cell(s); a PCA needs at least 2."
        raise MsfmInputError(msg)
    mean = total / n
    # Genes never expressed in the reference have zero variance and zero loadings: decompose the rest only.
    active = np.flatnonzero(np.diag(gram) > 0)
    if active.size == 0:
        msg = "No reference cell expresses any of the checkpoint's genes; the reference defines no PCA space."
        raise MsfmInputError(msg)
    cov = (gram[np.ix_(active, active)] - n * np.outer(mean[active], mean[active])) / (n - 1)
    _, evecs = np.linalg.eigh(cov)
    k = max(1, min(int(n_pcs), active.size, n - 1))
    comps = np.zeros((k, g))
    comps[:, active] = evecs[:, ::-1][:, :k].T  # [k, G], by decreasing variance
    # Deterministic signs: the largest-magnitude loading of each component is positive.
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    source_centroid = sums[source] / counts[source] if source is not None else mean
    return Reference(
        mean=mean,
        components=comps,
        source=source_centroid,
        targets={t: sums[t] / counts[t] for t in (targets or [])},
        n_cells=n,
        n_source=counts[source] if source is not None else n,
        mapping=mapping,
    )
