"""Proof of GeST on real data: held-out generation against baselines, and niche clustering against labels.

* :func:`held_out_windows` marks square regions of a section as unseen (train with ``train_mask=~held_out``).
* :func:`evaluate_generation` generates the held-out cells from the rest with GeST (pick and weighted) and with the
  kNN-mean, MLP, Gaussian-process and global-mean baselines fitted on the same known cells, and scores all of
  them in the same run (RMSE over all genes and the top spatially variable genes, Spearman).
* :func:`evaluate_niches` clusters GeST niche embeddings and two baselines without GeST (expression PCA, and the
  PCA of expression averaged over each niche) and scores AMI/ARI against labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.errors import MsfmInputError
from msfm.eval.spatial import generation_metrics, niche_clustering_scores, spatially_variable_genes
from msfm.models.gest.api import (
    Checkpoint,
    cell_selection,
    embed,
    generate_arrays,
    prepare_cells,
    read_options,
)
from msfm.models.gest.baselines import fit_predict_baselines
from msfm.models.gest.checkpoint import load_model

logger = logging.getLogger(__name__)

__all__ = ["GenerationEvaluation", "evaluate_generation", "evaluate_niches", "held_out_windows"]


def held_out_windows(
    xy: np.ndarray,
    *,
    side_um: float,
    n_windows: int,
    seed: int = 0,
    section: np.ndarray | None = None,
    min_cells: int = 3,
    max_tries: int = 1000,
) -> np.ndarray:
    """Mark ``n_windows`` non-overlapping square regions (side ``side_um``) as held out.

    Windows are centred on random cells and placed only where they do not overlap an earlier window; each must
    hold at least ``min_cells`` cells. Deterministic given the seed.

    Returns:
        Boolean mask of held-out cells.

    Raises:
        MsfmInputError: when fewer than ``n_windows`` such windows fit.
    """
    rng = np.random.default_rng([seed, 3])
    section = np.zeros(len(xy), dtype=np.int64) if section is None else np.asarray(section)
    held = np.zeros(len(xy), dtype=bool)
    boxes: list[tuple[int, np.ndarray]] = []
    h = side_um / 2.0
    for _ in range(max_tries):
        if len(boxes) == n_windows:
            break
        c = int(rng.integers(len(xy)))
        centre = xy[c]
        if any(s == section[c] and np.all(np.abs(centre - other) < side_um) for s, other in boxes):
            continue
        inside = (section == section[c]) & np.all(np.abs(xy - centre) < h, axis=1)
        if inside.sum() < min_cells or (~held & (section == section[c])).sum() - inside.sum() < 2:
            continue
        boxes.append((int(section[c]), centre))
        held |= inside
    if len(boxes) < n_windows:
        msg = (
            f"Only {len(boxes)} non-overlapping {side_um:.0f} µm windows with >= {min_cells} cells fit "
            f"({n_windows} asked); use fewer or smaller windows."
        )
        raise MsfmInputError(msg)
    return held


@dataclass
class GenerationEvaluation:
    """Scores and predictions of one held-out evaluation.

    Attributes:
        table: one row per method (``gest_pick``, ``gest_weighted``, baselines), metric columns.
        predictions: ``{method: [m, T]}`` at the held-out cells.
        truth: ``[m, T]`` held-out expression (model space).
        xy: ``[m, 2]`` held-out positions (µm).
        genes: the model's genes.
        top_genes: indices of the top spatially variable genes used for ``rmse_top``.
    """

    table: pd.DataFrame
    predictions: dict[str, np.ndarray]
    truth: np.ndarray
    xy: np.ndarray
    genes: list[str]
    top_genes: np.ndarray


def evaluate_generation(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    held_out: Any,
    baselines: tuple[str, ...] = ("mean", "knn", "mlp", "gp"),
    modes: tuple[str, ...] = ("pick", "weighted"),
    n_top_genes: int = 200,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    layer: str | None = None,
    pre_normalized: bool = False,
    spatial_key: str = "spatial",
    scale: float | None = None,
    section_key: str | None = None,
) -> GenerationEvaluation:
    """Generate the held-out cells with GeST and the baselines from the same known cells, and score them.

    Args:
        adata: all cells; those in ``held_out`` must not have been seen in training.
        checkpoint: the GeST checkpoint.
        held_out: cells to generate (mask, obs column, names, positions).
        baselines: baselines among ``mean``, ``knn``, ``mlp``, ``gp``.
        modes: GeST output modes among ``pick``, ``weighted``, ``sample``.
        n_top_genes: top spatially variable genes (Moran's I on the known cells) for ``rmse_top``.
        seed: seed of GeST serialisation/sampling and of the baselines.
        batch_size, device: inference settings.
        layer, pre_normalized, spatial_key, scale, section_key: how to read ``adata``.

    Returns:
        The scores, predictions and truth.
    """
    loaded = load_model(checkpoint, device=device)
    cells = prepare_cells(
        loaded, adata, read_options(layer, pre_normalized, spatial_key, scale, section_key, "error")
    )
    mask = cell_selection(adata, held_out, "held_out")
    if not mask.any() or mask.all():
        msg = f"held_out selects {int(mask.sum())} of {adata.n_obs} cells; need some held-out and some known cells."
        raise MsfmInputError(msg)
    known = ~mask
    expr = cells.dense()
    truth = expr[mask]
    k_tokens = loaded.vocab.assign(expr[known])
    preds: dict[str, np.ndarray] = {}
    for mode in modes:
        res, _ = generate_arrays(
            loaded,
            cells.xy[known],
            k_tokens,
            cells.xy[mask],
            known_section=cells.section[known],
            query_section=cells.section[mask],
            mode=mode,  # type: ignore[arg-type]
            seed=seed,
            batch_size=batch_size,
        )
        preds[f"gest_{mode}"] = res["expr"]
    if len(np.unique(cells.section)) > 1 and baselines:
        logger.info("baselines are fitted on all known cells' absolute coordinates per section")
    for name in baselines:
        pred = np.zeros_like(truth)
        for s in np.unique(cells.section[mask]):
            k_s = known & (cells.section == s)
            q_s = mask[mask] & (cells.section[mask] == s)
            out = fit_predict_baselines(
                cells.xy[k_s], expr[k_s], cells.xy[mask][q_s], names=(name,), seed=seed
            )
            pred[q_s] = out[name]
        preds[name] = pred
    n_top = min(n_top_genes, expr.shape[1])
    top = spatially_variable_genes(expr[known], cells.xy[known], n_top=n_top)
    rows = {}
    for name, pred in preds.items():
        rows[name] = generation_metrics(pred, truth, top_genes=top)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return GenerationEvaluation(
        table=table,
        predictions=preds,
        truth=truth,
        xy=cells.xy[mask],
        genes=list(loaded.vocab.genes),
        top_genes=np.asarray(top),
    )


def evaluate_niches(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    label_key: str,
    n_clusters: int | None = None,
    method: str = "kmeans",
    seed: int = 0,
    n_pcs: int = 30,
    side_um: float | None = None,
    max_cells: int = 256,
    device: str = "auto",
    layer: str | None = None,
    pre_normalized: bool = False,
    spatial_key: str = "spatial",
    scale: float | None = None,
    section_key: str | None = None,
) -> pd.DataFrame:
    """AMI/ARI of niche clusters against ``obs[label_key]``: GeST embeddings vs two baselines without GeST.

    Baselines: ``expression_pca`` (each cell's own expression, the paper's "raw expression" row) and
    ``niche_mean_pca`` (expression averaged over the same niche window GeST sees).

    Returns:
        One row per representation with ``ami``, ``ari``, ``n_clusters``, ``method``.
    """
    if label_key not in adata.obs:
        msg = f"label_key={label_key!r} is not an obs column; columns are {list(adata.obs.columns)[:20]}."
        raise MsfmInputError(msg)
    from sklearn.decomposition import PCA

    from msfm.models.gest.api import niche_sequences

    read = read_options(layer, pre_normalized, spatial_key, scale, section_key, "error")
    loaded = load_model(checkpoint, device=device)
    work = adata.copy()
    embed(work, loaded, side_um=side_um, max_cells=max_cells, device=device, **read)
    labels = adata.obs[label_key].to_numpy()
    cells = prepare_cells(loaded, adata, read)
    expr = cells.dense()
    k = min(n_pcs, expr.shape[0] - 1, expr.shape[1])
    own = PCA(n_components=k, random_state=seed).fit_transform(expr)
    seqs = niche_sequences(
        cells.xy,
        cells.section,
        np.arange(adata.n_obs),
        side_um=float(side_um or loaded.side_um),
        max_cells=max_cells,
    )
    niche_mean = np.stack([expr[s].mean(axis=0) for s in seqs])
    niche = PCA(n_components=k, random_state=seed).fit_transform(niche_mean)
    reps = {"gest": work.obsm["X_gest"], "expression_pca": own, "niche_mean_pca": niche}
    rows = {}
    for name, rep in reps.items():
        rows[name] = niche_clustering_scores(rep, labels, n_clusters=n_clusters, method=method, seed=seed)  # type: ignore[arg-type]
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "representation"
    return table
