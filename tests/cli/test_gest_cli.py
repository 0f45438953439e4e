"""`msfm gest ...` end to end on a tiny semi-real tissue, in temporary folders (one tiny model trained once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cli_runner import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIDE = 400.0
TRAIN_ARGS = (
    "--preset", "gest-tiny", "--max-steps", 4, "--n-genes", 50, "--n-metacells", 16, "--n-pcs", 10, "--levels", "4,2",
    "--side-um", 150, "--max-cells", 64, "--batch-size", 4, "--checkpoint-every", 2, "--accelerator", "cpu",
    "--devices", "1", "--quiet",
)  # fmt: skip


run = run_cli


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a busy 2-core machine spinning
    OpenMP workers make every forward pass many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tissue(tmp_path_factory) -> Path:
    from msfm.datasets import semi_real_tissue

    a = semi_real_tissue(n_cells=300, n_domains=3, side_um=SIDE, seed=0)
    xy = a.obsm["spatial"]
    # A held-out square in one corner (unseen in training) and a second, string-valued boolean column.
    a.obs["held"] = (xy[:, 0] > 300) & (xy[:, 1] > 300)
    a.obs["region_flag"] = np.where((np.abs(xy - SIDE / 2) < 50).all(axis=1), "true", "false")
    a.obs["source_cell"] = a.obs["source_cell"].astype(str)
    path = tmp_path_factory.mktemp("tissue") / "tissue.h5ad"
    a.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained(tissue, tmp_path_factory) -> tuple[Path, str]:
    """(model directory, train command output), trained once for the module."""
    out = tmp_path_factory.mktemp("runs") / "gest"
    capture = _Capture()
    with capture:
        code = run("gest", "train", tissue, "--out", out, "--hold-out-column", "held", *TRAIN_ARGS)
    assert code == 0, capture.text
    return out / "model", capture.text


class _Capture:
    """Capture stdout/stderr of a block inside a module fixture (capsys is function-scoped)."""

    def __enter__(self) -> _Capture:
        import contextlib
        import io

        self._buf = io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._buf))
        self._stack.enter_context(contextlib.redirect_stderr(self._buf))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self.text = self._buf.getvalue()


def _model_genes(model: Path) -> list[str]:
    import msfm

    return list(msfm.gest.load(model, device="cpu").vocab.genes)


def test_help_lists_all_verbs(capsys):
    assert run("gest", "--help") == 0
    text = capsys.readouterr().out
    for verb in ("train", "generate", "embed", "perturb", "evaluate", "fit-classifier", "predict"):
        assert verb in text
    assert run("--help") == 0
    assert "gest" in capsys.readouterr().out


def test_train_writes_a_model_and_resumes(trained, tissue, tmp_path, capsys):
    model, text = trained
    assert "model written to" in text
    held = ad.read_h5ad(tissue).obs["held"].to_numpy()
    assert f"trained on {int((~held).sum())} of {held.size} cells" in text
    assert (model / "model.safetensors").is_file()
    meta = json.loads((model / "meta.json").read_text())
    assert meta["extra"]["n_train_cells"] == int((~held).sum())
    assert meta["extra"]["window"]["side_um"] == 150.0
    assert len(_model_genes(model)) == 50
    cfg = json.loads((model.parent / "config.json").read_text())
    assert cfg["run"]["n_metacells"] == 16
    assert cfg["run"]["levels"] == [4, 2]
    assert cfg["trainer"]["max_steps"] == 4
    # The same command again finds the finished run and resumes it (no new steps). Settings from --config are
    # merged under the command-line flags (n_pcs and lr from the flags, warmup_steps from the file).
    cfg_file = tmp_path / "gest.yaml"
    cfg_file.write_text("n_pcs: 99\noptim: {lr: 0.5, warmup_steps: 3}\n")
    before = sha256(model / "model.safetensors")
    config_before = (model.parent / "config.json").read_bytes()
    args = ("gest", "train", tissue, "--out", model.parent, "--hold-out-column", "held", *TRAIN_ARGS,
            "--config", cfg_file, "--lr", 0.001)  # fmt: skip
    # Other settings than the run started with: refused, naming them, nothing rewritten.
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert "optim.lr 0.0003 -> 0.001" in err
    assert "optim.warmup_steps 100 -> 3" in err
    assert (model.parent / "config.json").read_bytes() == config_before
    # --allow-config-change accepts them and records a new version, keeping the original one.
    code = run(*args, "--allow-config-change")
    assert code == 0
    assert "resuming" in capsys.readouterr().out
    assert sha256(model / "model.safetensors") == before
    rec = json.loads((model.parent / "config.json").read_text())
    assert rec["run"]["n_pcs"] == 10
    assert rec["run"]["optim"]["lr"] == 0.001
    assert rec["run"]["optim"]["warmup_steps"] == 3
    assert rec["run"]["trainer"]["max_steps"] == 4
    first, second = rec["versions"]
    assert first["run"]["optim"]["lr"] == 0.0003
    assert first["started_at_step"] == 0
    assert second["changed"]["run.optim.lr"] == [0.0003, 0.001]
    assert second["started_at_step"] == 4
    # Unknown or invalid settings stop before any data is read.
    cfg_file.write_text("n_pcs: 10\nnot_a_field: 1\n")
    assert run("gest", "train", tissue, "--out", tmp_path / "r", "--config", cfg_file) == 2
    assert "not_a_field" in capsys.readouterr().err
    assert run("gest", "train", tissue, "--out", tmp_path / "r", "--order", "spiral") == 2
    assert "order" in capsys.readouterr().err
    assert run("gest", "train", tissue, "--out", tmp_path / "r", "--levels", "15,x") == 2
    assert "--levels" in capsys.readouterr().err


def test_generate_query_and_positions(trained, tissue, tmp_path, capsys):
    model, _ = trained
    digest = sha256(tissue)
    out = tmp_path / "gen.h5ad"
    assert run("gest", "generate", tissue, "-c", model, "--out", out, "--query-column", "held",
               "--device", "cpu") == 0  # fmt: skip
    gen = ad.read_h5ad(out)
    src = ad.read_h5ad(tissue)
    held = src.obs["held"].to_numpy()
    assert gen.shape == (int(held.sum()), 50)
    assert list(gen.obs_names) == list(src.obs_names[held])
    assert {"gest_token", "gest_token_prob", "gest_round"} <= set(gen.obs.columns)
    assert gen.obs["gest_token"].between(0, 15).all()
    np.testing.assert_allclose(gen.obsm["spatial"], src.obsm["spatial"][held])
    assert gen.uns["gest"]["generate"]["mode"] == "pick"
    assert sha256(tissue) == digest

    # An existing output is refused without --overwrite, replaced with it.
    capsys.readouterr()
    assert run("gest", "generate", tissue, "-c", model, "--out", out, "--query-column", "held") == 2
    assert "already exists" in capsys.readouterr().err
    assert run("gest", "generate", tissue, "-c", model, "--out", out, "--query-column", "held",
               "--mode", "weighted", "--overwrite", "--no-cache", "--device", "cpu") == 0  # fmt: skip
    assert ad.read_h5ad(out).uns["gest"]["generate"]["mode"] == "weighted"

    # Writing over the input is refused even with --overwrite.
    assert run("gest", "generate", tissue, "-c", model, "--out", tissue, "--query-column", "held",
               "--overwrite") == 2  # fmt: skip
    assert "input" in capsys.readouterr().err
    assert sha256(tissue) == digest

    pos = tmp_path / "pos.csv"
    pd.DataFrame({"x": [200.0, 210.0, 190.5], "y": [200.0, 195.0, 220.0]}).to_csv(pos, index=False)
    out2 = tmp_path / "new.h5ad"
    assert run("gest", "generate", tissue, "-c", model, "--out", out2, "--positions", pos,
               "--device", "cpu") == 0  # fmt: skip
    new = ad.read_h5ad(out2)
    assert new.shape == (3, 50)
    np.testing.assert_allclose(new.obsm["spatial"], [[200.0, 200.0], [210.0, 195.0], [190.5, 220.0]])


def test_generate_input_errors(trained, tissue, tmp_path, capsys):
    model, _ = trained
    out = tmp_path / "g.h5ad"
    pos = tmp_path / "pos.csv"
    pd.DataFrame({"x": [1.0], "y": [2.0]}).to_csv(pos, index=False)
    assert run("gest", "generate", tissue, "-c", model, "--out", out) == 2
    assert "exactly one of query" in capsys.readouterr().err
    assert run("gest", "generate", tissue, "-c", model, "--out", out, "--query-column", "held",
               "--positions", pos) == 2  # fmt: skip
    assert "exactly one of query" in capsys.readouterr().err
    assert run("gest", "generate", tissue, "-c", model, "--out", out, "--query-column", "nope") == 2
    err = capsys.readouterr().err
    assert "'nope' is not an obs column" in err
    assert "domain" in err
    # A column that is not boolean is refused with its values.
    assert run("gest", "generate", tissue, "-c", model, "--out", out, "--query-column", "domain") == 2
    assert "must hold booleans" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(bad, index=False)
    assert run("gest", "generate", tissue, "-c", model, "--out", out, "--positions", bad) == 2
    assert "needs columns x and y" in capsys.readouterr().err
    assert not out.exists()


def test_embed_with_kmeans(trained, tissue, tmp_path):
    model, _ = trained
    out = tmp_path / "emb.h5ad"
    assert run("gest", "embed", tissue, "-c", model, "--out", out, "--cluster", "kmeans",
               "--n-clusters", 3, "--max-cells", 32, "--device", "cpu") == 0  # fmt: skip
    emb = ad.read_h5ad(out)
    src = ad.read_h5ad(tissue)
    assert emb.shape == src.shape
    assert emb.obsm["X_gest"].shape == (300, 64)
    assert np.isfinite(emb.obsm["X_gest"]).all()
    assert emb.obs["gest_niche"].nunique() == 3
    assert {"domain", "cell_type", "held"} <= set(emb.obs.columns)
    assert "counts" in emb.layers
    assert emb.uns["gest"]["embed"]["max_cells"] == 32
    assert emb.uns["gest"]["cluster_niches"]["n_clusters"] == 3
    assert (
        run("gest", "embed", tissue, "-c", model, "--out", tmp_path / "e2.h5ad", "--cluster", "kmeans") == 2
    )


def test_perturb_writes_a_folder(trained, tissue, tmp_path, capsys):
    model, _ = trained
    digest = sha256(tissue)
    genes = _model_genes(model)
    out = tmp_path / "pert"
    c0, c1 = SIDE / 2 - 50, SIDE / 2 + 50
    args = ("gest", "perturb", tissue, "-c", model, "--out", out, "--region-box", f"{c0},{c0},{c1},{c1}",
            "--up", genes[0], "--down", genes[1], "--perturb-mode", "continuous", "--device", "cpu")  # fmt: skip
    assert run(*args) == 0
    text = capsys.readouterr().out
    assert "n_region_tokens_changed" in text
    assert {p.name for p in out.iterdir()} == {
        "perturbation.h5ad",
        "report.csv",
        "summary.json",
        "perturbation.png",
    }
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_region_cells"] > 0
    assert summary["n_targets"] > 0
    assert summary["params"]["perturb_mode"] == "continuous"
    # Continuous mode feeds the edited expression itself, so the regenerated cells must move.
    assert summary["mean_abs_change"] > 0
    assert summary["no_op"] is False
    assert summary["params"]["genes_up"] == [genes[0]]
    res = ad.read_h5ad(out / "perturbation.h5ad")
    assert set(res.obs["gest_role"]) == {"region", "target"}
    assert (res.obs["gest_role"] == "region").sum() == summary["n_region_cells"]
    assert {"control", "perturbed"} <= set(res.layers)
    assert list(res.var_names) == genes
    report = pd.read_csv(out / "report.csv", index_col=0)
    assert list(report.index) == genes
    assert "log_fc" in report.columns
    assert (out / "perturbation.png").read_bytes()[:4] == b"\x89PNG"
    assert sha256(tissue) == digest

    # The existing folder is refused; --overwrite replaces it. Region from a boolean column.
    assert run(*args) == 2
    assert "already exists" in capsys.readouterr().err
    assert run("gest", "perturb", tissue, "-c", model, "--out", out, "--region-column", "region_flag",
               "--up", genes[0], "--overwrite", "--device", "cpu") == 0  # fmt: skip
    summary2 = json.loads((out / "summary.json").read_text())
    assert summary2["params"]["perturb_mode"] == "requantize"
    assert summary2["n_region_cells"] == int((ad.read_h5ad(tissue).obs["region_flag"] == "true").sum())
    text = capsys.readouterr().out
    assert f"no_op: {summary2['no_op']}" in text
    # The warning line appears exactly when the requantised edit changed no region token.
    assert ("warning:" in text) == (summary2["n_region_tokens_changed"] == 0)


def test_perturb_input_errors(trained, tissue, tmp_path, capsys):
    model, _ = trained
    genes = _model_genes(model)
    out = tmp_path / "p"
    base = ("gest", "perturb", tissue, "-c", model, "--out", out)
    assert run(*base, "--region-box", "10,20,5", "--up", genes[0]) == 2
    err = capsys.readouterr().err
    assert "--region-box '10,20,5'" in err
    assert "x0,y0,x1,y1" in err
    assert run(*base, "--region-box", "300,10,100,50", "--up", genes[0]) == 2
    assert "x1 > x0" in capsys.readouterr().err
    assert run(*base, "--region-box", "150,150,250,250", "--up", f"{genes[0]},NOTAGENE1") == 2
    err = capsys.readouterr().err
    assert "NOTAGENE1" in err
    assert "genes_up" in err
    assert run(*base, "--region-box", "150,150,250,250") == 2
    assert "Nothing to perturb" in capsys.readouterr().err
    assert run(*base, "--region-box", "150,150,250,250", "--region-column", "held", "--up", genes[0]) == 2
    assert "exactly one region" in capsys.readouterr().err
    poly = tmp_path / "poly.csv"
    pd.DataFrame({"x": [150.0, 250.0], "y": [150.0, 250.0]}).to_csv(poly, index=False)
    assert run(*base, "--region-polygon", poly, "--up", genes[0]) == 2
    assert "k >= 3" in capsys.readouterr().err
    assert run(*base, "--region-box", "5000,5000,6000,6000", "--up", genes[0]) == 2
    assert "contains no cell" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_with_niches(trained, tissue, tmp_path, capsys):
    model, _ = trained
    out = tmp_path / "eval"
    assert run("gest", "evaluate", tissue, "-c", model, "--out", out, "--held-out-column", "held",
               "--baselines", "mean,knn", "--n-top-genes", 20, "--labels-key", "domain", "--n-clusters", 3,
               "--device", "cpu") == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "gest_pick" in text
    assert "expression_pca" in text
    gen = pd.read_csv(out / "generation.csv", index_col=0)
    assert list(gen.index) == ["gest_pick", "gest_weighted", "mean", "knn"]
    assert gen[["rmse_all", "rmse_top"]].notna().all().all()
    niches = pd.read_csv(out / "niches.csv", index_col=0)
    assert set(niches.index) == {"gest", "expression_pca", "niche_mean_pca"}
    assert {"ami", "ari"} <= set(niches.columns)
    assert run("gest", "evaluate", tissue, "-c", model, "--out", tmp_path / "e2",
               "--held-out-column", "held", "--baselines", "mean,svm") == 2  # fmt: skip
    assert "--baselines" in capsys.readouterr().err


def test_fit_classifier_and_predict(trained, tissue, tmp_path, capsys):
    model, _ = trained
    run_dir = tmp_path / "niche"
    assert run("gest", "fit-classifier", tissue, "-c", model, "-o", run_dir, "--labels-key", "domain",
               "--max-steps", 2, "--batch-size", 8, "--max-cells", 16, "--accelerator", "cpu", "--devices", "1",
               "--quiet") == 0  # fmt: skip
    assert "niche classifier written to" in capsys.readouterr().out
    clf = run_dir / "model"
    assert (clf / "model.safetensors").is_file()
    rec = json.loads((run_dir / "config.json").read_text())
    assert rec["run"]["max_cells"] == 16
    assert rec["trainer"]["max_steps"] == 2
    out = tmp_path / "annot.h5ad"
    assert run("gest", "predict", tissue, "-c", clf, "-o", out, "--device", "cpu", "--quiet") == 0
    assert "obs['gest_domain']" in capsys.readouterr().out
    a = ad.read_h5ad(out)
    domains = set(ad.read_h5ad(tissue).obs["domain"].astype(str))
    assert a.n_obs == 300
    assert set(a.obs["gest_domain"].astype(str)) <= domains
    assert a.obsm["gest_probs"].shape == (300, len(domains))
    np.testing.assert_allclose(a.obsm["gest_probs"].sum(1), 1.0, rtol=1e-5)
    assert a.obs["gest_confidence"].between(0, 1).all()
    assert a.uns["gest"]["predict"]["labels_key"] == "domain"
    assert run("gest", "fit-classifier", tissue, "-c", model, "-o", tmp_path / "n2",
               "--labels-key", "nope", "--max-steps", 1) == 2  # fmt: skip
    assert "'nope' is not an obs column" in capsys.readouterr().err
    # A pretrained model is not a classifier.
    assert run("gest", "predict", tissue, "-c", model, "-o", tmp_path / "x.h5ad", "--device", "cpu") == 2
    assert "not a niche classifier" in capsys.readouterr().err


def test_reading_options_reach_the_api(trained, tissue, tmp_path, capsys):
    model, _ = trained
    out = tmp_path / "g.h5ad"
    # --duplicates is checked by the shared option set, --spatial-key reaches the data.
    assert run("gest", "generate", tissue, "-c", model, "-o", out, "--query-column", "held",
               "--duplicates", "merge") == 2  # fmt: skip
    assert "duplicates" in capsys.readouterr().err
    assert run("gest", "generate", tissue, "-c", model, "-o", out, "--query-column", "held",
               "--spatial-key", "nope") == 2  # fmt: skip
    assert "'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_visium_folder_input(trained, tmp_path, capsys):
    import shutil

    from msfm.data.spatial import as_spatial_anndata as read_input
    from msfm.datasets.spatial import visium_folder

    src = visium_folder()
    a = read_input(src)
    assert a.shape == (100, 100)
    assert a.obsm["spatial"].shape == (100, 2)
    # A matrix under another name is found when it is the only .h5 of the folder.
    copy = tmp_path / "outs"
    shutil.copytree(src, copy)
    (copy / "filtered_feature_bc_matrix.h5").rename(copy / "sample_counts.h5")
    assert read_input(copy).shape == (100, 100)
    (copy / "sample_counts.h5").unlink()
    model, _ = trained
    assert run("gest", "embed", copy, "-c", model, "--out", tmp_path / "v.h5ad") == 2
    assert "0 .h5 matrices" in capsys.readouterr().err
    # The folder is read and reaches the model, whose genes it does not have.
    assert run("gest", "embed", src, "-c", model, "--out", tmp_path / "v.h5ad") == 2
    assert "of the model's 50 genes were found" in capsys.readouterr().err
    assert not (tmp_path / "v.h5ad").exists()
