"""``gene_network``: gene-gene similarity graph, gene modules and their enrichment from scFoundation gene embeddings.

Follows the official ``genemodule`` analysis (reference section 7): the decoder's per-cell gene context embeddings
averaged over chosen cells, a kNN graph over genes, Leiden modules of at least 5 genes, then enrichment of the
modules against gene sets the user gives. The co-expression baseline (Pearson correlation of log-normalised
expression over the same cells and genes, same kNN + Leiden settings) runs in the same call.

The result is an AnnData over genes (``obs`` = genes); see :func:`gene_network` for every key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from msfm.data import GeneMapping, as_anndata, normalized_rows, prepare_cells
from msfm.data.gene_sets import GeneSetsLike, as_gene_sets
from msfm.errors import MsfmInputError
from msfm.eval.gene_modules import (
    ENRICHMENT_COLUMNS,
    GeneModules,
    check_knn_size,
    coexpression_modules,
    find_gene_modules,
    module_enrichment,
    restrict_gene_sets,
)
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.decoding import decode_batches
from msfm.models.scfoundation.gene_context import select_cells
from msfm.models.scfoundation.inference import Precision
from msfm.models.scfoundation.loading import CheckpointLike, backbone_of, load
from msfm.models.scfoundation.provenance import uns_record
from msfm.runtime.adata import check_key_added, field_key, obsm_key, store_uns
from msfm.runtime.atomic import atomic_write_text, check_output_free
from msfm.runtime.h5ad import write_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.tokenizers.gene_panel import TargetDepth

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDINGS", "enrichment_csv_path", "gene_network"]

Embedding = Literal["context", "input"]
#: The gene embeddings ``gene_network`` can use.
EMBEDDINGS = ("context", "input")
#: Genes must have counts in at least this many of the chosen cells to be a default (highly variable) gene.
MIN_CELLS = 3
#: Mean-expression bins of the dispersion normalisation (Seurat flavour).
N_BINS = 20


def enrichment_csv_path(out: str | os.PathLike[str]) -> Path:
    """Where ``out=`` puts the enrichment table: beside the ``.h5ad``, ``<stem>.enrichment.csv``."""
    p = Path(out)
    return p.with_name(p.stem + ".enrichment.csv")


def gene_network(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    genes: list[str] | None = None,
    cells: Any = None,
    embedding: Embedding = "context",
    n_top_genes: int = 2000,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    min_module_size: int = 5,
    gene_sets: GeneSetsLike | None = None,
    baseline: bool = True,
    key_added: str = "scfoundation",
    target_depth: str = "f1",
    batch_size: int = 4,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Gene modules from scFoundation gene embeddings, with their gene-set enrichment and a co-expression baseline.

    Returns a new AnnData over genes (``obs_names`` = panel gene symbols, no ``X``), with ``<key>`` = ``key_added``:

    * ``obsm["X_<key>"]``: the gene embeddings ``[genes, dim]``;
    * ``obsp["<key>_similarity"]``: cosine similarity on the edges of the symmetric kNN graph,
      ``obsp["<key>_connectivities"]``: 1.0 on those edges (the graph Leiden partitions);
    * ``obs["<key>_module"]``: module (categorical ``"0"``, ``"1"``, ... by size; NaN: in no module of at least
      ``min_module_size`` genes), ``obs["<key>_module_similarity"]``: mean cosine similarity to the other genes
      of the module (a confidence);
    * with ``baseline``: the same for co-expression, ``obs["<key>_coexpression_module"]``,
      ``obs["<key>_coexpression_module_similarity"]``, ``obsp["<key>_coexpression_similarity"]`` (Pearson);
    * ``uns[<key>]["gene_network"]``: parameters, checkpoint, gene mapping, module sizes and, with ``gene_sets``,
      ``"enrichment"``: a DataFrame (``method``, ``module``, ``gene_set``, ``overlap``, ``module_size``,
      ``set_size``, ``p_value``, ``fdr``, ``genes``), FDR per method over all its module x set pairs.

    When ``data`` is an AnnData, the per-gene results are also added to it, on the rows of ``var`` whose gene maps
    onto an analysed panel gene (other rows: NaN): ``var["<key>_module"]``, ``var["<key>_module_similarity"]``
    (and the ``coexpression`` columns), ``varm["X_<key>"]``, ``varp["<key>_similarity"]``,
    ``varp["<key>_connectivities"]`` and the same ``uns`` record.

    Args:
        data: cells x genes with raw counts, or a path to read.
        checkpoint: an scFoundation checkpoint.
        genes: genes to analyse: panel symbols, or the data's var names that map onto the panel (results are
            named by the panel symbol); default: the ``n_top_genes`` most variable panel genes of the chosen cells
            (Seurat-flavour normalised dispersion of log1p CP10k expression, genes with counts in >= 3 cells).
        cells: obs names, integer positions, a boolean mask, or ``{obs column: value or [values]}`` (e.g.
            ``{"cell_type": "B"}``; default: all cells); the context embeddings, the default genes and the
            baseline use these cells.
        embedding: ``"context"`` (decoder gene context embeddings averaged over the cells, as upstream) or
            ``"input"`` (rows of the backbone's gene embedding table, the same for every cell).
        n_top_genes: default genes (see ``genes``).
        n_neighbors: neighbours per gene in the kNN graph.
        resolution: Leiden resolution.
        min_module_size: smaller Leiden communities are not modules (upstream: 5).
        gene_sets: a GMT path or ``{name: [genes]}``; sets without any analysed gene are left out with a warning
            (an error when no set is left).
        baseline: also find co-expression modules (Pearson of log1p CP10k expression over the same cells).
        key_added: prefix of what is added.
        target_depth: T for the context embeddings; ``f1`` (T = S, the official GEARS setting) by default.
        batch_size: cells per decoder batch.
        device, precision, progress: as in ``embed``.
        seed: Leiden seed (same seed, same modules).
        out: also write the gene AnnData to this ``.h5ad`` and the enrichment table to
            ``<stem>.enrichment.csv`` beside it (both atomically).
        overwrite: replace existing outputs.
        **read_options: :class:`msfm.data.CellReadOptions`.

    Raises:
        MsfmInputError: an unknown ``embedding``; genes not in the panel (named) or repeated; fewer genes than
            ``n_neighbors + 1``; an empty cell selection; a gene-set file that is missing, empty, malformed or not
            UTF-8; gene sets that share no gene with the analysed genes; outputs that exist without ``overwrite``.
    """
    check_key_added(key_added)
    if embedding not in EMBEDDINGS:
        msg = (
            f"embedding must be one of {list(EMBEDDINGS)}; got {embedding!r}. 'context' averages the decoder's "
            "gene context embeddings over the cells, 'input' takes the backbone's gene embedding table."
        )
        raise MsfmInputError(msg)
    TargetDepth.parse(target_depth)
    canonical_precision(precision)
    options = parse_read_options(gene_network, read_options)
    sets = as_gene_sets(gene_sets) if gene_sets is not None else None
    if genes is not None:
        check_knn_size(len(genes), n_neighbors)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
        check_output_free(enrichment_csv_path(out), overwrite=overwrite)
    adata = as_anndata(data)
    loaded = backbone_of(load(checkpoint, device=device))
    choice = resolve_precision(precision, loaded.device)
    rows = np.sort(_cell_rows(adata, cells))
    if rows.size == 0:
        given = f"cells={dict(cells)!r}" if isinstance(cells, Mapping) else "cells="
        msg = (
            f"{given} selects no cell of the {adata.n_obs}; select at least one (obs names, positions, a boolean "
            "mask with a True, or {obs column: values} that some cells have)."
        )
        raise MsfmInputError(msg)
    if np.unique(rows).size != rows.size:
        msg = "cells= selects some cells more than once; pass each cell once."
        raise MsfmInputError(msg)
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    expression = normalized_rows(source, rows, mapping)  # [cells, panel] log1p CP10k, sparse
    names, idx, how = _choose_genes(loaded, mapping, expression, genes, n_top_genes)
    check_knn_size(len(names), n_neighbors)
    if sets is not None:
        sets = restrict_gene_sets(sets, names)
    settings = {
        "n_neighbors": n_neighbors,
        "resolution": resolution,
        "min_module_size": min_module_size,
        "seed": seed,
    }
    if embedding == "context":
        vectors = _mean_context(
            loaded,
            source,
            mapping,
            rows,
            idx,
            target_depth,
            batch_size,
            choice.precision,
            options.pre_normalized,
            progress,
        )
    else:
        vectors = _input_embeddings(loaded, idx)
    found = {embedding: find_gene_modules(vectors, names, **settings)}
    if baseline:
        sub = expression[:, idx]
        flat = np.flatnonzero(_column_variance(sub) == 0)
        if flat.size:
            logger.warning(
                "%d genes do not vary over the chosen cells (e.g. %s): their co-expression similarity is 0.",
                flat.size,
                [names[i] for i in flat[:5]],
            )
        found["coexpression"] = coexpression_modules(sub, names, **settings)
    result = AnnData(obs=pd.DataFrame(index=pd.Index(names, name="gene")))
    result.obsm[obsm_key(key_added)] = vectors.astype(np.float32)
    _store_modules(result, found, embedding, key_added)
    table = _enrichment(found, sets) if sets is not None else None
    params = {
        **settings,
        "embedding": embedding,
        "genes": how,
        "n_genes": len(names),
        "n_cells": int(rows.size),
        "n_top_genes": n_top_genes,
        "baseline": baseline,
        "target_depth": target_depth,
        "precision": precision,
        "key_added": key_added,
        "gene_sets": list(sets) if sets is not None else [],
        "pre_normalized": options.pre_normalized,
        "layer": options.layer,
    }
    record = uns_record(loaded, mapping, source.kind, params, choice)
    record["modules"] = {
        method: {"n_modules": res.n_modules, "sizes": res.sizes().tolist()} for method, res in found.items()
    }
    for target in (result, adata) if isinstance(data, AnnData) else (result,):
        store_uns(target, key_added, "gene_network", record)
        if table is not None:
            # A DataFrame in uns round-trips through .h5ad; to_uns would turn it into text.
            target.uns[key_added]["gene_network"]["enrichment"] = table.copy()
    if isinstance(data, AnnData):
        _annotate_input(adata, result, mapping, idx, found, embedding, key_added)
    if out is not None:
        write_output(result, out, data, replace=overwrite)
        frame = table if table is not None else pd.DataFrame(columns=["method", *ENRICHMENT_COLUMNS])
        atomic_write_text(enrichment_csv_path(out), frame.to_csv(index=False), replace=overwrite)
    return result


