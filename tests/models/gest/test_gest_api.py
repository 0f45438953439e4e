"""GeST on AnnData: training (and exact resume), checkpoints, generation, embeddings, perturbation, annotation.

Verbs are called as users call them: ``import msfm`` then ``msfm.gest.<verb>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import msfm
from msfm.datasets import semi_real_tissue
from msfm.engine.trainer import TrainerOptions
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.gest.pretrain import GestTrainConfig
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import TrainResult

gest = msfm.gest

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

    return gest.held_out_windows(spatial_coords(tissue).xy, side_um=60.0, n_windows=2, seed=0)


@pytest.fixture(scope="module")
def run(tissue, held, tmp_path_factory):
    out = tmp_path_factory.mktemp("gest") / "run"
    model = gest.train(tissue, out, config=config(steps=6), train_mask=~held)
    return out, model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_writes_run_and_checkpoint(run, tissue, held) -> None:
    out, model = run
    assert isinstance(model, TrainResult)
    assert model.run_dir == out
    assert model.checkpoint == out / "model"
    assert model.metrics["global_step"] == 6
    assert model.metrics["n_train_cells"] == int((~held).sum())
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "vocab.safetensors").is_file()
    loaded = gest.load(model, device="cpu")
    assert isinstance(loaded, Loaded)
    assert loaded.family == "gest"
    assert loaded.path == out / "model"
    assert loaded.vocab.n_metacells == 24
    assert loaded.vocab.n_genes == 60
    assert loaded.model.config.level_sizes == (24, 6, 3)
    assert gest.window_settings(loaded).side_um == 150.0
    assert gest.window_settings(loaded).max_cells == 48
    assert loaded.preprocessing["expression"] == "log1p_cp10k"
    # A Loaded passes through load (moved to the device).
    assert gest.load(loaded, device="cpu") is not None
    assert set(loaded.vocab.genes) <= set(tissue.var_names)
    torch.testing.assert_close(loaded.model.metacell_expr, torch.from_numpy(loaded.vocab.centroids_expr))


def test_resume_after_kill_equals_uninterrupted(tissue, tmp_path) -> None:
    full = gest.train(tissue, tmp_path / "full", config=config(steps=6))
    part = tmp_path / "part"
    gest.train(tissue, part, config=config(steps=3))  # "killed" after step 3 (last.ckpt written at step 3)
    # The same run resumed with a flat override of the step count (the settings builder merges it).
    resumed = gest.train(tissue, part, config=config(steps=3), max_steps=6)
    assert resumed.metrics["global_step"] == 6
    a = gest.load(full, device="cpu").model.state_dict()
    b = gest.load(resumed, device="cpu").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_checkpoint_round_trip_and_errors(run, tmp_path) -> None:
    _, model = run
    loaded = gest.load(model, device="cpu")
    again = gest.save_model(
        tmp_path / "copy", loaded.model, loaded.vocab, window=gest.window_settings(loaded)
    )
    back = gest.load(again, device="cpu")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k])
    assert np.array_equal(back.vocab.centroids_pca, loaded.vocab.centroids_pca)
    assert gest.window_settings(back) == gest.window_settings(loaded)
    with pytest.raises(CheckpointError):
        gest.load(tmp_path / "missing", device="cpu")


def test_generate_held_out_cells(run, tissue, held) -> None:
    _, model = run
    before = tissue.X.copy()
    out = gest.generate(tissue, model, query=held, device="cpu")
    assert out.shape == (int(held.sum()), 60)
    assert list(out.obs_names) == list(tissue.obs_names[held])
    assert out.obs["gest_token"].between(0, 23).all()
    assert np.all(out.X >= 0)
    assert (tissue.X != before).nnz == 0 if hasattr(before, "nnz") else np.array_equal(tissue.X, before)
    # pick mode outputs are meta-cell profiles
    loaded = gest.load(model, device="cpu")
    np.testing.assert_allclose(
        out.X, loaded.vocab.centroids_expr[out.obs["gest_token"].to_numpy()], atol=1e-6
    )
    assert out.uns["gest"]["generate"]["mode"] == "pick"
    weighted = gest.generate(tissue, model, query=held, mode="weighted", device="cpu")
    assert not np.allclose(weighted.X, out.X)
    assert weighted.uns["gest"]["generate"]["mode"] == "weighted"
    # The same options as one object.
    again = gest.generate(
        tissue, model, query=held, generation=gest.GenerationOptions(mode="weighted"), device="cpu"
    )
    np.testing.assert_array_equal(again.X, weighted.X)


def test_generate_cache_and_batching_invariance(run, tissue, held) -> None:
    _, model = run
    a = gest.generate(tissue, model, query=held, device="cpu", batch_size=16)
    b = gest.generate(tissue, model, query=held, device="cpu", batch_size=1, use_cache=False)
    assert np.array_equal(a.obs["gest_token"].to_numpy(), b.obs["gest_token"].to_numpy())
    np.testing.assert_allclose(a.obs["gest_token_prob"], b.obs["gest_token_prob"], atol=1e-5)


def test_generate_at_new_positions_and_far_regions(run, tissue) -> None:
    _, model = run
    xy = np.asarray(tissue.obsm["spatial"])
    new = xy[:5] + 3.0
    out = gest.generate(tissue, model, positions=new, device="cpu")
    assert out.shape == (5, 60)
    assert list(out.obs_names) == [f"gest_{i}" for i in range(5)]
    # A band of queries wider than a window is generated in rounds, from the known cells inwards.
    band = xy[:, 0] > np.quantile(xy[:, 0], 0.55)
    res = gest.generate(tissue, model, query=band, device="cpu")
    assert res.obs["gest_round"].max() >= 1
    with pytest.raises(MsfmInputError, match="exactly one"):
        gest.generate(tissue, model, device="cpu")
    with pytest.raises(MsfmInputError, match="no cell"):
        gest.generate(tissue, model, query=np.zeros(tissue.n_obs, bool), device="cpu")


def test_generate_arrays_errors(run) -> None:
    _, model = run
    loaded = gest.load(model, device="cpu")
    with pytest.raises(MsfmInputError, match="known cells"):
        gest.generate_arrays(loaded, np.zeros((0, 2)), np.zeros(0, int), np.zeros((3, 2)))
    with pytest.raises(MsfmInputError, match="farther than half a window"):
        gest.generate_arrays(
            loaded, [*np.zeros((2, 2)), [0, 0], [1, 1]], np.zeros(2, int), np.array([[5000.0, 5000.0]])
        )


def test_embed_and_cluster(run, tissue) -> None:
    _, model = run
    adata = tissue.copy()
    returned = gest.embed(adata, model, device="cpu", max_cells=16, progress=False)
    assert returned is adata
    assert adata.uns["gest"]["embed"]["max_cells"] == 16
    assert adata.obsm["X_gest"].shape == (adata.n_obs, 64)
    assert np.isfinite(adata.obsm["X_gest"]).all()
    assert adata.obs["gest_n_neighbours"].max() <= 15
    gest.cluster_niches(adata, n_clusters=3)
    assert adata.obs["gest_niche"].nunique() == 3
    assert set(adata.uns["gest"]) == {"embed", "cluster_niches"}
    # Embedding a subset equals the rows of the full embedding (batch composition does not matter).
    sub = tissue.copy()
    gest.embed(sub, model, device="cpu", max_cells=16, cells=np.arange(10), batch_size=3)
    np.testing.assert_allclose(sub.obsm["X_gest"][:10], adata.obsm["X_gest"][:10], atol=1e-5)
    assert np.isnan(sub.obsm["X_gest"][10:]).all()
    with pytest.raises(MsfmInputError, match="NaN"):
        gest.cluster_niches(sub, n_clusters=3)
    with pytest.raises(MsfmInputError, match="n_clusters"):
        gest.cluster_niches(adata)


def test_perturb_continuous_changes_targets_and_reports(run, tissue) -> None:
    _, model = run
    loaded = gest.load(model, device="cpu")
    gene = loaded.vocab.genes[0]
    xy = np.asarray(tissue.obsm["spatial"])
    c = xy.mean(axis=0)
    box = (c[0] - 30, c[1] - 30, c[0] + 30, c[1] + 30)
    res = gest.perturb(
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
    assert a.uns["gest"]["perturb"]["perturb_mode"] == "continuous"
    assert res.params["mode"] == "weighted"  # perturb's default output mode
    assert isinstance(res, gest.GestPerturbation)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.summary = {}  # type: ignore[misc]


def test_perturbation_save_writes_the_bundle(run, tissue, tmp_path) -> None:
    _, model = run
    gene = gest.load(model, device="cpu").vocab.genes[0]
    xy = np.asarray(tissue.obsm["spatial"])
    c = xy.mean(axis=0)
    polygon = tmp_path / "poly.csv"
    square = [[c[0] - 30, c[1] - 30], [c[0] + 30, c[1] - 30], [c[0] + 30, c[1] + 30], [c[0] - 30, c[1] + 30]]
    pd.DataFrame(square, columns=["x", "y"]).to_csv(polygon, index=False)
    out = tmp_path / "pert"
    res = gest.perturb(
        tissue, model, region_polygon=polygon, genes_up=[gene], how="add_log_fc", amount=3.0,
        perturb_mode="continuous", mode="pick", device="cpu", progress=False, out=out,
    )  # fmt: skip
    assert res.params["mode"] == "pick"
    assert {p.name for p in out.iterdir()} == {
        "perturbation.h5ad",
        "report.csv",
        "summary.json",
        "perturbation.png",
    }
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_region_cells"] == res.summary["n_region_cells"]
    assert summary["params"]["perturb_mode"] == "continuous"
    back = ad.read_h5ad(out / "perturbation.h5ad")
    np.testing.assert_allclose(back.layers["perturbed"], res.adata.layers["perturbed"])
    report = pd.read_csv(out / "report.csv", index_col=0)
    assert list(report.index) == list(res.report.index)
    assert (out / "perturbation.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(MsfmInputError, match="already exists"):
        res.save(out)
    res.save(out, overwrite=True)


def test_perturb_tiny_edit_is_a_reported_no_op(run, tissue, caplog) -> None:
    _, model = run
    gene = gest.load(model, device="cpu").vocab.genes[-1]
    xy = np.asarray(tissue.obsm["spatial"])
    c = xy.mean(axis=0)
    res = gest.perturb(
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
    gene = gest.load(model, device="cpu").vocab.genes[0]
    with pytest.raises(MsfmInputError, match="contains no cell"):
        gest.perturb(tissue, model, region_box=(1e6, 1e6, 1e6 + 10, 1e6 + 10), genes_up=[gene], device="cpu")
    with pytest.raises(MsfmInputError, match="NOT_A_GENE"):
        gest.perturb(tissue, model, region_cells=np.arange(5), genes_up=["NOT_A_GENE"], device="cpu")
    with pytest.raises(MsfmInputError, match="exactly one region"):
        gest.perturb(tissue, model, genes_up=[gene], device="cpu")
    with pytest.raises(MsfmInputError, match="Nothing to perturb"):
        gest.perturb(tissue, model, region_cells=np.arange(5), device="cpu")
    with pytest.raises(MsfmInputError, match="ring_um"):
        gest.perturb(tissue, model, region_cells=np.arange(5), genes_up=[gene], ring_um=1e-3, device="cpu")


def test_evaluate_generation_and_niches(run, tissue, held, tmp_path) -> None:
    _, model = run
    ev = gest.evaluate(
        tissue, model, held_out=held, baselines=("mean", "knn"), n_top_genes=20, device="cpu", progress=False
    )
    assert isinstance(ev, gest.GenerationEvaluation)
    assert list(ev.table.index) == ["gest_pick", "gest_weighted", "mean", "knn"]
    assert ev.truth.shape == (int(held.sum()), 60)
    # The table's numbers are those of the returned predictions (recomputed here), and each is a real bound:
    # the zero predictor's RMSE here is 2.92; measured 2026-12-02 (6 training steps): GeST-pick 2.33 (0.80 x zero),
    # GeST-W 2.03 (0.69), mean 1.96 (0.67), kNN 2.01 (0.69); rmse_top 2.58 / 2.30 / 2.19 / 2.15.
    truth = ev.truth
    zero_rmse = float(np.sqrt(np.mean(truth**2)))
    assert zero_rmse == pytest.approx(2.924, abs=0.01)
    top = np.asarray(ev.top_genes)
    assert len(top) == 20
    for method, pred in ev.predictions.items():
        row = ev.table.loc[method]
        assert pred.shape == truth.shape
        assert row["rmse_all"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)), rel=1e-5)
        assert row["rmse_top"] == pytest.approx(
            np.sqrt(np.mean((pred[:, top] - truth[:, top]) ** 2)), rel=1e-5
        )
        assert row["rmse_cell_mean"] == pytest.approx(np.sqrt(((pred - truth) ** 2).mean(1)).mean(), rel=1e-5)
        assert row["rmse_all"] < (0.9 if method == "gest_pick" else 0.8) * zero_rmse, (
            method,
            row["rmse_all"],
        )
    assert np.allclose(ev.predictions["mean"], ev.predictions["mean"][:1])  # one profile for every cell
    assert ev.table.loc["gest_weighted", "rmse_all"] < 1.25 * ev.table.loc["mean", "rmse_all"]
    assert ev.niches is None
    niches = gest.evaluate_niches(tissue, model, labels_key="domain", max_cells=16, device="cpu")
    assert list(niches.index) == ["gest", "expression_pca", "niche_mean_pca"]
    assert niches["ami"].between(-1, 1).all()
    # With labels_key the niche scores come with the generation scores; out= saves the folder.
    both = gest.evaluate(
        tissue, model, held_out=held, baselines=("mean",), modes=("pick",), n_top_genes=20, labels_key="domain",
        max_cells=16, device="cpu", progress=False, out=tmp_path / "eval",
    )  # fmt: skip
    pd.testing.assert_frame_equal(both.niches, niches)
    files = {p.name for p in (tmp_path / "eval").iterdir()}
    assert files == {"generation.csv", "niches.csv", "predictions.npz", "result.json"}
    saved = np.load(tmp_path / "eval" / "predictions.npz")
    np.testing.assert_array_equal(saved["gest_pick"], both.predictions["gest_pick"])
    np.testing.assert_array_equal(saved["truth"], both.truth)
    assert json.loads((tmp_path / "eval" / "result.json").read_text())["genes"] == both.genes
    with pytest.raises(MsfmInputError, match="already exists"):
        both.save(tmp_path / "eval")
    with pytest.raises(MsfmInputError, match="modes"):
        gest.evaluate(tissue, model, held_out=held, mode="pick", device="cpu")


def test_niche_classifier_round_trip(run, tissue, tmp_path) -> None:
    _, model = run
    clf = gest.fit_classifier(
        tissue, model, labels_key="domain", out=tmp_path / "clf", max_cells=12, batch_size=8, max_steps=3,
        config={"trainer": OPTS},
    )  # fmt: skip
    assert isinstance(clf, TrainResult)
    assert clf.checkpoint == tmp_path / "clf" / "model"
    record = json.loads((tmp_path / "clf" / "config.json").read_text())["run"]
    assert record["labels_key"] == "domain"
    assert record["max_cells"] == 12
    loaded = gest.load(clf, device="cpu")
    assert loaded.extra["classes"] == sorted(set(tissue.obs["domain"].astype(str)))
    out = gest.predict(tissue, clf, device="cpu", copy=True, progress=False)
    assert out is not tissue
    assert set(out.obs["gest_domain"].cat.categories) == set(tissue.obs["domain"].astype(str))
    assert out.obs["gest_confidence"].between(0, 1).all()
    assert out.obsm["gest_probs"].shape == (tissue.n_obs, 3)
    np.testing.assert_allclose(out.obsm["gest_probs"].sum(1), 1.0, rtol=1e-5)
    assert out.uns["gest"]["predict"]["labels_key"] == "domain"
    assert "gest_domain" not in tissue.obs
    # Another prefix, written in place.
    work = tissue.copy()
    same = gest.predict(work, loaded, key_added="niche", device="cpu", progress=False)
    assert same is work
    np.testing.assert_array_equal(work.obs["niche_domain"].to_numpy(), out.obs["gest_domain"].to_numpy())
    with pytest.raises(MsfmInputError, match="labels_key"):
        gest.fit_classifier(tissue, model, labels_key="nope", out=tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a niche classifier"):
        gest.predict(tissue, model, device="cpu")
    with pytest.raises(CheckpointError, match="niche classifier"):
        gest.generate(tissue, clf, query=np.arange(3), device="cpu")


def test_bad_spatial_input(run, tissue, tmp_path) -> None:
    _, model = run
    no_xy = tissue.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(MsfmInputError, match="spatial"):
        gest.embed(no_xy, model, device="cpu")
    dup = tissue.copy()
    dup.obsm["spatial"] = np.asarray(dup.obsm["spatial"]).copy()
    dup.obsm["spatial"][1] = dup.obsm["spatial"][0]
    with pytest.raises(MsfmInputError, match="duplicate"):
        gest.generate(dup, model, query=np.arange(3), device="cpu")
    # duplicates="jitter" is the documented way through.
    out = gest.generate(dup, model, query=np.arange(3), device="cpu", duplicates="jitter")
    assert out.n_obs == 3
    with pytest.raises(MsfmInputError, match="n_metacells"):
        gest.train(tissue[:20].copy(), tmp_path / "small", config=config(n_metacells=64))


def test_single_cell_windows_are_skipped_or_refused(tissue, tmp_path) -> None:
    # Cells 1 mm apart: every 150 µm window holds one cell, so there is no training pair.
    sparse = tissue[:30].copy()
    sparse.obsm["spatial"] = np.stack([np.arange(30) * 1000.0, np.zeros(30)], axis=1)
    with pytest.raises(MsfmInputError, match="side"):
        gest.train(sparse, tmp_path / "sparse", config=config(n_metacells=4, levels=(2,)))
    shutil.rmtree(tmp_path / "sparse", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the public shape: key_added, reading options, paths in and out, deprecated names, fine-tuning
# ---------------------------------------------------------------------------------------------------------------
def test_key_added_names_every_output(run, tissue, tmp_path) -> None:
    _, model = run
    copy = gest.embed(tissue, model, key_added="niche", max_cells=8, copy=True, device="cpu", progress=False)
    assert copy is not tissue
    assert "X_niche" in copy.obsm
    assert {"niche_n_neighbours", "niche_token"} <= set(copy.obs)
    assert "embed" in copy.uns["niche"]
    assert "X_niche" not in tissue.obsm
    gest.cluster_niches(copy, key_added="niche", n_clusters=2)
    assert "niche_niche" in copy.obs
    with pytest.raises(MsfmInputError, match="prefix"):
        gest.embed(tissue, model, key_added="X_gest", device="cpu")
    with pytest.raises(MsfmInputError, match="'/'"):
        gest.embed(tissue, model, key_added="a/b", device="cpu")


def test_misspelt_keywords_name_the_closest_option(run, tissue, tmp_path) -> None:
    _, model = run
    with pytest.raises(MsfmInputError, match="pre_normalized"):
        gest.embed(tissue, model, pre_normalised=True, device="cpu")
    with pytest.raises(MsfmInputError, match="temperature"):
        gest.generate(tissue, model, query=np.arange(3), temprature=0.5, device="cpu")
    with pytest.raises(MsfmInputError, match="duplicates"):
        gest.predict(tissue, model, duplicate="keep", device="cpu")
    with pytest.raises(MsfmInputError, match="duplicates"):
        gest.generate(tissue, model, query=np.arange(3), duplicates="merge", device="cpu")
    with pytest.raises(MsfmInputError, match="mode"):
        gest.generate(tissue, model, query=np.arange(3), mode="greedy", device="cpu")
    with pytest.raises(MsfmInputError, match="pre_normalized"):
        gest.train(tissue, tmp_path / "typo", pre_normalised=True)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(MsfmInputError, match="min_panel_fraction"):
        gest.embed(tissue, model, min_panel_fraction=2.0, device="cpu")


def test_gene_mapping_options_reach_the_model_genes(run, tissue) -> None:
    _, model = run
    genes = gest.load(model, device="cpu").vocab.genes
    renamed = tissue.copy()
    renamed.var["my_genes"] = renamed.var_names.astype(str)
    renamed.var_names = [f"id{i}" for i in range(renamed.n_vars)]
    with pytest.raises(MsfmInputError, match="min_panel_fraction"):
        gest.embed(renamed, model, max_cells=8, device="cpu", progress=False)
    out = gest.embed(renamed, model, gene_column="my_genes", max_cells=8, device="cpu", progress=False)
    assert out.uns["gest"]["embed"]["gene_mapping"]["n_mapped"] == len(genes)
    # Half the genes missing passes with a lower min_panel_fraction (the missing ones read as 0).
    half = tissue[:, [g for g in tissue.var_names if g not in set(genes[: len(genes) // 2 + 1])]].copy()
    with pytest.raises(MsfmInputError, match="genes were found"):
        gest.embed(half, model, device="cpu")
    gest.embed(half, model, min_panel_fraction=0.3, max_cells=8, device="cpu", progress=False)


def test_paths_in_and_out(run, tissue, held, tmp_path) -> None:
    _, model = run
    src = tmp_path / "tissue.h5ad"
    with_held = tissue.copy()
    with_held.obs["held"] = held
    with_held.write_h5ad(src)
    out = tmp_path / "gen.h5ad"
    gen = gest.generate(src, model, query="held", device="cpu", progress=False, out=out)
    written = ad.read_h5ad(out)
    assert written.shape == gen.shape == (int(held.sum()), 60)
    assert written.uns["gest"]["generate"]["mode"] == "pick"
    with pytest.raises(MsfmInputError, match="already exists"):
        gest.generate(src, model, query="held", device="cpu", out=out)
    with pytest.raises(MsfmInputError, match="input"):
        gest.generate(src, model, query="held", device="cpu", out=src, overwrite=True)
    emb = gest.embed(src, model, max_cells=8, device="cpu", progress=False, out=tmp_path / "emb.h5ad")
    assert "X_gest" in ad.read_h5ad(tmp_path / "emb.h5ad").obsm
    assert "X_gest" in emb.obsm
    assert "X_gest" not in ad.read_h5ad(src).obsm
    with pytest.raises(MsfmInputError, match="booleans"):
        gest.generate(src, model, query="domain", device="cpu")


def test_old_names_warn_and_still_work(run, tissue, held, tmp_path) -> None:
    _, model = run
    with pytest.warns(DeprecationWarning, match=r"msfm\.gest\.load"):
        loaded = gest.load_model(model, device="cpu")
    assert isinstance(loaded, Loaded)
    with pytest.warns(DeprecationWarning, match="Loaded"):
        assert gest.LoadedGest is Loaded
    with pytest.warns(DeprecationWarning, match="GestPerturbation"):
        assert gest.PerturbationResult is gest.GestPerturbation
    with pytest.warns(DeprecationWarning, match="evaluate"):
        ev = gest.evaluate_generation(
            tissue, model, held_out=held, baselines=("mean",), modes=("pick",), n_top_genes=10, device="cpu"
        )
    assert list(ev.table.index) == ["gest_pick", "mean"]
    old_cfg = gest.NicheClassifierConfig(
        label_key="domain", max_cells=8, trainer=TrainerOptions(max_steps=2, **OPTS)
    )
    assert old_cfg.labels_key == "domain"
    with pytest.warns(DeprecationWarning, match="fit_classifier"):
        path = gest.train_niche_classifier(tissue, model, tmp_path / "clf", old_cfg)
    assert path == tmp_path / "clf" / "model"
    with pytest.warns(DeprecationWarning, match="predict"):
        assert gest.annotate_niches(tissue.copy(), path, device="cpu") is None
    with pytest.warns(DeprecationWarning, match="predict"):
        out = gest.annotate_niches(tissue, path, device="cpu", copy=True)
    assert "gest_domain" in out.obs


def test_settings_files_and_fine_tuning(run, tissue, tmp_path) -> None:
    _, model = run
    # Older settings files hold reading options at the top level; they land in `read`.
    cfg = tmp_path / "gest.yaml"
    cfg.write_text(
        "preset: gest-tiny\nn_genes: 60\nn_metacells: 24\nn_pcs: 10\nlevels: [6, 3]\nside_um: 150\n"
        "max_cells: 48\nbatch_size: 4\nduplicates: keep\noptim: {lr: 0.001}\n"
        "trainer: {progress_bar: false, model_summary: false, accelerator: cpu, checkpoint_every_n_steps: 2}\n"
    )
    res = gest.train(tissue, tmp_path / "fromfile", config=cfg, max_steps=2, seed=3)
    record = json.loads((tmp_path / "fromfile" / "config.json").read_text())
    assert record["run"]["read"]["duplicates"] == "keep"
    assert record["run"]["optim"]["lr"] == 0.001
    assert record["run"]["optim"]["warmup_steps"] == 100  # the section default of GestTrainConfig stands
    assert record["run"]["seed"] == 3
    assert record["trainer"]["seed"] == 3
    assert res.metrics["global_step"] == 2
    # Fine-tuning: start from the pretrained weights and vocabulary; the caller's Loaded is not changed.
    loaded = gest.load(model, device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tuned = gest.train(tissue, tmp_path / "tuned", checkpoint=loaded, config=config(steps=2))
    after = gest.load(tuned, device="cpu")
    assert after.vocab.genes == loaded.vocab.genes
    np.testing.assert_array_equal(after.vocab.centroids_pca, loaded.vocab.centroids_pca)
    assert after.extra["init_from"] == str(model.checkpoint)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(MsfmInputError, match="not both"):
        gest.train(tissue, tmp_path / "both", train_mask=np.ones(tissue.n_obs, bool), held_out=np.arange(3))
