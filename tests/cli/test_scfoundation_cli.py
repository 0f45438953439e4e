"""`msfm scfoundation ...` (and the top-level `msfm` command), end to end on the official fixture checkpoint and real
bundled cells."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from msfm.cli import main
from sf_official import official_cells_h5ad

FIX = Path(__file__).parents[1] / "fixtures" / "scfoundation"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(*args: str) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIX / "tiny_official_io.safetensors")


@pytest.fixture(scope="module")
def cells_h5ad(tmp_path_factory) -> Path:
    return official_cells_h5ad(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "sf_gene"
    assert run("scfoundation", "convert", FIX / "tiny_official.ckpt", "--variant", "gene", "--out", out) == 0
    return out


def test_version_and_help(capsys):
    assert run("version") == 0
    assert capsys.readouterr().out.strip()
    assert run("--help") == 0
    assert "scfoundation" in capsys.readouterr().out


def test_embed_h5ad_matches_official(ckpt, cells_h5ad, io, tmp_path):
    out = tmp_path / "emb.h5ad"
    code = run(
        "scfoundation",
        "embed",
        cells_h5ad,
        "-c",
        ckpt,
        "--out",
        out,
        "--batch-size",
        "4",
        "--no-aliases",
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0
    res = ad.read_h5ad(out)
    np.testing.assert_allclose(res.obsm["X_scfoundation"], io["cell_emb.all.t4"], atol=1e-4, rtol=1e-4)


def test_embed_csv_input(ckpt, cells_h5ad, io, tmp_path):
    a = ad.read_h5ad(cells_h5ad)
    csv = tmp_path / "cells.csv"
    import pandas as pd

    pd.DataFrame(a.X.toarray(), index=a.obs_names, columns=a.var_names).to_csv(csv)
    out = tmp_path / "emb.h5ad"
    assert (
        run(
            "scfoundation",
            "embed",
            csv,
            "-c",
            ckpt,
            "-o",
            out,
            "--pool",
            "max",
            "--no-aliases",
            "--quiet",
            "--key-added",
            "sf",
        )
        == 0
    )
    res = ad.read_h5ad(out)
    np.testing.assert_allclose(res.obsm["X_sf"], io["cell_emb.max.t4"], atol=1e-4, rtol=1e-4)
    assert res.uns["sf"]["embed"]["params"]["pool"] == "max"


def _panel_columns(symbols) -> np.ndarray:
    from msfm.data import GenePanel

    index = {s: i for i, s in enumerate(GenePanel.scfoundation().symbols)}
    return np.array([index[g] for g in symbols])


def test_enhance_matches_official_gene_expression(ckpt, cells_h5ad, io, tmp_path):
    """`msfm scfoundation enhance` writes the official `gene_expression` output (variant `gene`, T = 4)."""
    out = tmp_path / "enh.h5ad"
    assert (
        run(
            "scfoundation",
            "enhance",
            cells_h5ad,
            "-c",
            ckpt,
            "-o",
            out,
            "--target-depth",
            "t4",
            "--batch-size",
            "4",
            "--no-aliases",
            "--quiet",
        )
        == 0
    )
    res = ad.read_h5ad(out)
    enhanced = np.asarray(res.layers["scfoundation_enhanced"])
    mapped = res.var["scfoundation_enhanced_mapped"].to_numpy()
    assert enhanced.shape == res.shape == (6, 765)
    assert int(mapped.sum()) == 691
    # fixture README: atol = rtol = 1e-4 for every output (18x the largest deviation observed)
    np.testing.assert_allclose(
        enhanced[:, mapped],
        io["gene_expression.t4"][:, _panel_columns(res.var_names[mapped])],
        atol=1e-4,
        rtol=1e-4,
    )
    assert not enhanced[:, ~mapped].any()
    np.testing.assert_array_equal(res.X.toarray(), io["source_counts"])  # the counts travel unchanged
    assert res.uns["scfoundation"]["enhance"]["params"]["target_depth"] == "t4"


def test_embed_genes_matches_official_gene_embeddings(ckpt, cells_h5ad, io, tmp_path):
    """`msfm scfoundation embed-genes` (and its old name `gene-embed`) writes the official `gene_emb.t4`."""
    import h5py

    genes = ["CD3E", "LYZ", "ACTB", "A1BG"]  # A1BG: on the panel, zero in these cells
    cell_ids = json.loads(safe_open(FIX / "tiny_official_io.safetensors", "np").metadata()["cell_ids"])
    expected = io["gene_emb.t4"][:, _panel_columns(genes)]  # the fixture holds cells 0 and 1
    for command in ("embed-genes", "gene-embed"):
        h5 = tmp_path / f"{command}.h5"
        assert (
            run(
                "scfoundation",
                command,
                cells_h5ad,
                "-c",
                ckpt,
                "-o",
                h5,
                "--genes",
                ",".join(genes),
                "--cells",
                f"{cell_ids[0]},{cell_ids[1]}",
                "--target-depth",
                "t4",
                "--no-aliases",
                "--quiet",
            )
            == 0
        )
        with h5py.File(h5) as f:
            assert f["embeddings"].shape == (2, 4, 16)
            np.testing.assert_allclose(f["embeddings"][:], expected, atol=1e-4, rtol=1e-4)
            assert [g.decode() for g in f["genes"][:]] == genes
            assert [c.decode() for c in f["cells"][:]] == cell_ids[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed-genes.h5", "gene-embed.h5"]  # no debris


def test_errors_exit_2_with_a_message(ckpt, cells_h5ad, tmp_path, capsys):
    assert run("scfoundation", "embed", tmp_path / "missing.h5ad", "-c", ckpt, "-o", tmp_path / "o.h5ad") == 2
    assert "error:" in capsys.readouterr().err
    bad = ad.read_h5ad(cells_h5ad)
    bad.X = -bad.X
    bad_path = tmp_path / "bad.h5ad"
    bad.write_h5ad(bad_path)
    assert run("scfoundation", "embed", bad_path, "-c", ckpt, "-o", tmp_path / "o.h5ad", "--quiet") == 2
    err = capsys.readouterr().err
    assert "negative" in err
    # never overwrite: the output exists and --overwrite was not given
    (tmp_path / "exists.h5ad").write_bytes(b"x")
    assert run("scfoundation", "embed", cells_h5ad, "-c", ckpt, "-o", tmp_path / "exists.h5ad") == 2
    assert (tmp_path / "exists.h5ad").read_bytes() == b"x"
    assert (
        run("scfoundation", "embed", cells_h5ad, "-c", FIX / "tiny_official.ckpt", "-o", tmp_path / "z.h5ad")
        == 2
    )
    assert "convert" in capsys.readouterr().err
    assert (
        run("scfoundation", "convert", FIX / "tiny_official.ckpt", "--variant", "bogus", "-o", tmp_path / "c")
        == 2
    )


def test_datasets_train_fit_classifier_predict(tmp_path):
    data = tmp_path / "pbmc.h5ad"
    assert run("datasets", "export", "pbmc68k", "--out", data) == 0
    small = ad.read_h5ad(data)[:120].copy()
    small.write_h5ad(data)
    run_dir = tmp_path / "run"
    assert (
        run(
            "scfoundation",
            "train",
            data,
            "--out",
            run_dir,
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--accelerator",
            "cpu",
            "--devices",
            "1",
            "--gene-panel",
            "data",
            "--quiet",
        )
        == 0
    )
    model = run_dir / "model"
    assert (model / "model.safetensors").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["batch_size"] == 4
    assert config["trainer"]["max_steps"] == 2
    clf = tmp_path / "clf"
    assert (
        run(
            "scfoundation",
            "fit-classifier",
            data,
            "-c",
            model,
            "--labels-key",
            "cell_type",
            "-o",
            clf,
            "--max-epochs",
            "1",
            "--accelerator",
            "cpu",
            "--quiet",
        )
        == 0
    )
    pred = tmp_path / "pred.h5ad"
    assert run("scfoundation", "predict", data, "-c", clf, "-o", pred, "--device", "cpu", "--quiet") == 0
    res = ad.read_h5ad(pred)
    assert {"scfoundation_cell_type", "scfoundation_confidence"} <= set(res.obs.columns)
    assert res.obsm["scfoundation_probs"].shape[0] == res.n_obs
    assert res.uns["scfoundation"]["predict"]["params"]["labels_key"] == "cell_type"
    assert run("datasets", "export", "nope", "--out", tmp_path / "n.h5ad") == 2


def test_train_config_file_and_preset(tmp_path):
    data = tmp_path / "pbmc.h5ad"
    import msfm

    msfm.datasets.pbmc68k()[:40].copy().write_h5ad(data)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "batch_size: 3\ngene_panel: data\ntrainer:\n  max_steps: 1\n  accelerator: cpu\n  devices: 1\n"
    )
    run_dir = tmp_path / "run"
    assert (
        run(
            "scfoundation",
            "train",
            data,
            "-o",
            run_dir,
            "--config",
            cfg,
            "--preset",
            "scfoundation-fixture",
            "--quiet",
        )
        == 0
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["batch_size"] == 3  # from the file
    assert config["run"]["preset"] == "scfoundation-fixture"  # from the command line
    assert json.loads((run_dir / "model" / "config.json").read_text())["config"]["encoder_dim"] == 32


def test_old_command_names_are_hidden_aliases(ckpt, cells_h5ad, tmp_path, capsys):
    from typer.main import get_command

    from msfm.cli.scfoundation import app

    commands = get_command(app).commands
    assert all(commands[old].hidden for old in ("pretrain", "gene-embed", "fit"))
    h5 = tmp_path / "genes.h5"
    assert (
        run("scfoundation", "gene-embed", cells_h5ad, "-c", ckpt, "-o", h5, "--genes", "CD3E", "--quiet") == 0
    )
    assert "use `msfm scfoundation embed-genes`" in capsys.readouterr().err
    assert h5.is_file()


@pytest.mark.slow  # 22 s in the full run (two spawned processes)
@pytest.mark.distributed
def test_embed_two_process_ddp_matches_single(ckpt, cells_h5ad, io, tmp_path):
    """`--devices 2` on CPU: Lightning starts a second rank; rank 0 merges the shards in file order."""
    import os
    import subprocess
    import sys

    import msfm

    out = tmp_path / "ddp.h5ad"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(Path(msfm.__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "msfm",
        "scfoundation",
        "embed",
        str(cells_h5ad),
        "-c",
        str(ckpt),
        "-o",
        str(out),
        "--devices",
        "2",
        "--accelerator",
        "cpu",
        "--batch-size",
        "2",
        "--no-aliases",
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = ad.read_h5ad(out)
    np.testing.assert_allclose(res.obsm["X_scfoundation"], io["cell_emb.all.t4"], atol=1e-4, rtol=1e-4)
    assert not res.obs["scfoundation_zero_count"].any()
    assert not (tmp_path / ".ddp.h5ad.parts").exists()


def test_usage_errors_exit_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    # typer vendors its own click: its usage errors must be caught like click's.
    assert run("scfoundation", "embed", "--no-such-option") == 2
    assert "No such option" in capsys.readouterr().err
    assert run("scfoundation", "embed") == 2