def _input_embeddings(loaded: Loaded, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of the backbone's gene (position) embedding table.

    Shape:
        ``[len(idx), encoder_dim]`` float32.
    """
    import torch

    weight = loaded.model.gene_embedding.weight.detach()
    return weight[torch.as_tensor(idx, dtype=torch.long, device=weight.device)].float().cpu().numpy()


def _cell_rows(adata: AnnData, cells: Any) -> np.ndarray:
    """Positions of the chosen cells; a mapping selects by obs columns (all conditions must hold)."""
    if not isinstance(cells, Mapping):
        return select_cells(adata, cells)
    mask = np.ones(adata.n_obs, dtype=bool)
    for column, wanted in cells.items():
        if column not in adata.obs.columns:
            msg = (
                f"cells= selects by obs column {column!r}, which the data does not have; "
                f"its obs columns are {list(adata.obs.columns)[:10]}."
            )
            raise MsfmInputError(msg)
        values = [wanted] if isinstance(wanted, str) or not isinstance(wanted, Iterable) else list(wanted)
        mask &= adata.obs[column].astype(str).isin([str(v) for v in values]).to_numpy()
    return np.flatnonzero(mask)


def _choose_genes(
    loaded: Loaded, mapping: GeneMapping, expression: sp.csr_matrix, genes: list[str] | None, n_top: int
) -> tuple[list[str], np.ndarray, str]:
    """Analysed genes: the caller's (panel symbols, or var names that map onto the panel) or the most variable."""
    symbols = list(loaded.vocab.symbols)
    if genes is not None:
        index = {s: i for i, s in enumerate(symbols)}
        # The data's own names (an alias, an Ensembl ID) count too; results are named by the panel symbol.
        via_var = {
            str(name): int(p) for name, p in zip(mapping.input_names, mapping.input_to_panel) if p >= 0
        }
        asked = [str(g) for g in genes]
        missing = [g for g in asked if g not in index and g not in via_var]
        if missing:
            msg = (
                f"{len(missing)} of the {len(asked)} requested genes are neither in the model's gene panel nor "
                f"data genes that map onto it: {missing[:10]}. Use the panel's symbols "
                "(msfm.scfoundation.load(ckpt).vocab.symbols) or the data's var names."
            )
            raise MsfmInputError(msg)
        idx = np.array([index[g] if g in index else via_var[g] for g in asked], dtype=np.int64)
        names = [symbols[i] for i in idx]
        dup = sorted({g for g in names if names.count(g) > 1})
        if dup:
            msg = (
                f"genes= names {dup[:5]} more than once (directly or through an alias); give each gene once."
            )
            raise MsfmInputError(msg)
        absent = np.flatnonzero(np.diff(expression[:, idx].tocsc().indptr) == 0)
        if absent.size:
            logger.warning(
                "%d requested genes have no counts in the chosen cells (e.g. %s); their context embedding is "
                "still defined, their co-expression is not.",
                absent.size,
                [names[i] for i in absent[:5]],
            )
        return names, idx, "given"
    if n_top < 2:
        msg = f"n_top_genes must be at least 2; got {n_top}."
        raise MsfmInputError(msg)
    idx = _highly_variable(expression, n_top)
    return [symbols[i] for i in idx], idx, f"top {len(idx)} highly variable panel genes (Seurat dispersion)"


def _column_variance(x: sp.csr_matrix) -> np.ndarray:
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    return np.maximum(sq - mean**2, 0.0)


def _highly_variable(expression: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Panel positions of the ``n_top`` most variable genes, in panel order.

    Seurat flavour: mean and variance of ``expm1`` of the log1p CP10k values, dispersion ``var / mean`` on a log
    scale, z-scored within 20 bins of log mean expression; genes with counts in fewer than 3 cells are left out.
    """
    counts = expression.tocsc()
    expressed = np.diff(counts.indptr) >= MIN_CELLS
    lin = counts.copy()
    lin.data = np.expm1(lin.data.astype(np.float64))
    mean = np.asarray(lin.mean(axis=0)).ravel()
    var = np.maximum(np.asarray(lin.multiply(lin).mean(axis=0)).ravel() - mean**2, 0.0) * (
        lin.shape[0] / max(lin.shape[0] - 1, 1)
    )
    keep = np.flatnonzero(expressed & (mean > 0))
    if keep.size < 2:
        msg = (
            f"Only {keep.size} panel genes have counts in at least {MIN_CELLS} of the chosen cells; "
            "choose more cells or pass genes=[...]."
        )
        raise MsfmInputError(msg)
    disp = np.log(np.maximum(var[keep], 1e-12) / mean[keep])
    bins = pd.cut(np.log1p(mean[keep]), N_BINS, labels=False)
    z = np.zeros(keep.size)
    for b in np.unique(bins):
        sel = bins == b
        sd = disp[sel].std(ddof=1) if sel.sum() > 1 else 0.0
        # A bin of one gene (or all equal) has no spread: its genes score 0, neither favoured nor dropped.
        z[sel] = (disp[sel] - disp[sel].mean()) / sd if sd > 0 else 0.0
    top = keep[np.argsort(-z, kind="stable")[: min(n_top, keep.size)]]
    return np.sort(top)


def _mean_context(
    loaded: Loaded,
    source: Any,
    mapping: GeneMapping,
    rows: np.ndarray,
    idx: np.ndarray,
    target_depth: str,
    batch_size: int,
    precision: Precision,
    pre_normalized: bool,
    progress: bool,
) -> np.ndarray:
    """Decoder context embeddings of the genes ``idx``, averaged over the cells ``rows`` (streamed).

    Shape:
        ``[len(idx), decoder_dim]`` float64; never ``[cells, genes, dim]`` in memory (one batch at a time).
    """
    total = np.zeros((idx.size, loaded.config.decoder_dim), dtype=np.float64)
    for _, z in decode_batches(
        loaded,
        source,
        mapping,
        target_depth=target_depth,
        batch_size=batch_size,
        precision=precision,
        pre_normalized=pre_normalized,
        head=False,
        progress=progress,
        desc="scFoundation gene network",
        rows=rows,
    ):
        total += z[:, idx].sum(axis=0, dtype=np.float64)
    return total / rows.size


def _module_column(modules: np.ndarray) -> pd.Categorical:
    n = int(modules.max()) + 1 if (modules >= 0).any() else 0
    labels = np.where(modules >= 0, modules.astype(str), None)
    return pd.Categorical(labels, categories=[str(i) for i in range(n)])


def _fields(method: str, embedding: str, key: str) -> tuple[str, str, str]:
    """obs column of the modules, of their similarity, and the obsp key of the similarity graph."""
    stem = key if method == embedding else f"{key}_{method}"
    return f"{stem}_module", f"{stem}_module_similarity", f"{stem}_similarity"


def _store_modules(result: AnnData, found: dict[str, GeneModules], embedding: str, key: str) -> None:
    for method, res in found.items():
        module_col, sim_col, graph = _fields(method, embedding, key)
        result.obs[module_col] = _module_column(res.modules)
        result.obs[sim_col] = res.module_similarity.astype(np.float32)
        result.obsp[graph] = res.similarity
    result.obsp[field_key(key, "connectivities")] = found[embedding].connectivities


def _enrichment(found: dict[str, GeneModules], sets: dict[str, tuple[str, ...]]) -> pd.DataFrame:
    parts = []
    for method, res in found.items():
        table = module_enrichment(res.genes, res.modules, sets)
        table.insert(0, "method", method)
        parts.append(table)
    table = pd.concat(parts, ignore_index=True)
    table["module"] = table["module"].astype(str)
    return table


def _annotate_input(
    adata: AnnData,
    result: AnnData,
    mapping: GeneMapping,
    idx: np.ndarray,
    found: dict[str, GeneModules],
    embedding: str,
    key: str,
) -> None:
    """Copy the per-gene results onto the caller's ``var`` rows that map to the analysed panel genes."""
    row_of_panel = {int(p): r for r, p in enumerate(idx)}
    target = np.array([row_of_panel.get(int(p), -1) for p in mapping.input_to_panel], dtype=np.int64)
    hit = np.flatnonzero(target >= 0)
    src = target[hit]
    emb = result.obsm[obsm_key(key)]
    varm = np.full((adata.n_vars, emb.shape[1]), np.nan, dtype=np.float32)
    varm[hit] = emb[src]
    adata.varm[obsm_key(key)] = varm
    for method in found:
        module_col, sim_col, graph = _fields(method, embedding, key)
        col = result.obs[module_col]
        values = np.full(adata.n_vars, None, dtype=object)
        values[hit] = col.to_numpy(dtype=object)[src]
        adata.var[module_col] = pd.Categorical(
            [None if pd.isna(v) else v for v in values], categories=col.cat.categories
        )
        sims = np.full(adata.n_vars, np.nan, dtype=np.float32)
        sims[hit] = result.obs[sim_col].to_numpy()[src]
        adata.var[sim_col] = sims
        if method == embedding:
            for name in (graph, field_key(key, "connectivities")):
                adata.varp[name] = _lift(result.obsp[name], hit, src, adata.n_vars)


def _lift(graph: sp.csr_matrix, hit: np.ndarray, src: np.ndarray, n: int) -> sp.csr_matrix:
    """A ``[genes, genes]`` graph on the caller's ``[n_vars, n_vars]`` rows (var row ``hit[i]`` = gene ``src[i]``)."""
    var_of_gene = np.full(graph.shape[0], -1, dtype=np.int64)
    var_of_gene[src] = hit
    coo = graph.tocoo()
    keep = (var_of_gene[coo.row] >= 0) & (var_of_gene[coo.col] >= 0)
    return sp.csr_matrix(
        (coo.data[keep], (var_of_gene[coo.row[keep]], var_of_gene[coo.col[keep]])), shape=(n, n)
    )
