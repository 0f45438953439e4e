"""Gene modules from gene vectors: cosine kNN graph, Leiden modules, enrichment against gene sets, co-module scores.

Family-agnostic and array-based: a gene is a vector (a model's gene embedding, or its expression across cells for
the co-expression baseline, where centring turns the cosine into Pearson's correlation).

* :func:`find_gene_modules`: cosine similarity -> symmetric kNN graph (the union of every gene's ``n_neighbors``
  most similar genes) -> Leiden (RB configuration, unweighted edges, seeded) -> modules of at least
  ``min_module_size`` genes, numbered by size (0 = largest); genes of smaller communities are unassigned (-1).
* :func:`coexpression_modules`: the baseline; Pearson correlation of log-normalised expression, same pipeline.
* :func:`module_enrichment`: every module against every gene set, one-sided hypergeometric test over the analysed
  genes (the universe), Benjamini-Hochberg over all module x set pairs.
* :func:`co_module_score` / :func:`gene_set_cohesion`: does one gene set fall in one module?
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.errors import MsfmInputError
from msfm.eval.spatial import benjamini_hochberg

logger = logging.getLogger(__name__)

__all__ = [
    "ENRICHMENT_COLUMNS",
    "check_knn_size",
    "GeneModules",
    "co_module_score",
    "coexpression_modules",
    "cosine_knn",
    "find_gene_modules",
    "gene_set_cohesion",
    "module_enrichment",
    "restrict_gene_sets",
]

#: Columns of :func:`module_enrichment`'s table.
ENRICHMENT_COLUMNS = (
    "module",
    "gene_set",
    "overlap",
    "module_size",
    "set_size",
    "p_value",
    "fdr",
    "genes",
)


@dataclasses.dataclass(frozen=True, eq=False)
class GeneModules:
    """Modules of genes and the graph they were found on.

    Attributes:
        genes: gene names, one per row of the inputs.
        modules: ``[genes]`` int64 module of each gene (0 = largest module), ``-1`` where its Leiden community was
            smaller than ``min_module_size``.
        module_similarity: ``[genes]`` mean cosine similarity of a gene to the other genes of its module (NaN when
            unassigned): how firmly it belongs.
        similarity: ``[genes, genes]`` CSR, cosine similarity on the edges of the symmetric kNN graph.
        connectivities: ``[genes, genes]`` CSR, 1.0 on the same edges (the graph Leiden partitions).
        params: ``n_neighbors``, ``resolution``, ``min_module_size``, ``seed``, ``center``.
    """

    genes: tuple[str, ...]
    modules: np.ndarray
    module_similarity: np.ndarray
    similarity: sp.csr_matrix
    connectivities: sp.csr_matrix
    params: dict[str, Any]

    @property
    def n_modules(self) -> int:
        """Number of modules (unassigned genes excluded)."""
        return int(self.modules.max()) + 1 if (self.modules >= 0).any() else 0

    def sizes(self) -> np.ndarray:
        """``[n_modules]`` genes per module."""
        return np.bincount(self.modules[self.modules >= 0], minlength=self.n_modules)


def _unit_rows(vectors: Any, *, center: bool) -> np.ndarray:
    x = np.asarray(vectors.toarray() if sp.issparse(vectors) else vectors, dtype=np.float64)
    if x.ndim != 2:
        msg = f"Gene vectors must be a 2-D array [genes, features]; got shape {x.shape}."
        raise MsfmInputError(msg)
    if not np.isfinite(x).all():
        msg = "Gene vectors contain NaN or infinite values; drop or fix those genes first."
        raise MsfmInputError(msg)
    if center:
        x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # A constant gene (zero norm) has no direction: similarity 0 to every other gene.
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def check_knn_size(n_genes: int, n_neighbors: int) -> None:
    """Raise when ``n_genes`` is too few for a kNN graph with ``n_neighbors`` (checked before any compute)."""
    if n_neighbors < 1:
        msg = f"n_neighbors must be at least 1; got {n_neighbors}."
        raise MsfmInputError(msg)
    if n_genes < n_neighbors + 1:
        msg = (
            f"Got {n_genes} genes, but a kNN graph with n_neighbors={n_neighbors} needs at least "
            f"{n_neighbors + 1}. Pass more genes or a smaller n_neighbors."
        )
        raise MsfmInputError(msg)


def cosine_knn(
    vectors: Any, n_neighbors: int = 15, *, center: bool = False, chunk: int = 1024
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Symmetric kNN graph of genes under cosine similarity, without a dense ``[genes, genes]`` matrix.

    Args:
        vectors: ``[genes, features]``; rows are genes.
        n_neighbors: most similar other genes kept per gene; an edge is kept when either end chose it.
        center: subtract each row's mean first (cosine of centred rows = Pearson correlation).
        chunk: genes per block of the similarity computation (memory ``chunk x genes``).

    Returns:
        ``(similarity, connectivities)``: CSR ``[genes, genes]``, the cosine similarity on the edges and 1.0 on
        the edges.

    Raises:
        MsfmInputError: fewer than ``n_neighbors + 1`` genes, non-finite values, not 2-D.

    Shape:
        vectors: ``[n, d]`` -> two ``[n, n]`` sparse matrices with at least ``n * n_neighbors`` / 2 edges.
    """
    x = _unit_rows(vectors, center=center)
    n = x.shape[0]
    check_knn_size(n, n_neighbors)
    rows, cols = [], []
    for start in range(0, n, chunk):
        block = x[start : start + chunk] @ x.T
        idx = np.arange(block.shape[0])
        block[idx, start + idx] = -np.inf  # a gene is not its own neighbour
        # Stable full sort (not argpartition) so ties break by gene order, the same on every run.
        top = np.argsort(-block, axis=1, kind="stable")[:, :n_neighbors]
        rows.append(np.repeat(start + idx, n_neighbors))
        cols.append(top.reshape(-1))
    r, c = np.concatenate(rows), np.concatenate(cols)
    directed = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(n, n))
    conn = directed.maximum(directed.T).tocsr()
    conn.sort_indices()
    coo = conn.tocoo()
    sims = np.einsum("ij,ij->i", x[coo.row], x[coo.col])
    similarity = sp.csr_matrix(
        (sims.astype(np.float32), conn.indices.copy(), conn.indptr.copy()), shape=(n, n)
    )
    connectivities = sp.csr_matrix(
        (np.ones(conn.nnz, dtype=np.float32), conn.indices.copy(), conn.indptr.copy()), shape=(n, n)
    )
    return similarity, connectivities


