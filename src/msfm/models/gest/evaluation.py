"""Proof of GeST on real data: held-out generation against baselines, and niche clustering against labels.

* :func:`held_out_windows` marks square regions of a section as unseen (train with ``train_mask=~held_out``).
* :func:`evaluate` generates the held-out cells from the rest with GeST (pick and weighted) and with the
  kNN-mean, MLP, Gaussian-process and global-mean baselines fitted on the same known cells, and scores all of
  them in the same run (RMSE over all genes and the top spatially variable genes, Spearman); with
  ``labels_key`` it also scores niche clustering (:func:`evaluate_niches`).
* :func:`evaluate_niches` clusters GeST niche embeddings and two baselines without GeST (expression PCA, and the
  PCA of expression averaged over each niche) and scores AMI/ARI against labels.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.errors import MsfmInputError
from msfm.eval.spatial import generation_metrics, niche_clustering_scores, spatially_variable_genes
from msfm.models.gest.baselines import fit_predict_baselines
from msfm.models.gest.checkpoint import CheckpointLike, generative_model, load, window_settings
from msfm.models.gest.data import cell_selection, spatial_cells
from msfm.models.gest.files import DataLike, read_data
from msfm.models.gest.generation import generate_arrays
from msfm.models.gest.niches import niche_hidden, niche_sequences
from msfm.models.gest.options import GenerationOptions, split_options
from msfm.runtime.atomic import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_free,
)
from msfm.runtime.deprecation import warn_deprecated
from msfm.runtime.h5ad import check_output
from msfm.runtime.jsonable import to_jsonable
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import Result

logger = logging.getLogger(__name__)

__all__ = ["GenerationEvaluation", "evaluate", "evaluate_niches", "held_out_windows"]


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


@dataclasses.dataclass(frozen=True)
class GenerationEvaluation(Result):
    """Scores and predictions of one held-out evaluation (what :func:`evaluate` returns).

    Attributes:
        table: one row per method (``gest_pick``, ``gest_weighted``, baselines), metric columns.
        predictions: ``{method: [m, T]}`` at the held-out cells.
        truth: ``[m, T]`` held-out expression (model space).
        xy: ``[m, 2]`` held-out positions (µm).
        genes: the model's genes.
        top_genes: indices of the top spatially variable genes used for ``rmse_top``.
        niches: AMI/ARI of niche clustering per representation (with ``labels_key``; else None).
        params: the call's parameters.
    """

    table: pd.DataFrame
    predictions: dict[str, np.ndarray]
    truth: np.ndarray
    xy: np.ndarray
    genes: list[str]
    top_genes: np.ndarray
    niches: pd.DataFrame | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the folder ``path`` atomically.

        Files: ``generation.csv`` (the table), ``niches.csv`` (with niche scores), ``predictions.npz`` (one array
        per method, plus ``truth``, ``xy`` and ``top_genes``) and ``result.json`` (genes, parameters).

        Raises:
            MsfmInputError: ``path`` exists and ``overwrite`` is False.
        """
        target = check_output_free(path, overwrite=overwrite)
        with atomic_dir(target) as tmp:
            atomic_write_text(tmp / "generation.csv", self.table.to_csv())
            if self.niches is not None:
                atomic_write_text(tmp / "niches.csv", self.niches.to_csv())
            buf = io.BytesIO()
            arrays = {**self.predictions, "truth": self.truth, "xy": self.xy, "top_genes": self.top_genes}
            np.savez_compressed(buf, **arrays)
            atomic_write_bytes(tmp / "predictions.npz", buf.getvalue())
            record = {"type": type(self).__name__, "genes": self.genes, "params": self.params}
            atomic_write_json(tmp / "result.json", to_jsonable(record))
        return target


