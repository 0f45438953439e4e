"""Spatial evaluation: generation metrics, Moran's I / SVGs, niche clustering, perturbation readouts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from msfm.errors import MsfmInputError
from msfm.eval.spatial import (
    benjamini_hochberg,
    generation_metrics,
    morans_i,
    niche_clustering_scores,
    perturbation_report,
    perturbation_summary,
    spatially_variable_genes,
)


def _grid(side: int = 20, step: float = 10.0) -> np.ndarray:
    g = np.arange(side) * step
    xx, yy = np.meshgrid(g, g)
    return np.column_stack([xx.ravel(), yy.ravel()])


# ---------------------------------------------------------------------------------------------------- generation


def test_rmse_hand_computed() -> None:
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    true = np.array([[1.0, 0.0], [3.0, 0.0]])
    out = generation_metrics(pred, true, gene_names=["a", "b"], top_genes=["b"])
    # squared errors 0, 4, 0, 16
    assert out["rmse_all"] == pytest.approx(np.sqrt(5.0))
    assert out["rmse_cell_mean"] == pytest.approx((np.sqrt(2.0) + np.sqrt(8.0)) / 2)
    assert out["rmse_top"] == pytest.approx(np.sqrt(10.0))
    assert out["rmse_top_cell_mean"] == pytest.approx(3.0)
    assert out["n_top_genes"] == 1
    assert (out["n_cells"], out["n_genes"]) == (2, 2)
    # Index and boolean-mask forms select the same genes.
    assert generation_metrics(pred, true, top_genes=[1])["rmse_top"] == pytest.approx(np.sqrt(10.0))
    assert generation_metrics(pred, true, top_genes=np.array([False, True]))["rmse_top"] == pytest.approx(
        np.sqrt(10.0)
    )
    perfect = generation_metrics(true, true)
    assert perfect["rmse_all"] == 0.0


def test_correlations_match_scipy_with_ties_and_constant_rows() -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, size=(12, 9)).astype(float)  # many ties
    pred = true + rng.normal(0, 1.0, size=true.shape)
    pred[3] = 1.5  # constant predicted cell: skipped
    true[:, 4] = 2.0  # constant true gene: skipped gene-wise, and no cell row becomes constant
    out = generation_metrics(pred, true)
    keep = [i for i in range(12) if i != 3 and np.ptp(true[i]) > 0]
    sp = np.mean([stats.spearmanr(pred[i], true[i]).statistic for i in keep])
    pe = np.mean([stats.pearsonr(pred[i], true[i]).statistic for i in keep])
    sg = np.mean([stats.spearmanr(pred[:, j], true[:, j]).statistic for j in range(9) if j != 4])
    assert out["spearman_cell"] == pytest.approx(sp)
    assert out["pearson_cell"] == pytest.approx(pe)
    assert out["spearman_gene"] == pytest.approx(sg)
    assert out["n_cells_constant"] == 12 - len(keep)
    assert out["n_genes_constant"] == 1


def test_generation_metrics_errors() -> None:
    with pytest.raises(MsfmInputError, match="same cells"):
        generation_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(MsfmInputError, match="gene_names"):
        generation_metrics(np.zeros((3, 2)), np.zeros((3, 2)), top_genes=["a"])
    with pytest.raises(MsfmInputError, match="not in gene_names"):
        generation_metrics(np.zeros((3, 2)), np.zeros((3, 2)), gene_names=["a", "b"], top_genes=["z"])
    with pytest.raises(MsfmInputError, match="NaN"):
        generation_metrics(np.full((2, 2), np.nan), np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------------- Moran's I


def test_morans_i_matches_dense_formula_and_separates_smooth_from_shuffled() -> None:
    rng = np.random.default_rng(1)
    xy = _grid()
    smooth = np.sin(xy[:, 0] / 40.0) + np.cos(xy[:, 1] / 50.0)
    shuffled = rng.permutation(smooth)
    X = np.column_stack([shuffled, smooth, rng.normal(size=xy.shape[0]), np.ones(xy.shape[0])])
    k = 6
    mi = morans_i(X, xy, k=k)
    assert mi[1] > 0.8
    assert abs(mi[0]) < 0.1
    assert abs(mi[2]) < 0.1
    assert np.isnan(mi[3])  # constant gene

    # Brute force on a small irregular set with a dense row-standardised kNN weight matrix.
    pts = rng.uniform(0, 100, size=(30, 2))
    vals = rng.normal(size=(30, 3))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    W = np.zeros((30, 30))
    for i in range(30):
        W[i, np.argsort(d[i])[:4]] = 0.25
    z = vals - vals.mean(0)
    expected = np.array([(z[:, g] @ W @ z[:, g]) / (z[:, g] @ z[:, g]) for g in range(3)])
    np.testing.assert_allclose(morans_i(vals, pts, k=4), expected, rtol=1e-10)
    # Sparse input and small gene chunks give the same answer.
    import scipy.sparse as sp

    np.testing.assert_allclose(morans_i(sp.csr_matrix(vals), pts, k=4, chunk_size=1), expected, rtol=1e-10)


def test_svg_ranks_smooth_gene_first() -> None:
    rng = np.random.default_rng(2)
    xy = _grid(15)
    smooth = xy[:, 0] / 100.0
    X = np.column_stack([rng.normal(size=xy.shape[0]), rng.normal(size=xy.shape[0]), smooth])
    top = spatially_variable_genes(X, xy, n_top=1)
    assert top.tolist() == [2]
    assert spatially_variable_genes(X, xy, n_top=10).shape == (3,)
    with pytest.raises(MsfmInputError, match="k must be"):
        morans_i(X, xy, k=xy.shape[0])
    with pytest.raises(MsfmInputError, match=r"\[n_cells, 2\]"):
        morans_i(X, xy[:-1])


# ---------------------------------------------------------------------------------------------------- niches


def test_niche_clustering_perfect_and_random() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(["a", "b", "c"], 60)
    centres = {"a": [0, 0, 0], "b": [20, 0, 0], "c": [0, 20, 0]}
    emb = np.array([centres[lab] for lab in labels], dtype=float) + rng.normal(0, 0.5, size=(180, 3))
    out = niche_clustering_scores(emb, labels, return_labels=True)
    assert out["ami"] == pytest.approx(1.0)
    assert out["ari"] == pytest.approx(1.0)
    assert out["n_clusters"] == 3
    assert out["clusters"].shape == (180,)
    noise = niche_clustering_scores(rng.normal(size=(180, 3)), labels, seed=1)
    assert abs(noise["ami"]) < 0.1
    assert abs(noise["ari"]) < 0.1
    # Standardise + PCA path, and unlabelled cells are clustered but not scored.
    partial = labels.astype(object)
    partial[:10] = None
    out2 = niche_clustering_scores(emb, partial, n_pcs=2)
    assert out2["n_scored"] == 170
    assert out2["ami"] == pytest.approx(1.0)
    # Standardising blows the pure-noise third dimension up to the signal's scale; still separable here.
    assert niche_clustering_scores(emb, labels, standardize=True)["ami"] == pytest.approx(1.0)


def test_niche_clustering_leiden_and_errors() -> None:
    # leidenalg is a pinned dependency (pyproject.toml): no skip.
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 50)
    emb = np.where(labels[:, None] == 0, -10.0, 10.0) + rng.normal(0, 0.5, size=(100, 4))
    out = niche_clustering_scores(emb, labels, method="leiden")
    assert out["method"] == "leiden"
    assert out["n_clusters_found"] == 2
    assert out["ami"] == pytest.approx(1.0)
    with pytest.raises(MsfmInputError, match="Unknown method"):
        niche_clustering_scores(emb, labels, method="dbscan")  # type: ignore[arg-type]
    with pytest.raises(MsfmInputError, match="one label per"):
        niche_clustering_scores(emb, labels[:-1])


# ---------------------------------------------------------------------------------------------------- perturbation


def test_benjamini_hochberg_hand_example() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    rng = np.random.default_rng(5)
    q = rng.uniform(size=40) ** 3
    np.testing.assert_allclose(benjamini_hochberg(q), stats.false_discovery_control(q))
    with_nan = benjamini_hochberg(np.array([0.01, np.nan, 0.02]))
    assert np.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], [0.02, 0.02])


def _perturbation_example() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(6)
    control = rng.uniform(0.5, 2.0, size=(8, 4))
    perturbed = control.copy()
    perturbed[:, 0] += 1.0  # A up in every cell
    perturbed[:, 1] -= np.linspace(0.1, 0.8, 8)  # B down
    # C unchanged; D mixed: up in 4 cells, down in 4 by the same amounts
    perturbed[:, 3] += np.array([0.1, -0.1, 0.2, -0.2, 0.3, -0.3, 0.4, -0.4])
    return control, perturbed, ["A", "B", "C", "D"]


def test_perturbation_report_signs_and_pvalues() -> None:
    control, perturbed, genes = _perturbation_example()
    rep = perturbation_report(control, perturbed, genes, reference_up=["A", "C"], reference_down=["B"])
    assert isinstance(rep, pd.DataFrame)
    assert rep.index.tolist() == genes
    assert rep.loc["A", "log_fc"] == pytest.approx(1.0)
    assert rep.loc["B", "log_fc"] == pytest.approx(-0.45)
    assert rep.loc["C", "log_fc"] == 0.0
    np.testing.assert_allclose(rep["mean_control"], control.mean(0))
    np.testing.assert_allclose(rep["mean_perturbed"], perturbed.mean(0))
    # 8 positive paired differences: exact two-sided signed-rank p = 2 / 2**8.
    assert rep.loc["A", "wilcoxon_p"] == pytest.approx(2 / 256)
    assert rep.loc["B", "wilcoxon_p"] == pytest.approx(2 / 256)
    assert rep.loc["C", "wilcoxon_p"] == 1.0
    assert rep.loc["C", "n_changed"] == 0
    assert rep.loc["D", "wilcoxon_p"] > 0.5
    np.testing.assert_allclose(rep["fdr"], benjamini_hochberg(rep["wilcoxon_p"].to_numpy()))
    assert rep["reference_direction"].tolist() == [1, -1, 1, 0]
    assert rep.loc["A", "direction_correct"] == 1.0
    assert rep.loc["C", "direction_correct"] == 0.0
    assert np.isnan(rep.loc["D", "direction_correct"])


def test_perturbation_summary_direction_and_pcc() -> None:
    control, perturbed, genes = _perturbation_example()
    rep = perturbation_report(control, perturbed, genes)
    s = perturbation_summary(rep, reference_up=["A", "C"], reference_down=["B", "ZZ"])
    assert s["n_reference_genes"] == 3
    assert s["direction_accuracy"] == pytest.approx(2 / 3)  # C did not change: counted wrong
    assert (s["n_correct"], s["n_wrong"], s["n_no_change"]) == (2, 1, 1)
    assert s["missing_reference_genes"] == ["ZZ"]

    # PCC: the perturbed cells move towards the reference profile.
    rng = np.random.default_rng(7)
    ref = rng.normal(size=20)
    ctrl = rng.normal(size=(15, 20))
    pert = 0.5 * ctrl + ref
    rep2 = perturbation_report(ctrl, pert, [f"g{i}" for i in range(20)])
    s2 = perturbation_summary(
        rep2, control=ctrl, perturbed=pert, reference_profile=ref, alternative="greater"
    )
    pc = np.array([stats.pearsonr(r, ref).statistic for r in ctrl])
    pp = np.array([stats.pearsonr(r, ref).statistic for r in pert])
    assert s2["pcc_control"] == pytest.approx(pc.mean())
    assert s2["pcc_perturbed"] == pytest.approx(pp.mean())
    assert s2["ttest_p"] == pytest.approx(stats.ttest_rel(pp, pc, alternative="greater").pvalue)
    assert s2["ttest_p"] < 1e-3
    assert s2["n_pcc_cells"] == 15
    assert np.isnan(s2["direction_accuracy"])


def test_perturbation_errors() -> None:
    control, perturbed, genes = _perturbation_example()
    with pytest.raises(MsfmInputError, match="same target cells"):
        perturbation_report(control, perturbed[:-1], genes)
    with pytest.raises(MsfmInputError, match="names"):
        perturbation_report(control, perturbed, genes[:-1])
    with pytest.raises(MsfmInputError, match="both reference_up and reference_down"):
        perturbation_report(control, perturbed, genes, reference_up=["A"], reference_down=["A"])
    rep = perturbation_report(control, perturbed, genes)
    with pytest.raises(MsfmInputError, match="together"):
        perturbation_summary(rep, control=control)
    with pytest.raises(MsfmInputError, match="log_fc"):
        perturbation_summary(pd.DataFrame({"x": [1]}))


def test_exact_signflip_pvalues_match_scipy_exact_without_ties() -> None:
    from scipy.stats import wilcoxon

    from msfm.eval.spatial import _signflip_pvalues

    d = np.random.default_rng(0).normal(0.3, 1.0, size=(10, 40))
    ref = np.array([wilcoxon(d[:, j], method="exact").pvalue for j in range(d.shape[1])])
    np.testing.assert_allclose(_signflip_pvalues(d, 10), ref, atol=1e-12)