def _leiden(connectivities: sp.csr_matrix, resolution: float, seed: int) -> np.ndarray:
    import igraph
    import leidenalg

    upper = sp.triu(connectivities, k=1).tocoo()
    graph = igraph.Graph(n=connectivities.shape[0], edges=list(zip(upper.row.tolist(), upper.col.tolist())))
    part = leidenalg.find_partition(
        graph,
        leidenalg.RBConfigurationVertexPartition,
        resolution_parameter=resolution,
        seed=seed,
        n_iterations=-1,  # iterate until no move improves the partition: independent of a step budget
    )
    return np.asarray(part.membership, dtype=np.int64)


def _relabel(communities: np.ndarray, min_size: int) -> np.ndarray:
    """Communities of at least ``min_size`` genes numbered by size (ties: first gene), the rest ``-1``."""
    labels, first, counts = np.unique(communities, return_index=True, return_counts=True)
    order = sorted(range(labels.size), key=lambda i: (-counts[i], first[i]))
    new = {labels[i]: k for k, i in enumerate(j for j in order if counts[j] >= min_size)}
    return np.array([new.get(c, -1) for c in communities], dtype=np.int64)


def _module_similarity(x: np.ndarray, modules: np.ndarray) -> np.ndarray:
    out = np.full(modules.size, np.nan)
    for m in np.unique(modules[modules >= 0]):
        idx = np.flatnonzero(modules == m)
        sims = x[idx] @ x[idx].T
        out[idx] = (sims.sum(axis=1) - np.diag(sims)) / max(idx.size - 1, 1)
    return out


