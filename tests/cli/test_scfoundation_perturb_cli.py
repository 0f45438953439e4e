"""``msfm scfoundation perturb-fit | perturb`` through the CLI entry point."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cli_runner import run_cli
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.provenance import preprocessing_record
from msfm.registry import preset_config
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
GENES = [f"G{i}" for i in range(20)]


def _data(path):
    rng = np.random.default_rng(0)
    conds = ["ctrl"] * 16 + [c for c in ("G1+ctrl", "G2+ctrl", "G1+G2") for _ in range(6)]
    x = rng.poisson(3.0, size=(len(conds), len(GENES))).astype(np.float32)
    for i, c in enumerate(conds):
        if "G1" in c:
            x[i, 5] *= 4
        if "G2" in c:
            x[i, 6] = 0
    obs = pd.DataFrame({"perturbation": conds}, index=[f"c{i}" for i in range(len(conds))])
    ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(path)
    return path


def test_perturb_fit_and_perturb_cli(tmp_path, capsys):
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": len(GENES)})
    torch.manual_seed(0)
    bb = save_checkpoint(
        tmp_path / "bb",
        family="scfoundation",
        config=cfg,
        state_dict=ScFoundation(cfg).state_dict(),
        gene_panel=GENES,
        preprocessing=preprocessing_record(),
    )
    data = _data(tmp_path / "cells.h5ad")
    go = tmp_path / "go.tsv"
    go.write_text("gene_a\tgene_b\tweight\nG1\tG2\t0.9\nG2\tG5\t0.5\nG1\tNOT_IN_MODEL\t1\n")
    common = ["--condition-key", "perturbation", "--gene-graph", go, "--quiet"]
    rc = run_cli(
        "scfoundation", "perturb-fit", data, "-c", bb, "-o", tmp_path / "pm", "--test-conditions", "G1+G2",
        "--min-cells", 4, "--max-steps", 3, "--batch-size", 8, "--accelerator", "cpu", "--hidden-dim", 8, *common,
    )  # fmt: skip
    assert rc == 0
    assert "held-out Pearson of the delta: model=" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "pm" / "metrics.csv")
    assert sorted(table["method"]) == ["additive_linear", "mean_shift", "model", "no_change"]
    ckpt = load_checkpoint(tmp_path / "pm")
    assert ckpt.meta["extra"]["gene_graph"] == str(go)
    assert ckpt.state_dict["head.perturbation_edges"].shape == (2, 4)  # the GO edges, both directions
    out = tmp_path / "pred.h5ad"
    rc = run_cli("scfoundation", "perturb", data, "-c", tmp_path / "pm", "-o", out, "--conditions", "G1+G2,G2+ctrl",
                 "--device", "cpu", "--quiet")  # fmt: skip
    assert rc == 0
    pred = ad.read_h5ad(out)
    assert pred.shape == (2, len(GENES))
    assert "control" in pred.layers
    # a bad input is one line and exit 2
    rc = run_cli("scfoundation", "perturb", data, "-c", tmp_path / "pm", "-o", tmp_path / "x.h5ad",
                 "--conditions", "TP53+ctrl", "--device", "cpu", "--quiet")  # fmt: skip
    assert rc == 2
    assert "TP53" in capsys.readouterr().err
