"""Gene modules: kNN graph, Leiden modules, hypergeometric enrichment, co-module scores, the co-expression baseline."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import hypergeom

from msfm.errors import MsfmInputError
from msfm.eval.gene_modules import (
    co_module_score,
    coexpression_modules,
    cosine_knn,
    find_gene_modules,
    gene_set_cohesion,
    module_enrichment,
)


def _planted(seed: int = 0, n_cells: int = 300, size: int = 25, n_noise: int = 30):
    """Cells x genes: 4 programmes of ``size`` co-varying genes each, plus independent noise genes."""
    rng = np.random.default_rng(seed)
    programmes = rng.gamma(1.0, 1.0, size=(n_cells, 4))
    cols, genes = [], []
    for p in range(4):
        for j in range(size):
            cols.append(programmes[:, p] * rng.uniform(0.5, 2.0) + rng.normal(0, 0.4, n_cells))
            genes.append(f"P{p}_{j}")
    for j in range(n_noise):
        cols.append(rng.normal(0, 1, n_cells))
        genes.append(f"N{j}")
    return np.stack(cols, axis=1), genes


def test_cosine_knn_shapes_and_symmetry():
    x, _ = _planted(n_noise=0)
    sim, conn = cosine_knn(x.T, 5)
    n = x.shape[1]
    assert sim.shape == conn.shape == (n, n)
    assert (conn != conn.T).nnz == 0
    assert abs(sim - sim.T).max() < 1e-6
    assert conn.diagonal().sum() == 0
    assert (np.diff(conn.indptr) >= 5).all()  # every gene keeps its own 5 neighbours
    # the values are cosine similarities of the rows
    unit = x.T / np.linalg.norm(x.T, axis=1, keepdims=True)
    r, c = conn.nonzero()
    np.testing.assert_allclose(sim[r, c].A1, np.einsum("ij,ij->i", unit[r], unit[c]), atol=1e-5)


def test_coexpression_recovers_planted_modules():
    x, genes = _planted()
    res = coexpression_modules(x, genes, n_neighbors=10, seed=0)
    for p in range(4):
        labels = res.modules[p * 25 : (p + 1) * 25]
        assert len(set(labels.tolist())) == 1  # each programme is one module
        assert labels[0] >= 0
    assert len({res.modules[p * 25] for p in range(4)}) == 4  # ... and four different ones
    # firm members: within-module similarity is higher for programme genes than for absorbed noise genes
    assert np.nanmean(res.module_similarity[:100]) > np.nanmean(res.module_similarity[100:]) + 0.2


def test_modules_are_deterministic_under_a_seed():
    x, genes = _planted(seed=1)
    a = find_gene_modules(x.T, genes, n_neighbors=8, resolution=2.0, seed=3)
    b = find_gene_modules(x.T, genes, n_neighbors=8, resolution=2.0, seed=3)
    np.testing.assert_array_equal(a.modules, b.modules)
    assert (a.sizes() >= 5).all()
    assert list(a.sizes()) == sorted(a.sizes(), reverse=True)  # numbered by size


def test_enrichment_p_values_match_scipy_hypergeom():
    genes = [f"G{i}" for i in range(20)]
    modules = np.array([0] * 8 + [1] * 6 + [-1] * 6)  # 8 + 6 assigned, 6 unassigned (still in the universe)
    sets = {"S": ["G0", "G1", "G2", "G9", "G15", "NOT_ANALYSED"], "T": ["G10", "G11"]}
    table = module_enrichment(genes, modules, sets)
    row = table[(table.module == 0) & (table.gene_set == "S")].iloc[0]
    assert (row.overlap, row.module_size, row.set_size) == (3, 8, 5)
    assert row.genes == "G0;G1;G2"
    # P(X >= 3), X ~ Hypergeom(universe 20, 5 set genes, 8 drawn)
    assert row.p_value == pytest.approx(hypergeom.sf(2, 20, 5, 8))
    row_t = table[(table.module == 1) & (table.gene_set == "T")].iloc[0]
    assert row_t.p_value == pytest.approx(hypergeom.sf(1, 20, 2, 6))
    # BH over all 4 module x set pairs (the pair with overlap 0 counts, p = 1)
    p = np.array([hypergeom.sf(2, 20, 5, 8), hypergeom.sf(0, 20, 5, 6), 1.0, hypergeom.sf(1, 20, 2, 6)])
    order = np.argsort(p)
    q = np.minimum.accumulate((p[order] * 4 / np.arange(1, 5))[::-1])[::-1]
    expected = dict(zip(order.tolist(), q.tolist()))
    assert row.fdr == pytest.approx(expected[0])
    assert row_t.fdr == pytest.approx(expected[3])
    assert list(table.p_value) == sorted(table.p_value)


def test_co_module_score_and_cohesion():
    x, genes = _planted()
    res = coexpression_modules(x, genes, n_neighbors=10, seed=0)
    planted = [f"P2_{j}" for j in range(25)]
    score = co_module_score(genes, res.modules, planted, n_permutations=200)
    assert score["fraction"] == 1.0
    assert score["in_module"] == 25
    assert score["p_permutation"] == pytest.approx(1 / 201)
    random_set = [genes[i] for i in np.random.default_rng(0).choice(len(genes), 25, replace=False)]
    assert co_module_score(genes, res.modules, random_set, n_permutations=200)["fraction"] < 0.6
    shuffled = np.random.default_rng(0).permutation(res.modules)
    table = gene_set_cohesion(
        {"coexpression": res, "shuffled": (genes, shuffled)}, planted, gene_set_name="P2", n_permutations=200
    )
    assert list(table.method) == ["coexpression", "shuffled"]
    assert table.loc[0, "fdr"] < 1e-10 < table.loc[1, "fdr"]
    assert table.loc[0, "fraction"] > table.loc[1, "fraction"] + 0.4


def test_too_few_genes_for_the_knn_graph():
    with pytest.raises(
        MsfmInputError, match="Got 10 genes, but a kNN graph with n_neighbors=15 needs at least 16"
    ):
        find_gene_modules(np.random.default_rng(0).normal(size=(10, 4)), [f"G{i}" for i in range(10)])


def test_gene_sets_sharing_no_gene(caplog):
    genes = [f"G{i}" for i in range(10)]
    modules = np.zeros(10, dtype=int)
    with pytest.raises(MsfmInputError, match="None of the 1 gene set"):
        module_enrichment(genes, modules, {"S": ["X1", "X2"]})
    with caplog.at_level("WARNING"):
        table = module_enrichment(genes, modules, {"S": ["X1"], "T": ["G1"]})
    assert "share no gene" in caplog.text
    assert "'S'" in caplog.text
    assert set(table.gene_set) == {"T"}
