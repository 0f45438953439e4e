"""``msfm scfoundation drug-fit | drug-predict | sensitivity-fit | sensitivity-predict`` through msfm.cli.main, on
CONSTRUCTED data (msfm.datasets.constructed_drugs)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cli_runner import run_cli
from msfm.datasets.constructed_drugs import constructed_drug_response, constructed_sensitivity

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
TRAIN = ("--max-epochs", 1, "--batch-size", 16, "--accelerator", "cpu", "--quiet")


def test_drug_commands_end_to_end(tmp_path, capsys):
    data = constructed_drug_response(n_cell_lines=10, drugs=["Sorafenib", "Cisplatin", "Olaparib"], seed=2)
    rng = np.random.default_rng(0)
    data.expression.obsm["X_rep"] = rng.normal(size=(10, 6)).astype(np.float32)
    data.expression.write_h5ad(tmp_path / "bulk.h5ad")
    data.responses.rename(columns={"ln_ic50": "LN_IC50"}).to_csv(tmp_path / "resp.tsv", sep="\t", index=False)
    data.drugs.to_csv(tmp_path / "drugs.csv", index=False)
    common = (tmp_path / "bulk.h5ad", "--responses", tmp_path / "resp.tsv", "--drugs", tmp_path / "drugs.csv")
    rc = run_cli("scfoundation", "drug-fit", *common, "--use-rep", "X_rep", "--folds", 2,
                 "--fingerprint-bits", 64, "-o", tmp_path / "m", *TRAIN)  # fmt: skip
    assert rc == 0
    assert "per_drug_mean: pcc" in capsys.readouterr().out
    assert (tmp_path / "m" / "metrics.csv").exists()
    rc = run_cli("scfoundation", "drug-predict", tmp_path / "bulk.h5ad", "-c", tmp_path / "m",
                 "--use-rep", "X_rep", "-o", tmp_path / "p.h5ad", "--quiet")  # fmt: skip
    assert rc == 0
    out = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(pd.DataFrame(out.obsm["scfoundation_ic50"]).columns) == ["Sorafenib", "Cisplatin", "Olaparib"]
    # a bad SMILES: one line, exit 2, nothing written
    data.drugs.assign(smiles=["C1CC(", "N.N.Cl[Pt]Cl", "CCO"]).to_csv(tmp_path / "bad.csv", index=False)
    rc = run_cli("scfoundation", "drug-fit", tmp_path / "bulk.h5ad", "--responses", tmp_path / "resp.tsv",
                 "--drugs", tmp_path / "bad.csv", "--use-rep", "X_rep", "-o", tmp_path / "m2", *TRAIN)  # fmt: skip
    assert rc == 2
    assert "do not parse" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_sensitivity_commands_end_to_end(tmp_path, capsys):
    bulk, cells = constructed_sensitivity("PLX4720", n_cell_lines=12, seed=2)
    cells = cells[:30].copy()
    rng = np.random.default_rng(0)
    bulk.obsm["X_rep"] = rng.normal(size=(12, 6)).astype(np.float32)
    cells.obsm["X_rep"] = rng.normal(size=(30, 6)).astype(np.float32)
    bulk.write_h5ad(tmp_path / "bulk.h5ad")
    cells.write_h5ad(tmp_path / "cells.h5ad")
    rc = run_cli("scfoundation", "sensitivity-fit", tmp_path / "bulk.h5ad", "--single-cells", tmp_path / "cells.h5ad",
                 "--bulk-labels-key", "sensitive", "--sc-labels-key", "sensitive", "--use-rep", "X_rep",
                 "--folds", 2, "-o", tmp_path / "m", *TRAIN)  # fmt: skip
    assert rc == 0
    assert "logistic: bulk_auroc" in capsys.readouterr().out
    rc = run_cli("scfoundation", "sensitivity-predict", tmp_path / "cells.h5ad", "-c", tmp_path / "m",
                 "-o", tmp_path / "p.h5ad", "--quiet")  # fmt: skip
    assert rc == 0
    out = ad.read_h5ad(tmp_path / "p.h5ad")
    assert {"scfoundation_sensitive", "scfoundation_sensitivity_confidence"} <= set(out.obs)