def find_gene_modules(
    vectors: Any,
    genes: Sequence[str],
    *,
    center: bool = False,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    min_module_size: int = 5,
    seed: int = 0,
) -> GeneModules:
    """Gene modules: Leiden communities of the cosine kNN graph of the gene vectors.

    Args:
        vectors: ``[genes, features]`` one vector per gene.
        genes: names, one per row.
        center: Pearson instead of cosine (see :func:`cosine_knn`).
        n_neighbors: neighbours per gene in the kNN graph.
        resolution: Leiden resolution (higher: more, smaller modules).
        min_module_size: smaller communities are left unassigned (``-1``); upstream keeps modules of >= 5 genes.
        seed: Leiden seed; the same seed gives the same modules.

    Raises:
        MsfmInputError: names and rows differ in number, repeated names, too few genes, bad parameters.

    Shape:
        vectors: ``[n, d]`` -> ``GeneModules`` over ``n`` genes.
    """
    names = tuple(str(g) for g in genes)
    x = _unit_rows(vectors, center=center)
    if len(names) != x.shape[0]:
        msg = f"genes has {len(names)} names but the vectors have {x.shape[0]} rows; give one name per row."
        raise MsfmInputError(msg)
    if len(set(names)) != len(names):
        dup = sorted({g for g in names if names.count(g) > 1})[:5]
        msg = f"genes repeats names, e.g. {dup}; give each gene once."
        raise MsfmInputError(msg)
    if not resolution > 0:
        msg = f"resolution must be > 0; got {resolution}."
        raise MsfmInputError(msg)
    if min_module_size < 1:
        msg = f"min_module_size must be at least 1; got {min_module_size}."
        raise MsfmInputError(msg)
    similarity, connectivities = cosine_knn(x, n_neighbors)
    modules = _relabel(_leiden(connectivities, float(resolution), int(seed)), int(min_module_size))
    params = {
        "n_neighbors": int(n_neighbors),
        "resolution": float(resolution),
        "min_module_size": int(min_module_size),
        "seed": int(seed),
        "center": bool(center),
    }
    return GeneModules(names, modules, _module_similarity(x, modules), similarity, connectivities, params)


def coexpression_modules(expression: Any, genes: Sequence[str], **kwargs: Any) -> GeneModules:
    """The co-expression baseline: Pearson correlation of genes across cells, then :func:`find_gene_modules`.

    Args:
        expression: ``[cells, genes]`` log-normalised expression (dense or sparse).
        genes: names of the columns.
        **kwargs: ``n_neighbors``, ``resolution``, ``min_module_size``, ``seed``.

    Shape:
        expression: ``[c, n]`` -> ``GeneModules`` over ``n`` genes.
    """
    x = expression.toarray() if sp.issparse(expression) else np.asarray(expression)
    return find_gene_modules(np.asarray(x, dtype=np.float64).T, genes, center=True, **kwargs)


