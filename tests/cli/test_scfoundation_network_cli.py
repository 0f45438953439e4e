"""``msfm scfoundation gene-network`` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import torch

import msfm
from cli_runner import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(cells .h5ad, tiny random backbone, GMT file)."""
    from msfm.models.scfoundation.model import ScFoundation
    from msfm.models.scfoundation.pretraining import resolve_panel
    from msfm.models.scfoundation.provenance import preprocessing_record
    from msfm.registry import preset_config
    from msfm.runtime.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("gn_cli")
    pbmc = msfm.datasets.pbmc68k()
    data = root / "cells.h5ad"
    pbmc.write_h5ad(data)
    panel = resolve_panel("data", [pbmc])
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": len(panel)})
    torch.manual_seed(0)
    backbone = save_checkpoint(
        root / "bb",
        family="scfoundation",
        config=cfg,
        state_dict=ScFoundation(cfg).state_dict(),
        gene_panel=list(panel.symbols),
        preprocessing=preprocessing_record(),
    )
    gmt = root / "sets.gmt"
    gmt.write_text(
        "MYELOID\tmarkers\tLYZ\tS100A8\tS100A9\tFCN1\tTYROBP\tLST1\tAIF1\tFCER1G\tCTSS\n"
        "NK\tmarkers\tGNLY\tNKG7\tGZMB\tPRF1\tGZMA\tCST7\tCTSW\tGZMH\n",
        encoding="utf-8",
    )
    return data, backbone, gmt


def test_gene_network_cli_writes_genes_and_table(inputs, tmp_path, capsys):
    data, backbone, gmt = inputs
    out = tmp_path / "net.h5ad"
    genes = "LYZ,S100A8,S100A9,FCN1,TYROBP,LST1,AIF1,FCER1G,CTSS,GNLY,NKG7,GZMB,PRF1,GZMA,CST7,CTSW,GZMH,CD3E,IL7R,CCR7"
    code = run_cli(
        "scfoundation", "gene-network", data, "-c", backbone, "-o", out,
        "--genes", genes, "--cells-where", "cell_type=CD14+ Monocyte,CD56+ NK", "--gene-sets", gmt,
        "--n-neighbors", 4, "--min-module-size", 3, "--batch-size", 16, "--device", "cpu", "--quiet",
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = ad.read_h5ad(out)
    assert list(result.obs_names) == genes.split(",")
    assert result.obsm["X_scfoundation"].shape == (20, 32)
    rec = result.uns["scfoundation"]["gene_network"]
    pbmc = msfm.datasets.pbmc68k()
    assert rec["params"]["n_cells"] == int(pbmc.obs.cell_type.isin(["CD14+ Monocyte", "CD56+ NK"]).sum())
    table = pd.read_csv(out.with_name("net.enrichment.csv"))
    assert set(table.gene_set) <= {"MYELOID", "NK"}
    assert set(table.method) == {"context", "coexpression"}
    assert "coexpression:" in printed
    assert "net.enrichment.csv" in printed


def test_gene_network_cli_bad_inputs_exit_2(inputs, tmp_path, capsys):
    data, backbone, _ = inputs
    bad = tmp_path / "bad.gmt"
    bad.write_text("ISG ISG15 MX1\n", encoding="utf-8")
    code = run_cli(
        "scfoundation", "gene-network", data, "-c", backbone, "-o", tmp_path / "o.h5ad", "--gene-sets", bad
    )
    assert code == 2
    assert "line 1" in capsys.readouterr().err
    code = run_cli(
        "scfoundation",
        "gene-network",
        data,
        "-c",
        backbone,
        "-o",
        tmp_path / "o.h5ad",
        "--cells-where",
        "cell_type",
    )
    assert code == 2
    assert "COLUMN=VALUE" in capsys.readouterr().err
    code = run_cli(
        "scfoundation", "gene-network", data, "-c", backbone, "-o", tmp_path / "o.h5ad",
        "--cells-where", "cell_type=Martian", "--embedding", "input", "--quiet",
    )  # fmt: skip
    assert code == 2
    assert "selects no cell" in capsys.readouterr().err