def evaluate(
    data: DataLike,
    checkpoint: CheckpointLike,
    *,
    held_out: Any,
    baselines: tuple[str, ...] = ("mean", "knn", "mlp", "gp"),
    modes: tuple[str, ...] = ("pick", "weighted"),
    n_top_genes: int = 200,
    labels_key: str | None = None,
    n_clusters: int | None = None,
    max_cells: int = 256,
    generation: GenerationOptions | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> GenerationEvaluation:
    """Generate the held-out cells with GeST and the baselines from the same known cells, and score them.

    Args:
        data: all cells (AnnData, file or Visium folder); those in ``held_out`` must not have been seen in training.
        checkpoint: the GeST checkpoint.
        held_out: cells to generate (mask, boolean obs column, names, positions).
        baselines: baselines among ``mean``, ``knn``, ``mlp``, ``gp``.
        modes: GeST output modes among ``pick``, ``weighted``, ``sample``.
        n_top_genes: top spatially variable genes (Moran's I on the known cells) for ``rmse_top``.
        labels_key: ``obs`` column of niche labels: also score niche clustering (:func:`evaluate_niches`).
        n_clusters: clusters of the niche scores (default: the number of labels).
        max_cells: cells per niche sequence of the niche scores.
        generation: :class:`~msfm.models.gest.options.GenerationOptions` (its ``mode`` is ignored: see
            ``modes``); ``temperature``, ``side_um``, ``tile_um``, ``max_context``, ``use_cache`` may also be
            given as keyword arguments.
        seed: seed of GeST serialisation/sampling and of the baselines.
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show progress bars.
        out: also save the result to this folder (:meth:`GenerationEvaluation.save`).
        overwrite: replace an existing ``out``.
        **options: generation options (above) and reading options (:class:`msfm.data.SpatialReadOptions`).

    Returns:
        The scores, predictions and truth (and the niche scores with ``labels_key``).

    Raises:
        MsfmInputError: an empty or full ``held_out``, unknown baselines or modes, a missing label column.
    """
    gen_keys = [k for k in GenerationOptions.model_fields if k != "mode"]
    gen, read = split_options(
        options,
        verb_parameters=("held_out", "baselines", "modes", "n_top_genes", "labels_key", "generation", "seed"),
        generation=generation,
        generation_keys=gen_keys,
    )
    bad = sorted(set(baselines) - {"mean", "knn", "mlp", "gp"})
    if bad:
        msg = f"baselines {bad} are unknown; choose among mean, knn, mlp, gp."
        raise MsfmInputError(msg)
    bad = sorted(set(modes) - {"pick", "weighted", "sample"})
    if bad or not modes:
        msg = f"modes {list(modes)} must be a non-empty subset of pick, weighted, sample."
        raise MsfmInputError(msg)
    target = check_output(out, overwrite=overwrite, data=data)
    adata = read_data(data)
    if labels_key is not None and labels_key not in adata.obs:
        msg = f"labels_key={labels_key!r} is not an obs column; columns are {list(adata.obs.columns)[:30]}."
        raise MsfmInputError(msg)
    loaded = load(checkpoint, device=device)
    generative_model(loaded, "evaluate")
    cells = spatial_cells(adata, loaded.vocab.genes, read)
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
            generation=gen.model_copy(update={"mode": mode}),
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        preds[f"gest_{mode}"] = res["expr"]
    if len(np.unique(cells.section)) > 1 and baselines:
        logger.info("baselines are fitted on all known cells' absolute coordinates per section")
    for name in baselines:
        pred = np.zeros_like(truth)
        for s in np.unique(cells.section[mask]):
            k_s = known & (cells.section == s)
            q_s = mask[mask] & (cells.section[mask] == s)
            fitted = fit_predict_baselines(
                cells.xy[k_s], expr[k_s], cells.xy[mask][q_s], names=(name,), seed=seed
            )
            pred[q_s] = fitted[name]
        preds[name] = pred
    n_top = min(n_top_genes, expr.shape[1])
    top = spatially_variable_genes(expr[known], cells.xy[known], n_top=n_top)
    rows = {name: generation_metrics(pred, truth, top_genes=top) for name, pred in preds.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    niches = None
    if labels_key is not None:
        niches = _niche_scores(
            adata, loaded, cells, labels_key, n_clusters=n_clusters, max_cells=max_cells, seed=seed
        )
    params = {
        "n_held_out": int(mask.sum()),
        "baselines": list(baselines),
        "modes": list(modes),
        "n_top_genes": n_top,
        "labels_key": labels_key,
        "generation": gen.model_dump(),
        "seed": seed,
        "checkpoint": str(loaded.path) if loaded.path else None,
    }
    result = GenerationEvaluation(
        table=table,
        predictions=preds,
        truth=truth,
        xy=cells.xy[mask],
        genes=list(loaded.vocab.genes),
        top_genes=np.asarray(top),
        niches=niches,
        params=params,
    )
    if target is not None:
        result.save(target, overwrite=overwrite)
    return result


def _niche_scores(
    adata: AnnData,
    loaded: Loaded,
    cells: Any,
    labels_key: str,
    *,
    n_clusters: int | None,
    method: str = "kmeans",
    seed: int = 0,
    n_pcs: int = 30,
    side_um: float | None = None,
    max_cells: int = 256,
    batch_size: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    from sklearn.decomposition import PCA

    model = generative_model(loaded, "evaluate_niches")
    side = float(side_um or window_settings(loaded).side_um)
    seqs = niche_sequences(cells.xy, cells.section, np.arange(adata.n_obs), side_um=side, max_cells=max_cells)
    tokens = loaded.vocab.assign(cells.expr)
    gest = niche_hidden(model, cells.xy, tokens, seqs, side_um=side, batch_size=batch_size, progress=progress)
    expr = cells.dense()
    k = min(n_pcs, expr.shape[0] - 1, expr.shape[1])
    own = PCA(n_components=k, random_state=seed).fit_transform(expr)
    niche_mean = np.stack([expr[s].mean(axis=0) for s in seqs])
    niche = PCA(n_components=k, random_state=seed).fit_transform(niche_mean)
    labels = adata.obs[labels_key].to_numpy()
    reps = {"gest": gest, "expression_pca": own, "niche_mean_pca": niche}
    rows = {
        name: niche_clustering_scores(rep, labels, n_clusters=n_clusters, method=method, seed=seed)  # type: ignore[arg-type]
        for name, rep in reps.items()
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "representation"
    return table


def evaluate_niches(
    data: DataLike,
    checkpoint: CheckpointLike,
    *,
    labels_key: str | None = None,
    n_clusters: int | None = None,
    method: str = "kmeans",
    seed: int = 0,
    n_pcs: int = 30,
    side_um: float | None = None,
    max_cells: int = 256,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
    **read_options: Any,
) -> pd.DataFrame:
    """AMI/ARI of niche clusters against ``obs[labels_key]``: GeST embeddings vs two baselines without GeST.

    Baselines: ``expression_pca`` (each cell's own expression, the paper's "raw expression" row) and
    ``niche_mean_pca`` (expression averaged over the same niche window GeST sees).

    Args:
        data: cells with coordinates, expression and the labels (AnnData, file or Visium folder).
        checkpoint: the GeST checkpoint.
        labels_key: ``obs`` column of the niche labels.
        n_clusters: clusters to find (default: the number of labels).
        method: ``kmeans`` or ``leiden``.
        seed: seed of the clustering and the PCAs.
        n_pcs: PCA dimensions of the two baselines.
        side_um: niche window side (default: the trained side).
        max_cells: cells per niche sequence.
        batch_size: niches per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show a progress bar.
        **read_options: how to read ``data`` (:class:`msfm.data.SpatialReadOptions`).

    Returns:
        One row per representation with ``ami``, ``ari``, ``n_clusters``, ``method``.
    """
    from msfm.data.options import SpatialReadOptions

    if "label_key" in read_options:
        warn_deprecated("evaluate_niches(label_key=...)", "evaluate_niches(labels_key=...)")
        labels_key = labels_key or read_options.pop("label_key")
    read = SpatialReadOptions.parse(
        read_options, verb_parameters=("labels_key", "n_clusters", "method", "side_um", "max_cells", "n_pcs")
    )
    adata = read_data(data)
    if labels_key is None or labels_key not in adata.obs:
        msg = f"labels_key={labels_key!r} is not an obs column; columns are {list(adata.obs.columns)[:20]}."
        raise MsfmInputError(msg)
    loaded = load(checkpoint, device=device)
    cells = spatial_cells(adata, loaded.vocab.genes, read)
    return _niche_scores(
        adata,
        loaded,
        cells,
        labels_key,
        n_clusters=n_clusters,
        method=method,
        seed=seed,
        n_pcs=n_pcs,
        side_um=side_um,
        max_cells=max_cells,
        batch_size=batch_size,
        progress=progress,
    )