def restrict_gene_sets(
    gene_sets: Mapping[str, Sequence[str]], universe: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """The gene sets cut down to the analysed genes; sets without any analysed gene are dropped with a warning.

    Raises:
        MsfmInputError: no set shares a gene with ``universe``.
    """
    known = set(universe)
    kept = {name: tuple(g for g in genes if g in known) for name, genes in gene_sets.items()}
    empty = [name for name, genes in kept.items() if not genes]
    if len(empty) == len(kept):
        sample = next(iter(gene_sets.values()))
        msg = (
            f"None of the {len(kept)} gene set(s) shares a gene with the {len(known)} analysed genes "
            f"(e.g. set {next(iter(gene_sets))!r} has {list(sample)[:3]}; analysed: {list(universe)[:3]}). "
            "Use the same gene symbols as the model's panel, or analyse the genes of the sets (genes=...)."
        )
        raise MsfmInputError(msg)
    if empty:
        logger.warning(
            "%d gene set(s) share no gene with the %d analysed genes and are left out: %s",
            len(empty),
            len(known),
            empty[:10],
        )
    return {name: genes for name, genes in kept.items() if genes}


def _hypergeom_sf(
    overlap: np.ndarray, universe: int, set_size: np.ndarray, module_size: np.ndarray
) -> np.ndarray:
    from scipy.stats import hypergeom

    # P(X >= overlap): X = set genes among module_size genes drawn from the universe.
    return hypergeom.sf(overlap - 1, universe, set_size, module_size)


def module_enrichment(
    genes: Sequence[str], modules: Any, gene_sets: Mapping[str, Sequence[str]]
) -> pd.DataFrame:
    """Every module against every gene set: one-sided hypergeometric test, Benjamini-Hochberg FDR.

    The universe is ``genes`` (every analysed gene, assigned or not); a set counts only its genes in the universe
    (``set_size``). The FDR is taken over all module x set pairs, the table keeps the pairs that share a gene,
    sorted by p-value.

    Args:
        genes: analysed gene names.
        modules: ``[genes]`` module per gene (``-1`` or NaN: unassigned).
        gene_sets: ``{name: genes}`` (e.g. :func:`msfm.data.gene_sets.as_gene_sets`).

    Returns:
        DataFrame with :data:`ENRICHMENT_COLUMNS`; ``genes`` is the overlap, ``;``-separated.

    Raises:
        MsfmInputError: ``modules`` and ``genes`` differ in length; no set shares a gene with ``genes``.
    """
    names = np.asarray([str(g) for g in genes], dtype=object)
    labels = _module_labels(modules, len(names))
    sets = restrict_gene_sets(gene_sets, names.tolist())
    ids = np.unique(labels[labels >= 0])
    rows = []
    for m in ids:
        members = set(names[labels == m].tolist())
        for set_name, set_genes in sets.items():
            hit = [g for g in set_genes if g in members]
            rows.append((int(m), set_name, len(hit), len(members), len(set_genes), ";".join(hit)))
    table = pd.DataFrame(rows, columns=["module", "gene_set", "overlap", "module_size", "set_size", "genes"])
    if table.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ENRICHMENT_COLUMNS})
    table["p_value"] = _hypergeom_sf(
        table["overlap"].to_numpy(), len(names), table["set_size"].to_numpy(), table["module_size"].to_numpy()
    )
    table["fdr"] = benjamini_hochberg(table["p_value"].to_numpy())
    table = table[table["overlap"] > 0].sort_values(["p_value", "module", "gene_set"], kind="stable")
    return table.loc[:, list(ENRICHMENT_COLUMNS)].reset_index(drop=True)


def _module_labels(modules: Any, n: int) -> np.ndarray:
    arr = pd.Series(np.asarray(modules, dtype=object))
    if arr.size != n:
        msg = f"modules has {arr.size} entries but genes has {n}; give one module per gene."
        raise MsfmInputError(msg)
    numeric = pd.to_numeric(arr.astype(object).where(arr.notna(), -1), errors="coerce")
    if numeric.isna().any():
        # Module names that are not numbers (e.g. categorical strings): number them in order of appearance.
        codes, _ = pd.factorize(arr.where(arr.notna(), None))
        return codes.astype(np.int64)
    return numeric.to_numpy(dtype=np.int64)


