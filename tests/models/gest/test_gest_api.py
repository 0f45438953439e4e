"""GeST on AnnData: training (and exact resume), checkpoints, generation, embeddings, perturbation, annotation."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from msfm.datasets import semi_real_tissue
from msfm.engine.trainer import TrainerOptions
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.gest.api import cluster_niches, embed, generate, generate_arrays
from msfm.models.gest.checkpoint import load_model, save_model
from msfm.models.gest.evaluate import evaluate_generation, evaluate_niches, held_out_windows
from msfm.models.gest.finetune import NicheClassifierConfig, annotate_niches, train_niche_classifier
from msfm.models.gest.perturb import perturb
from msfm.models.gest.train import GestTrainConfig, train

OPTS = {"progress_bar": False, "model_summary": False, "accelerator": "cpu", "log_every_n_steps": 1}


def config(steps: int = 6, **kw: object) -> GestTrainConfig:
    base = {
        "preset": "gest-tiny",
        "n_genes": 60,
        "n_metacells": 24,
        "n_pcs": 10,
        "levels": (6, 3),
        "side_um": 150.0,
        "max_cells": 48,
        "batch_size": 4,
        "trainer": TrainerOptions(max_steps=steps, checkpoint_every_n_steps=3, **OPTS),
    }
    base.update(kw)
    return GestTrainConfig(**base)


@pytest.fixture(scope="module")
def tissue():
    return semi_real_tissue(n_cells=400, n_domains=3, side_um=400.0, seed=1)


@pytest.fixture(scope="module")
def held(tissue):
    from msfm.data.spatial import spatial_coords

    return held_out_windows(spatial_coords(tissue).xy, side_um=60.0, n_windows=2, seed=0)


@pytest.fixture(scope="module")
def run(tissue, held, tmp_path_factory):
    out = tmp_path_factory.mktemp("gest") / "run"
    model = train(tissue, out, config(steps=6), train_mask=~held)
    return out, model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_writes_run_and_checkpoint(run, tissue) -> None:
    out, model = run
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "vocab.safetensors").is_file()
    loaded = load_model(model, device="cpu")
    assert loaded.vocab.n_metacells == 24
    assert loaded.vocab.n_genes == 60
    assert loaded.model.config.level_sizes == (24, 6, 3)
    assert loaded.side_um == 150.0
    assert loaded.preprocessing["expression"] == "log1p_cp10k"
    assert set(loaded.vocab.genes) <= set(tissue.var_names)
    torch.testing.assert_close(loaded.model.metacell_expr, torch.from_numpy(loaded.vocab.centroids_expr))


def test_resume_after_kill_equals_uninterrupted(tissue, tmp_path) -> None:
    full = train(tissue, tmp_path / "full", config(steps=6))
    part = tmp_path / "part"
    train(tissue, part, config(steps=3))  # "killed" after step 3 (last.ckpt written at step 3)
    resumed = train(tissue, part, config(steps=6))
    a = load_model(full, device="cpu").model.state_dict()
    b = load_model(resumed, device="cpu").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_checkpoint_round_trip_and_errors(run, tmp_path) -> None:
    _, model = run
    loaded = load_model(model, device="cpu")
    again = save_model(tmp_path / "copy", loaded.model, loaded.vocab, window=loaded.window)
    back = load_model(again, device="cpu")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k])
    assert np.array_equal(back.vocab.centroids_pca, loaded.vocab.centroids_pca)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "missing", device="cpu")


def test_generate_held_out_cells(run, tissue, held) -> None:
    _, model = run
    before = tissue.X.copy()
    out = generate(tissue, model, query=held, device="cpu")
    assert out.shape == (int(held.sum()), 60)
    assert list(out.obs_names) == list(tissue.obs_names[held])
    assert out.obs["gest_token"].between(0, 23).all()
    assert np.all(out.X >= 0)
    assert (tissue.X != before).nnz == 0 if hasattr(before, "nnz") else np.array_equal(tissue.X, before)
    # pick mode outputs are meta-cell profiles
    loaded = load_model(model, device="cpu")
    np.testing.assert_allclose(
        out.X, loaded.vocab.centroids_expr[out.obs["gest_token"].to_numpy()], atol=1e-6
    )
    weighted = generate(tissue, model, query=held, mode="weighted", device="cpu")
    assert not np.allclose(weighted.X, out.X)


def test_generate_cache_and_batching_invariance(run, tissue, held) -> None:
    _, model = run
    a = generate(tissue, model, query=held, device="cpu", batch_size=16)
    b = generate(tissue, model, query=held, device="cpu", batch_size=1, use_cache=False)
    assert np.array_equal(a.obs["gest_token"].to_numpy(), b.obs["gest_token"].to_numpy())
    np.testing.assert_allclose(a.obs["gest_token_prob"], b.obs["gest_token_prob"], atol=1e-5)


def test_generate_at_new_positions_and_far_regions(run, tissue) -> None:
    _, model = run
    xy = np.asarray(tissue.obsm["spatial"])
    new = xy[:5] + 3.0
    out = generate(tissue, model, positions=new, device="cpu")
    assert out.shape == (5, 60)
    assert list(out.obs_names) == [f"gest_{i}" for i in range(5)]
    # A band of queries wider than a window is generated in rounds, from the known cells inwards.
    band = xy[:, 0] > np.quantile(xy[:, 0], 0.55)
    res = generate(tissue, model, query=band, device="cpu")
    assert res.obs["gest_round"].max() >= 1
    with pytest.raises(MsfmInputError, match="exactly one"):
        generate(tissue, model, device="cpu")
    with pytest.raises(MsfmInputError, match="no cell"):
        generate(tissue, model, query=np.zeros(tissue.n_obs, bool), device="cpu")


def test_generate_arrays_errors(run) -> None:
    _, model = run
    loaded = load_model(model, device="cpu")
    with pytest.raises(MsfmInputError, match="known cells"):
        generate_arrays(loaded, np.zeros((0, 2)), np.zeros(0, int), np.zeros((3, 2)))
    with pytest.raises(MsfmInputError, match="farther than half a window"):
        generate_arrays(
            loaded, [*np.zeros((2, 2)), [0, 0], [1, 1]], np.zeros(2, int), np.array([[5000.0, 5000.0]])
        )


def test_embed_and_cluster(run, tissue) -> None:
    _, model = run
    adata = tissue.copy()
    embed(adata, model, device="cpu", max_cells=16)
    assert adata.obsm["X_gest"].shape == (adata.n_obs, 64)
    assert np.isfinite(adata.obsm["X_gest"]).all()
    assert adata.obs["gest_n_neighbours"].max() <= 15
    cluster_niches(adata, n_clusters=3)
    assert adata.obs["gest_niche"].nunique() == 3
    # Embedding a subset equals the rows of the full embedding (batch composition does not matter).
    sub = tissue.copy()
    embed(sub, model, device="cpu", max_cells=16, cells=np.arange(10), batch_size=3)
    np.testing.assert_allclose(sub.obsm["X_gest"][:10], adata.obsm["X_gest"][:10], atol=1e-5)
    assert np.isnan(sub.obsm["X_gest"][10:]).all()
    with pytest.raises(MsfmInputError, match="NaN"):
        cluster_niches(sub, n_clusters=3)
    with pytest.raises(MsfmInputError, match="n_clusters"):
        cluster_niches(adata)


def test_perturb_continuous_changes_targets_and_reports(run, tissue) -> None:
    _, model = run
    loaded = load_model(model, device="cpu")
    gene = loaded.vocab.genes[0]
    xy = np.asarray(tissue.obsm["spatial"])
    c = xy.mean(axis=0)
    box = (c[0] - 30, c[1] - 30, c[0] + 30, c[1] + 30)
    res = perturb(
        tissue,
        model,
        region_box=box,
        genes_up=[gene],
        how="add_log_fc",
        amount=3.0,
        perturb_mode="continuous",
        device="cpu",
    )
    s = res.summary
    assert s["n_region_cells"] > 0
    assert s["n_targets"] > 0
    assert s["mean_abs_change"] > 0
    a = res.adata
    region = (a.obs["gest_role"] == "region").to_numpy()
    col = list(a.var_names).index(gene)
    np.testing.assert_allclose(
        a.layers["perturbed"][region, col], a.layers["control"][region, col] + 3.0, rtol=1e-5
    )
    assert set(res.report.columns) >= {"log_fc", "wilcoxon_p", "fdr"}
    assert a.uns["gest_perturbation"]["perturb_mode"] == "continuous"


def test_perturb_tiny_edit_is_a_reported_no_op(run, tissue, caplog) -> None:
    _, model = run
    gene = load_model(model, device="cpu").vocab.genes[-1]
    xy = np.asarray(tissue.obsm["spatial"])
    c = xy.mean(axis=0)
    res = perturb(
        tissue,
        model,
        region_box=(c[0] - 30, c[1] - 30, c[0] + 30, c[1] + 30),
        genes_up=[gene],
        how="add_log_fc",
        amount=1e-6,
        device="cpu",
    )
    assert res.summary["n_region_tokens_changed"] == 0
    assert res.summary["no_op"] is True
    assert res.summary["mean_abs_change"] == 0.0
    assert "no-op" in caplog.text


def test_perturb_bad_input(run, tissue) -> None:
    _, model = run
    gene = load_model(model, device="cpu").vocab.genes[0]
    with pytest.raises(MsfmInputError, match="contains no cell"):
        perturb(tissue, model, region_box=(1e6, 1e6, 1e6 + 10, 1e6 + 10), genes_up=[gene], device="cpu")
    with pytest.raises(MsfmInputError, match="NOT_A_GENE"):
        perturb(tissue, model, region_cells=np.arange(5), genes_up=["NOT_A_GENE"], device="cpu")
    with pytest.raises(MsfmInputError, match="exactly one region"):
        perturb(tissue, model, genes_up=[gene], device="cpu")
    with pytest.raises(MsfmInputError, match="Nothing to perturb"):
        perturb(tissue, model, region_cells=np.arange(5), device="cpu")
    with pytest.raises(MsfmInputError, match="ring_um"):
        perturb(tissue, model, region_cells=np.arange(5), genes_up=[gene], ring_um=1e-3, device="cpu")


def test_evaluate_generation_and_niches(run, tissue, held) -> None:
    _, model = run
    ev = evaluate_generation(
        tissue, model, held_out=held, baselines=("mean", "knn"), n_top_genes=20, device="cpu"
    )
    assert list(ev.table.index) == ["gest_pick", "gest_weighted", "mean", "knn"]
    assert ev.truth.shape == (int(held.sum()), 60)
    assert (ev.table["rmse_all"] > 0).all()
    niches = evaluate_niches(tissue, model, label_key="domain", max_cells=16, device="cpu")
    assert list(niches.index) == ["gest", "expression_pca", "niche_mean_pca"]
    assert niches["ami"].between(-1, 1).all()


def test_niche_annotation_round_trip(run, tissue, tmp_path) -> None:
    _, model = run
    cfg = NicheClassifierConfig(
        label_key="domain", max_cells=12, batch_size=8, trainer=TrainerOptions(max_steps=3, **OPTS)
    )
    clf = train_niche_classifier(tissue, model, tmp_path / "clf", cfg)
    out = annotate_niches(tissue, clf, device="cpu", copy=True)
    assert out is not None
    assert set(out.obs["gest_niche_label"].cat.categories) == set(tissue.obs["domain"].astype(str))
    assert out.obs["gest_niche_label_confidence"].between(0, 1).all()
    with pytest.raises(MsfmInputError, match="label_key"):
        train_niche_classifier(tissue, model, tmp_path / "x", NicheClassifierConfig(label_key="nope"))


def test_bad_spatial_input(run, tissue, tmp_path) -> None:
    _, model = run
    no_xy = tissue.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(MsfmInputError, match="spatial"):
        embed(no_xy, model, device="cpu")
    dup = tissue.copy()
    dup.obsm["spatial"] = np.asarray(dup.obsm["spatial"]).copy()
    dup.obsm["spatial"][1] = dup.obsm["spatial"][0]
    with pytest.raises(MsfmInputError, match="duplicate"):
        generate(dup, model, query=np.arange(3), device="cpu")
    # duplicates="jitter" is the documented way through.
    out = generate(dup, model, query=np.arange(3), device="cpu", duplicates="jitter")
    assert out.n_obs == 3
    with pytest.raises(MsfmInputError, match="n_metacells"):
        train(tissue[:20].copy(), tmp_path / "small", config(n_metacells=64))


def test_single_cell_windows_are_skipped_or_refused(tissue, tmp_path) -> None:
    # Cells 1 mm apart: every 150 µm window holds one cell, so there is no training pair.
    sparse = tissue[:30].copy()
    sparse.obsm["spatial"] = np.stack([np.arange(30) * 1000.0, np.zeros(30)], axis=1)
    with pytest.raises(MsfmInputError, match="side"):
        train(sparse, tmp_path / "sparse", config(n_metacells=4, levels=(2,)))
    shutil.rmtree(tmp_path / "sparse", ignore_errors=True)
