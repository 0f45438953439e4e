"""Gene-gene graphs for perturbation heads: co-expression from training cells, or a user's edge list (e.g. GO).

A graph is ``(edge_index [2, E] int64, edge_weight [E] float32)`` over positions in a gene list, the layout of
``torch_geometric`` (edges point from ``edge_index[0]`` to ``edge_index[1]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.errors import MsfmInputError

__all__ = ["coexpression_graph", "read_gene_graph"]

#: First-column names that mark a header row of an edge list.
_HEADER_WORDS = {"gene_a", "gene1", "source", "from", "gene"}


def coexpression_graph(
    expression: np.ndarray | sp.spmatrix, *, k: int = 20, threshold: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """Each gene's ``k`` most correlated genes (Pearson over cells, ``|r| >= threshold``), GEARS' recipe.

    Args:
        expression: ``[cells, genes]`` log-normalised expression of the training cells.
        k: neighbours kept per gene.
        threshold: smallest absolute correlation kept.

    Returns:
        ``(edge_index [2, E], edge_weight [E])``: edges neighbour -> gene, weight ``|r|``; no self-loops.

    Shape:
        expression ``[n, g]`` -> edge_index ``[2, E]``, edge_weight ``[E]`` with ``E <= g * k``.
    """
    x = expression.toarray() if sp.issparse(expression) else np.asarray(expression)
    x = x.astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        msg = f"coexpression_graph needs a [cells >= 2, genes] matrix; got shape {x.shape}."
        raise MsfmInputError(msg)
    x = x - x.mean(0)
    norm = np.sqrt((x**2).sum(0))
    # Constant genes correlate with nothing: their norm is 0, keep their row/column at 0 instead of NaN.
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    corr = np.abs(x.T @ x)
    np.fill_diagonal(corr, 0.0)
    g = corr.shape[0]
    kk = min(k, g - 1)
    if kk < 1:
        return np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.float32)
    nbr = np.argpartition(-corr, kk - 1, axis=1)[:, :kk]
    dst = np.repeat(np.arange(g), kk)
    src = nbr.ravel()
    w = corr[dst, src]
    keep = w >= threshold
    return np.stack([src[keep], dst[keep]]).astype(np.int64), w[keep].astype(np.float32)


def read_gene_graph(
    path: str | os.PathLike[str], genes: Sequence[str], *, min_edges: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Read an edge list (CSV/TSV, columns ``gene_a, gene_b[, weight]``) onto positions in ``genes``.

    A header row is optional (recognised when its third field is not a number). Edges are made symmetric;
    edges with a gene outside ``genes`` are dropped (a GO graph covers far more genes than a model has).

    Returns:
        ``(edge_index [2, E], edge_weight [E])``.

    Raises:
        MsfmInputError: the file is missing or unreadable, has fewer than 2 columns, a non-numeric weight, or
            fewer than ``min_edges`` edges between the model's genes.
    """
    p = Path(path)
    if not p.is_file():
        msg = f"Gene graph file {p} does not exist. Pass a CSV/TSV edge list with columns gene_a,gene_b[,weight]."
        raise MsfmInputError(msg)
    sep = "\t" if p.suffix.lower() in {".tsv", ".tab", ".txt"} else ","
    try:
        table = pd.read_csv(p, sep=sep, header=None, dtype=str, comment="#")
    except (ValueError, OSError, pd.errors.ParserError) as err:
        msg = f"Gene graph file {p} could not be read as a {'TSV' if sep == chr(9) else 'CSV'} edge list: {err}."
        raise MsfmInputError(msg) from err
    if table.shape[1] < 2:
        msg = f"Gene graph file {p} has {table.shape[1]} column(s); expected gene_a, gene_b[, weight]."
        raise MsfmInputError(msg)
    first = [str(v).strip().lower() for v in table.iloc[0, :3]] if len(table) else []
    numeric_weight = len(first) < 3 or not np.isnan(pd.to_numeric(first[2], errors="coerce"))
    if first and (first[0] in _HEADER_WORDS or not numeric_weight):
        table = table.iloc[1:]  # a header row
    weights = table[2] if table.shape[1] >= 3 else pd.Series(["1"] * len(table), index=table.index)
    w = pd.to_numeric(weights, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(w).any() or not np.isfinite(w).all():
        msg = f"Gene graph file {p} has non-numeric or infinite weights in column 3; use numbers (or 2 columns)."
        raise MsfmInputError(msg)
    index = {g: i for i, g in enumerate(genes)}
    a = np.array([index.get(str(x).strip(), -1) for x in table[0]], dtype=np.int64)
    b = np.array([index.get(str(x).strip(), -1) for x in table[1]], dtype=np.int64)
    keep = (a >= 0) & (b >= 0) & (a != b)
    if int(keep.sum()) < min_edges:
        msg = (
            f"Gene graph file {p} has {int(keep.sum())} edges between the model's {len(genes)} genes (of "
            f"{len(table)} rows); expected at least {min_edges}. Check that it uses the same gene symbols."
        )
        raise MsfmInputError(msg)
    src = np.concatenate([a[keep], b[keep]])
    dst = np.concatenate([b[keep], a[keep]])
    ww = np.concatenate([w[keep], w[keep]])
    # Duplicated edges (both directions listed in the file) keep their largest weight.
    frame = pd.DataFrame({"s": src, "d": dst, "w": ww}).groupby(["s", "d"], as_index=False)["w"].max()
    return np.stack([frame["s"].to_numpy(), frame["d"].to_numpy()]).astype(np.int64), frame["w"].to_numpy(
        dtype=np.float32
    )
