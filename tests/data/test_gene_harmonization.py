"""GenePanel and harmonize_genes: tiers, conflicts, reports, errors, and the pbmc68k numbers."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from msfm.data import GenePanel, harmonize_genes
from msfm.errors import MsfmInputError

PANEL = GenePanel.scfoundation()
QUIET = {"min_panel_fraction": 0.0, "warn_panel_fraction": 0.0}


def test_scfoundation_panel():
    assert len(PANEL) == 19264
    assert PANEL.symbols[:2] == ("A1BG", "A1CF")
    assert PANEL.symbols[-1] == "ZZZ3"
    assert PANEL.index_of("ACTB") == 203
    assert PANEL.index_of("CD3E") == 2581
    assert GenePanel.scfoundation() is PANEL  # cached
    with pytest.raises(MsfmInputError, match="not in the panel"):
        PANEL.index_of("NEAT1")


def test_panel_constructors(tmp_path):
    with pytest.raises(MsfmInputError, match=r"duplicated: \['A'\]"):
        GenePanel(["A", "B", "A"])
    (tmp_path / "p.txt").write_text("A\nB\n\nC\n")
    assert GenePanel.from_file(tmp_path / "p.txt").symbols == ("A", "B", "C")
    pd.DataFrame({"x": [1, 2], "gene_name": ["B", "A"]}).to_csv(tmp_path / "p.tsv", sep="\t", index=False)
    panel = GenePanel.from_file(tmp_path / "p.tsv")
    assert panel.symbols == ("B", "A")
    assert panel == GenePanel.from_symbols(["B", "A"])
    with pytest.raises(MsfmInputError, match="does not exist"):
        GenePanel.from_file(tmp_path / "missing.tsv")


def test_tiers_and_apply():
    var = pd.DataFrame(
        {
            "gene_ids": [
                "ENSG00000075624.17",
                "ENSG00000198851",
                "ENSG00000000000",
                "ENSG00000111640",
                "x",
                "y",
            ]
        },
        index=["ACTB", "some_local_name", "cd3d", "ATP5B", "SEPT7", "NOT_A_GENE"],
    )
    mapping = harmonize_genes(var, PANEL, **QUIET)
    frame = mapping.to_frame()
    assert frame.loc["ACTB"].tolist() == ["ACTB", "exact"]
    assert frame.loc["some_local_name"].tolist() == ["CD3E", "ensembl_id"]
    assert frame.loc["cd3d"].tolist() == ["CD3D", "case_insensitive"]
    assert frame.loc["ATP5B"].tolist() == ["GAPDH", "ensembl_id"]  # the id wins over the (alias) symbol
    assert frame.loc["SEPT7"].tolist() == ["SEPTIN7", "alias"]
    assert frame.loc["NOT_A_GENE", "panel_gene"] is None
    report = mapping.report
    assert report["matched_by_method"] == {
        "exact": 1,
        "ensembl_id": 2,
        "ortholog": 0,
        "case_insensitive": 1,
        "alias": 1,
    }
    assert report["n_unmatched"] == 1
    assert report["unmatched_examples"] == ["NOT_A_GENE"]
    json.dumps(mapping.to_uns())

    x = sp.csr_matrix(np.arange(1, 13, dtype=np.float32).reshape(2, 6))
    out = mapping.apply(x)
    assert out.shape == (2, 19264)
    assert out.dtype == np.float32
    assert out.has_sorted_indices
    assert out[0, PANEL.index_of("ACTB")] == 1
    assert out[1, PANEL.index_of("SEPTIN7")] == 11
    assert out.sum() == x[:, :5].sum()  # the unmatched column is dropped, nothing else changes
    with pytest.raises(MsfmInputError, match=r"5 columns.*6 input genes"):
        mapping.apply(x[:, :5])


def test_aliases_can_be_switched_off():
    mapping = harmonize_genes(["ATP5B", "SEPT7", "ACTB"], PANEL, use_aliases=False, **QUIET)
    assert mapping.n_mapped == 1
    mapping = harmonize_genes(["ATP5B", "SEPT7", "ACTB"], PANEL, **QUIET)
    assert mapping.to_frame()["panel_gene"].tolist() == ["ATP5F1B", "SEPTIN7", "ACTB"]


def test_conflict_keeps_higher_priority(tmp_path):
    mapping = harmonize_genes(["ATP5B", "ATP5F1B", "actb", "ACTB"], PANEL, **QUIET)
    frame = mapping.to_frame()
    assert frame.loc["ATP5F1B", "method"] == "exact"
    assert frame.loc["ATP5B", "panel_gene"] is None
    assert frame.loc["ACTB", "method"] == "exact"
    assert frame.loc["actb", "panel_gene"] is None
    uns = mapping.to_uns()
    adata = ad.AnnData(np.zeros((1, 4), dtype=np.float32))
    adata.uns["scfoundation"] = {"gene_mapping": uns}
    adata.write_h5ad(tmp_path / "u.h5ad")  # the uns form must be h5ad-writable
    back = ad.read_h5ad(tmp_path / "u.h5ad").uns["scfoundation"]["gene_mapping"]
    assert set(back["conflicts"]["dropped"]) == {"ATP5B", "actb"}
    conflicts = {c["dropped"]: c for c in mapping.report["conflicts"]}
    assert conflicts["ATP5B"] == {
        "panel_gene": "ATP5F1B",
        "kept": "ATP5F1B",
        "kept_method": "exact",
        "dropped": "ATP5B",
        "dropped_method": "alias",
    }
    assert mapping.report["n_conflicts"] == 2
    assert mapping.report["n_unmatched"] == 0


def test_mouse_orthologs():
    genes = ["Cd3e", "Actb", "Ms4a1", "Lyz2"]
    human = harmonize_genes(genes, PANEL, **QUIET)
    mouse = harmonize_genes(genes, PANEL, species="mouse", **QUIET)
    assert mouse.report["matched_by_method"]["ortholog"] >= 3
    assert mouse.to_frame().loc["Cd3e"].tolist() == ["CD3E", "ortholog"]
    assert human.to_frame().loc["Cd3e", "method"] == "case_insensitive"


def test_symbol_column_used_for_ensembl_var_names():
    var = pd.DataFrame({"feature_name": ["CD3E", "LYZ"]}, index=["local_id1", "local_id2"])
    mapping = harmonize_genes(var, PANEL, **QUIET)
    assert mapping.n_mapped == 2
    assert mapping.report["symbol_source"] == "var['feature_name']"
    var.index = ["ENSG00000999991", "ENSG00000999992"]  # unknown ids, symbol column must be used
    mapping = harmonize_genes(var, PANEL, **QUIET)
    assert mapping.n_mapped == 2
    assert mapping.report["symbol_source"] == "var['feature_name']"


def test_too_few_genes_errors_with_cause():
    with pytest.raises(MsfmInputError, match=r"Only 0 of 19264 .*species='mouse'"):
        harmonize_genes([f"Gene{i}a" for i in range(50)], PANEL)
    with pytest.raises(MsfmInputError, match=r"mouse Ensembl ids"):
        harmonize_genes([f"ENSMUSG{i:011d}" for i in range(50)], PANEL)
    with pytest.raises(MsfmInputError, match="gene_column='nope' is not a column"):
        harmonize_genes(pd.DataFrame(index=["A"]), PANEL, gene_column="nope")
    with pytest.raises(MsfmInputError, match="species"):
        harmonize_genes(["A"], PANEL, species="fly")


def test_pbmc68k_numbers(pbmc_genes):
    with pytest.warns(UserWarning, match=r"Only 3.6% of the 19264 panel genes \(691\)"):
        exact = harmonize_genes(pbmc_genes, PANEL, use_aliases=False)
    assert exact.n_mapped == 691
    assert exact.report["n_unmatched"] == 74
    with pytest.warns(UserWarning, match="panel genes"):
        aliased = harmonize_genes(pbmc_genes, PANEL)
    assert aliased.report["matched_by_method"]["exact"] == 691
    assert aliased.report["matched_by_method"]["alias"] >= 40
    assert aliased.n_mapped > exact.n_mapped
    frame = aliased.to_frame()
    assert frame.loc["ATP5B", "panel_gene"] == "ATP5F1B"
    assert frame.loc["SEPT7", "panel_gene"] == "SEPTIN7"
    assert frame.loc["NEAT1", "panel_gene"] is None  # lncRNA: not in the panel under any name


@pytest.fixture(scope="module")
def pbmc_genes() -> list[str]:
    from msfm.datasets import pbmc68k

    return list(pbmc68k().var_names)
