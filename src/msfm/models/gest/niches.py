"""Niches: the neighbourhood sequence of a cell, zero-shot niche embeddings, and their clustering.

A cell's niche sequence is the cell itself, then its neighbours inside the square window centred on it (nearest
first). The last content row's query is the cell's own position, so that row's hidden state predicts the cell
from its whole niche: it is the niche embedding (paper §4.4).

Example:
    >>> import msfm
    >>> msfm.gest.embed(adata, "run/model", pre_normalized=True)      # obsm['X_gest']  # doctest: +SKIP
    >>> msfm.gest.cluster_niches(adata, n_clusters=8)                  # obs['gest_niche']  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from msfm.data.options import SpatialReadOptions
from msfm.errors import MsfmInputError
from msfm.models.gest.checkpoint import CheckpointLike, generative_model, load, window_settings
from msfm.models.gest.data import cell_selection, spatial_cells
from msfm.models.gest.files import DataLike, read_data
from msfm.models.gest.generation import square_bounds
from msfm.runtime.adata import check_key_added, field_key, obsm_key, store_uns
from msfm.runtime.devices import autocast_context
from msfm.runtime.h5ad import check_output, write_output
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.runtime.progress import progress_bar
from msfm.tokenizers.spatial import normalize_positions

logger = logging.getLogger(__name__)

__all__ = ["cluster_niches", "embed", "niche_hidden", "niche_sequences", "niche_tensors"]


def niche_sequences(
    xy: np.ndarray,
    section: np.ndarray,
    centers: np.ndarray,
    *,
    side_um: float,
    max_cells: int,
) -> list[np.ndarray]:
    """Neighbourhood of every centre cell: itself first, then its neighbours by distance.

    The neighbours are the cells of the same section inside the square window of side ``side_um`` centred on the
    cell, the ``max_cells - 1`` nearest if there are more.

    Returns:
        One index array per centre (``[0]`` is the centre).
    """
    from scipy.spatial import cKDTree

    out: list[np.ndarray] = []
    half = side_um / 2.0
    for s in np.unique(section[centers]):
        in_s = np.flatnonzero(section == s)
        tree = cKDTree(xy[in_s])
        for c in centers[section[centers] == s]:
            # Chebyshev radius = half the side: exactly the square window.
            nb = in_s[tree.query_ball_point(xy[c], r=half, p=np.inf)]
            nb = nb[nb != c]
            d = np.linalg.norm(xy[nb] - xy[c], axis=1)
            order = np.lexsort((nb, d))[: max_cells - 1]
            out.append(np.concatenate([[c], nb[order]]).astype(np.int64))
    # Restore the order of ``centers``.
    firsts = np.array([o[0] for o in out])
    where = {int(c): i for i, c in enumerate(firsts)}
    return [out[where[int(c)]] for c in centers]


def niche_tensors(
    xy: np.ndarray, tokens: np.ndarray, seqs: list[np.ndarray], side_um: float
) -> dict[str, torch.Tensor]:
    """Left-padded niche sequences for :class:`~msfm.models.gest.model.Gest`.

    Content rows are ``[centre, n1..n_{N-1}]`` and queries ``[n1..n_{N-1}, centre]``: the last row predicts the centre
    from every cell of the niche, and its hidden state is the niche embedding (paper §4.4). Positions are
    normalised to the window of side ``side_um`` centred on the cell.

    Returns:
        ``query_pos``, ``content_pos`` ``[b, N, 2]``, ``tokens`` ``[b, N]`` and ``mask`` ``[b, N]`` (True = real).
    """
    n_max = max(len(s) for s in seqs)
    b = len(seqs)
    qpos = torch.zeros(b, n_max, 2)
    cpos = torch.zeros(b, n_max, 2)
    tok = torch.zeros(b, n_max, dtype=torch.long)
    mask = torch.zeros(b, n_max, dtype=torch.bool)
    for i, seq in enumerate(seqs):
        n = len(seq)
        p = torch.from_numpy(normalize_positions(xy[seq], square_bounds(xy[seq[0]], side_um)))
        cpos[i, n_max - n :] = p
        qpos[i, n_max - n :] = torch.cat([p[1:], p[:1]])
        tok[i, n_max - n :] = torch.from_numpy(tokens[seq])
        mask[i, n_max - n :] = True
    return {"query_pos": qpos, "content_pos": cpos, "tokens": tok, "mask": mask}


@torch.no_grad()
def niche_hidden(
    model: torch.nn.Module,
    xy: np.ndarray,
    tokens: np.ndarray,
    seqs: list[np.ndarray],
    *,
    side_um: float,
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """Niche embedding (hidden state of the last content row) of every niche sequence.

    Shape:
        - returns: ``[len(seqs), d]`` float32
    """
    device = next(model.parameters()).device
    out = np.zeros((len(seqs), model.config.dim), dtype=np.float32)
    with progress_bar(len(seqs), "gest embed", enabled=progress) as bar:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            b = len(chunk)
            batch = niche_tensors(xy, tokens, chunk, side_um)
            res = model(
                batch["query_pos"].to(device),
                batch["content_pos"].to(device),
                batch["tokens"].to(device),
                mask=batch["mask"].to(device),
                heads=False,
            )
            out[start : start + b] = res.hidden[:, -1].float().cpu().numpy()
            bar.update(b)
    return out


def embed(
    data: DataLike,
    checkpoint: CheckpointLike,
    *,
    cells: Any = None,
    side_um: float | None = None,
    max_cells: int = 256,
    key_added: str = "gest",
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    copy: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Zero-shot niche embeddings: the hidden state that predicts each cell from its whole neighbourhood.

    Args:
        data: cells with coordinates and expression (AnnData, file or Visium folder).
        checkpoint: a GeST checkpoint (``RUN/model``, a ``TrainResult`` or a ``Loaded``).
        cells: cells to embed (default all; the others still serve as neighbours, their rows are NaN).
        side_um: neighbourhood window side (default: the trained side).
        max_cells: cells per niche sequence, the centre included.
        key_added: prefix of what is added (below).
        batch_size: niches per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        precision: ``auto`` (bf16 autocast where the device computes it fast, else fp32; see
            :func:`msfm.runtime.precision.resolve_precision`), ``32``, ``bf16`` or ``16``; recorded in
            ``uns[key_added]["embed"]["precision"]``.
        progress: show a progress bar.
        copy: work on a copy of ``data`` instead of ``data`` itself.
        out: also write the result to this ``.h5ad`` (atomically; never over the input).
        overwrite: replace an existing ``out``.
        **read_options: how to read ``data`` (:class:`msfm.data.SpatialReadOptions`).

    Returns:
        The AnnData (``data`` itself unless ``copy=True`` or ``data`` was a path) with ``obsm['X_<key>']``
        (``[n_obs, d]`` float32), ``obs['<key>_n_neighbours']`` (neighbours each niche used; 0: an isolated cell,
        embedded from itself alone), ``obs['<key>_token']`` (meta-cell token) and ``uns[<key>]['embed']``.

    Raises:
        MsfmInputError: bad ``key_added``, ``max_cells`` < 1, bad data, an unknown keyword.
    """
    read = SpatialReadOptions.parse(
        read_options,
        verb_parameters=(
            "cells", "side_um", "max_cells", "key_added", "batch_size", "device", "precision", "copy", "out",
        ),
    )  # fmt: skip
    key = check_key_added(key_added)
    canonical_precision(precision)
    if max_cells < 1:
        msg = f"max_cells must be >= 1 (the centre cell); got {max_cells}."
        raise MsfmInputError(msg)
    target = check_output(out, overwrite=overwrite, data=data)
    adata = read_data(data, copy=copy)
    loaded = load(checkpoint, device=device)
    choice = resolve_precision(precision, loaded.device)
    model = generative_model(loaded, "embed")
    prep = spatial_cells(adata, loaded.vocab.genes, read)
    tokens = loaded.vocab.assign(prep.expr)
    centers = (
        np.flatnonzero(cell_selection(adata, cells, "cells")) if cells is not None else np.arange(adata.n_obs)
    )
    side = float(side_um or window_settings(loaded).side_um)
    seqs = niche_sequences(prep.xy, prep.section, centers, side_um=side, max_cells=max_cells)
    with autocast_context(loaded.device, choice.precision):
        hidden = niche_hidden(
            model, prep.xy, tokens, seqs, side_um=side, batch_size=batch_size, progress=progress
        )
    emb = np.full((adata.n_obs, hidden.shape[1]), np.nan, dtype=np.float32)
    emb[centers] = hidden
    n_nb = np.zeros(adata.n_obs, dtype=np.int64)
    n_nb[centers] = [len(s) - 1 for s in seqs]
    adata.obsm[obsm_key(key)] = emb
    adata.obs[field_key(key, "n_neighbours")] = n_nb
    adata.obs[field_key(key, "token")] = tokens
    store_uns(
        adata,
        key,
        "embed",
        {
            "side_um": side,
            "max_cells": max_cells,
            "n_embedded": int(centers.size),
            "checkpoint": str(loaded.path) if loaded.path else None,
            "gene_mapping": prep.mapping_report,
            "precision": choice.record(),
        },
    )
    if (n_nb[centers] == 0).any():
        logger.warning(
            "%d cells have no neighbour within %.0f µm; their niche embedding comes from the cell alone.",
            int((n_nb[centers] == 0).sum()),
            side / 2,
        )
    write_output(adata, target, data, replace=overwrite)
    return adata


