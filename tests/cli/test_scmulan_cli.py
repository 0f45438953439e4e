"""`msfm scmulan ...` end to end on the tiny official fixture checkpoint, in temporary folders."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from safetensors.torch import load_file

from cli_runner import run_cli
from msfm.tokenizers.cell_sentence import CellSentenceVocab

FIX = Path(__file__).parents[1] / "fixtures" / "scmulan"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


run = run_cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "scmulan"
    assert run("scmulan", "convert", FIX / "tiny_official.pt", "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def cells_h5ad(tmp_path_factory) -> Path:
    """The six fixture cells (log1p values over the official genes) as an .h5ad."""
    io = load_file(FIX / "tiny_official_io.safetensors")
    a = ad.AnnData(X=sp.csr_matrix(io["cells.expr_2000"].numpy()))
    a.var_names = CellSentenceVocab.official().genes
    a.obs_names = [f"cell{i}" for i in range(a.n_obs)]
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    a.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def pbmc_h5ad(tmp_path_factory) -> Path:
    from msfm.datasets import pbmc68k

    a = pbmc68k()[:40].copy()
    a.obs = a.obs[["cell_type"]].astype(str).astype("category")
    a.uns = {}
    path = tmp_path_factory.mktemp("pbmc") / "pbmc.h5ad"
    a.write_h5ad(path)
    return path


def test_help_lists_the_commands(capsys):
    assert run("scmulan", "--help") == 0
    text = capsys.readouterr().out
    for verb in (
        "convert",
        "predict",
        "embed",
        "generate",
        "perturb",
        "perturb-screen",
        "next-state",
        "train",
    ):
        assert verb in text
    assert "annotate" not in text  # the old commands are hidden aliases


def test_convert_refuses_existing_output(ckpt, capsys):
    assert run("scmulan", "convert", FIX / "tiny_official.pt", "--out", ckpt) == 2
    assert "already exists" in capsys.readouterr().err
    assert run("scmulan", "convert", FIX / "tiny_official.pt", "--out", ckpt, "--overwrite") == 0


def test_annotate_matches_official_and_guards_input(ckpt, cells_h5ad, tmp_path, capsys):
    io = load_file(FIX / "tiny_official_io.safetensors")
    vocab = CellSentenceVocab.official()
    out = tmp_path / "annotated.h5ad"
    code = run(
        "scmulan",
        "predict",
        cells_h5ad,
        "-c",
        ckpt,
        "-o",
        out,
        "--no-constrained",
        "--min-confidence",
        "0",
        "--pre-normalized",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0
    res = ad.read_h5ad(out)
    fine = [vocab.token(int(i)) for i in io["annot.gen.nonkv.label_ids"][:, 1]]
    assert list(res.obs["scmulan_cell_type_fine"]) == fine
    np.testing.assert_allclose(res.obsm["X_scmulan"], io["annot.embedding"].numpy(), atol=1e-4, rtol=1e-4)
    assert res.uns["scmulan"]["predict"]["cell_type"]["params"]["constrained"] in (False, 0)

    # output == input is refused, and the input is left intact
    before = cells_h5ad.read_bytes()
    assert (
        run("scmulan", "predict", cells_h5ad, "-c", ckpt, "-o", cells_h5ad, "--pre-normalized", "--overwrite")
        == 2
    )
    assert "input" in capsys.readouterr().err
    assert cells_h5ad.read_bytes() == before
    # an existing output needs --overwrite
    assert run("scmulan", "predict", cells_h5ad, "-c", ckpt, "-o", out, "--pre-normalized", "--quiet") == 2
    assert "already exists" in capsys.readouterr().err
    # missing checkpoint: exit 2 with a clear message
    code = run("scmulan", "predict", cells_h5ad, "-c", tmp_path / "nope", "-o", tmp_path / "x.h5ad")
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()


def test_organ_and_embed(ckpt, pbmc_h5ad, tmp_path, capsys):
    out = tmp_path / "organ.h5ad"
    code = run(
        "scmulan",
        "predict",
        pbmc_h5ad,
        "-c",
        ckpt,
        "-o",
        out,
        "--target",
        "organ",
        "--quiet",
        "--key-added",
        "m",
    )
    assert code == 0
    res = ad.read_h5ad(out)
    assert set(res.obs["m_organ"]) <= set(CellSentenceVocab.official().categories["organ"])
    assert "m_organ_confidence" in res.obs
    # the old command still works, with a deprecation note, and gives the same labels
    old = tmp_path / "organ_old.h5ad"
    assert run("scmulan", "organ", pbmc_h5ad, "-c", ckpt, "-o", old, "--quiet", "--key-added", "m") == 0
    assert "deprecated" in capsys.readouterr().err
    assert list(ad.read_h5ad(old).obs["m_organ"]) == list(res.obs["m_organ"])
    emb = tmp_path / "emb.h5ad"
    assert run("scmulan", "embed", pbmc_h5ad, "-c", ckpt, "-o", emb, "--embedding", "mean", "--quiet") == 0
    assert ad.read_h5ad(emb).obsm["X_scmulan"].shape == (40, 64)


def test_generate_prompts_and_errors(ckpt, tmp_path, capsys):
    out = tmp_path / "gen.h5ad"
    code = run(
        "scmulan",
        "generate",
        "organ=Blood,cell_type=T cell",
        "organ=Heart",
        "-c",
        ckpt,
        "--n-per-prompt",
        "2",
        "--max-new-tokens",
        "16",
        "--seed",
        "3",
        "-o",
        out,
        "--quiet",
    )
    assert code == 0
    res = ad.read_h5ad(out)
    assert res.shape == (4, 2000)
    assert list(res.obs["organ"]) == ["Blood", "Blood", "Heart", "Heart"]
    assert res.uns["scmulan"]["generate"]["params"]["seed"] == 3

    table = tmp_path / "prompts.csv"
    pd.DataFrame({"organ": ["Blood", "Lung"], "sex": ["M", ""]}).to_csv(table, index=False)
    out2 = tmp_path / "gen2.h5ad"
    code = run("scmulan", "generate", table, "-c", ckpt, "--greedy", "--max-new-tokens", "8", "-o", out2)
    assert code == 0
    assert ad.read_h5ad(out2).obs["prompt_id"].tolist() == [0, 1]

    assert run("scmulan", "generate", "organ=Bloood", "-c", ckpt, "-o", tmp_path / "bad.h5ad") == 2
    assert "Bloood" in capsys.readouterr().err
    assert run("scmulan", "generate", "organBlood", "-c", ckpt, "-o", tmp_path / "bad.h5ad") == 2
    assert "category=value" in capsys.readouterr().err
    assert run("scmulan", "generate", "-c", ckpt, "-o", tmp_path / "bad.h5ad") == 2
    assert not (tmp_path / "bad.h5ad").exists()


def test_perturb_writes_cells_and_scores(ckpt, pbmc_h5ad, tmp_path, capsys):
    out = tmp_path / "pert"
    code = run(
        "scmulan",
        "perturb",
        "organ=Bone marrow,cell_type=Haematopoietic stem cell",
        "-c",
        ckpt,
        "--genes",
        "SPI1,GATA1",
        "--levels",
        "0,10",
        "--n-cells",
        "3",
        "--max-new-tokens",
        "16",
        "--reference",
        pbmc_h5ad,
        "--group-key",
        "cell_type",
        "--targets",
        "CD14+ Monocyte,CD19+ B",
        "-o",
        out,
        "--quiet",
    )
    assert code == 0
    table = pd.read_csv(out / "scores.csv", index_col=0)
    assert list(table["gene"]) == ["control", "SPI1", "SPI1", "GATA1", "GATA1"]
    assert np.abs(table["score_CD14+ Monocyte"]).le(1).all()
    assert ad.read_h5ad(out / "cells.h5ad").n_obs == 15
    assert run("scmulan", "perturb", "organ=Blood", "-c", ckpt, "--genes", "SPI1", "-o", out) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    screen = tmp_path / "screen"
    code = run(
        "scmulan",
        "perturb-screen",
        "organ=Blood",
        "-c",
        ckpt,
        "--genes",
        "SPI1,CD3E",
        "--n-cells",
        "2",
        "--max-new-tokens",
        "8",
        "-o",
        screen,
        "--quiet",
    )
    assert code == 0
    assert list(pd.read_csv(screen / "scores.csv", index_col=0)["gene"])[-1] == "control"
    bad = tmp_path / "bad"
    code = run("scmulan", "perturb", "organ=Blood", "-c", ckpt, "--genes", "NOTAGENE", "-o", bad)
    assert code == 2
    assert not bad.exists()
    assert "NOTAGENE" in capsys.readouterr().err


def test_next_state(ckpt, pbmc_h5ad, tmp_path):
    out = tmp_path / "next.h5ad"
    code = run("scmulan", "next-state", pbmc_h5ad, "-c", ckpt, "-o", out, "--max-new-tokens", "8", "--quiet")
    assert code == 0
    res = ad.read_h5ad(out)
    assert res.n_obs == 40
    assert list(res.obs["source_cell"]) == list(ad.read_h5ad(pbmc_h5ad).obs_names)


def test_train_and_finetune_then_annotate(ckpt, pbmc_h5ad, tmp_path):
    run_dir = tmp_path / "run"
    common = ("--max-steps", "2", "--batch-size", "4", "--accelerator", "cpu", "--quiet")
    assert (
        run(
            "scmulan",
            "train",
            pbmc_h5ad,
            "--out",
            run_dir,
            "-c",
            ckpt,
            "--expression-weight",
            "2",
            *common,
        )
        == 0
    )
    model = run_dir / "model"
    saved = json.loads((run_dir / "config.json").read_text())
    assert json.dumps(saved).count('"expression_weight": 2.0') == 1
    assert (model / "model.safetensors").is_file()
    out = tmp_path / "ann.h5ad"
    assert (
        run("scmulan", "predict", pbmc_h5ad, "-c", model, "-o", out, "--min-confidence", "0", "--quiet") == 0
    )
    import msfm

    vocab = msfm.scmulan.load(model, device="cpu").vocab
    assert "CD14+ Monocyte" in vocab.categories["cell_type"]  # fine-tuning grew the vocabulary
    labels = set(ad.read_h5ad(out).obs["scmulan_cell_type_fine"])
    assert labels <= set(vocab.categories["cell_type"]) | {"Unclassified"}