def co_module_score(
    genes: Sequence[str],
    modules: Any,
    gene_set: Sequence[str],
    *,
    n_permutations: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How far one gene set falls in one module.

    The set's most common module (ties: the smaller module number) holds ``in_module`` of its ``n_set_genes``
    analysed genes: ``fraction = in_module / n_set_genes``. ``p_permutation`` compares ``in_module`` with random
    gene sets of the same size drawn from the analysed genes (``(1 + #as large) / (1 + n_permutations)``), so it
    accounts for choosing the best module; ``p_hypergeom`` is the one-sided hypergeometric p-value of that one
    module (not adjusted for the choice).

    Returns:
        ``module``, ``in_module``, ``n_set_genes``, ``fraction``, ``module_size``, ``n_modules``,
        ``p_permutation``, ``p_hypergeom``, ``genes_in_module`` (list), ``missing`` (set genes not analysed).

    Raises:
        MsfmInputError: fewer than two of the set's genes are analysed.
    """
    names = [str(g) for g in genes]
    labels = _module_labels(modules, len(names))
    pos = {g: i for i, g in enumerate(names)}
    members = [pos[g] for g in dict.fromkeys(gene_set) if g in pos]
    missing = [g for g in dict.fromkeys(gene_set) if g not in pos]
    if len(members) < 2:
        msg = (
            f"Only {len(members)} of the gene set's {len(members) + len(missing)} genes are analysed "
            f"(missing e.g. {missing[:5]}); a co-module score needs at least 2. Analyse the set's genes (genes=...)."
        )
        raise MsfmInputError(msg)
    n_modules = int(labels.max()) + 1 if (labels >= 0).any() else 0
    counts = np.bincount(labels[members][labels[members] >= 0], minlength=max(n_modules, 1))
    best = int(np.argmax(counts)) if counts.sum() else -1
    hit = int(counts[best]) if best >= 0 else 0
    module_size = int((labels == best).sum()) if best >= 0 else 0
    rng = np.random.default_rng(seed)
    stats = np.empty(n_permutations, dtype=np.int64)
    assigned = labels >= 0
    for i in range(n_permutations):
        draw = rng.choice(len(names), size=len(members), replace=False)
        lab = labels[draw][assigned[draw]]
        stats[i] = np.bincount(lab).max() if lab.size else 0
    p_perm = float((1 + np.sum(stats >= hit)) / (1 + n_permutations))
    p_hyper = float(
        _hypergeom_sf(np.array([hit]), len(names), np.array([len(members)]), np.array([module_size]))[0]
    )
    return {
        "module": best,
        "in_module": hit,
        "n_set_genes": len(members),
        "fraction": hit / len(members),
        "module_size": module_size,
        "n_modules": n_modules,
        "p_permutation": p_perm,
        "p_hypergeom": p_hyper if best >= 0 else 1.0,
        "genes_in_module": [names[i] for i in members if labels[i] == best and best >= 0],
        "missing": missing,
    }


def gene_set_cohesion(
    results: Mapping[str, GeneModules | tuple[Sequence[str], Any]],
    gene_set: Sequence[str],
    *,
    gene_set_name: str = "gene_set",
    n_permutations: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare methods (e.g. context embeddings, input embeddings, co-expression) on one gene set.

    Args:
        results: method name -> :class:`GeneModules`, or ``(genes, modules)``.
        gene_set: the genes that should fall in one module (e.g. interferon-stimulated genes).
        gene_set_name: its name in the table.
        n_permutations, seed: see :func:`co_module_score`.

    Returns:
        One row per method: :func:`co_module_score`'s numbers (``genes_in_module`` joined by ``;``) plus ``fdr``,
        the smallest Benjamini-Hochberg FDR of the set against the method's modules (hypergeometric test, BH over
        that method's modules), and ``n_genes``, the analysed genes.
    """
    rows = []
    for method, res in results.items():
        genes, modules = (res.genes, res.modules) if isinstance(res, GeneModules) else res
        score = co_module_score(genes, modules, gene_set, n_permutations=n_permutations, seed=seed)
        table = module_enrichment(genes, modules, {gene_set_name: list(gene_set)})
        fdr = float(table["fdr"].min()) if len(table) else 1.0
        rows.append(
            {
                "method": method,
                "gene_set": gene_set_name,
                "n_genes": len(genes),
                **{k: v for k, v in score.items() if k not in ("genes_in_module", "missing")},
                "fdr": fdr,
                "genes_in_module": ";".join(score["genes_in_module"]),
            }
        )
    return pd.DataFrame(rows)