def cluster_niches(
    data: AnnData,
    *,
    key_added: str = "gest",
    use_rep: str | None = None,
    method: Literal["kmeans", "leiden"] = "kmeans",
    n_clusters: int | None = None,
    resolution: float = 1.0,
    seed: int = 0,
    copy: bool = False,
) -> AnnData:
    """Cluster niche embeddings into ``obs['<key>_niche']`` (categorical).

    Args:
        data: with ``obsm[use_rep]`` (run :func:`embed` first).
        key_added: prefix: the embedding is read from ``obsm['X_<key>']`` (unless ``use_rep``), the clusters go
            to ``obs['<key>_niche']`` and the parameters to ``uns[<key>]['cluster_niches']``.
        use_rep: the embedding (default ``X_<key>``).
        method: ``kmeans`` (needs ``n_clusters``) or ``leiden`` (scanpy; ``resolution``).
        n_clusters: number of k-means clusters.
        resolution: Leiden resolution.
        seed: random state.
        copy: work on a copy of ``data``.

    Returns:
        The AnnData (``data`` itself unless ``copy=True``).

    Raises:
        MsfmInputError: missing embedding, NaN rows, or k-means without ``n_clusters``.
    """
    key = check_key_added(key_added)
    adata = data.copy() if copy else data
    rep = use_rep or obsm_key(key)
    if rep not in adata.obsm:
        msg = f"obsm[{rep!r}] is missing; run msfm.gest.embed first (obsm keys: {list(adata.obsm)})."
        raise MsfmInputError(msg)
    x = np.asarray(adata.obsm[rep], dtype=np.float32)
    if not np.isfinite(x).all():
        msg = f"obsm[{rep!r}] has NaN rows (cells not embedded); embed all cells before clustering."
        raise MsfmInputError(msg)
    if method == "kmeans":
        if not n_clusters or n_clusters < 2:
            msg = f"method='kmeans' needs n_clusters >= 2; got {n_clusters}."
            raise MsfmInputError(msg)
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    elif method == "leiden":
        import scanpy as sc

        tmp = AnnData(X=np.zeros((adata.n_obs, 1), np.float32))
        tmp.obsm["rep"] = x
        sc.pp.neighbors(tmp, use_rep="rep", random_state=seed)
        sc.tl.leiden(
            tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False
        )
        labels = tmp.obs["leiden"].astype(int).to_numpy()
    else:
        msg = f"method must be 'kmeans' or 'leiden'; got {method!r}."
        raise MsfmInputError(msg)
    adata.obs[field_key(key, "niche")] = pd.Categorical([str(v) for v in labels])
    store_uns(
        adata,
        key,
        "cluster_niches",
        {"method": method, "use_rep": rep, "n_clusters": len(set(labels.tolist())), "seed": seed},
    )
    return adata
