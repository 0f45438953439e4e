"""scFoundation ``gene_network``: gene embeddings -> kNN graph -> Leiden modules -> enrichment, plus the baseline."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import msfm
from msfm.errors import MsfmInputError, OutputError
from msfm.eval.gene_modules import gene_set_cohesion
from msfm.models.scfoundation import embed_genes, load
from msfm.models.scfoundation.network_inference import enrichment_csv_path, gene_network

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Marker genes of the bundled PBMC cell types that the 700 x 765 data set measures.
MARKERS = {
    "B": ["MS4A1", "CD79A", "CD79B", "BANK1"],
    "MHC_II": ["HLA-DQA1", "HLA-DQB1", "HLA-DPA1", "HLA-DPB1", "HLA-DRA", "CD74"],
    "myeloid": ["LYZ", "S100A8", "S100A9", "FCN1", "TYROBP", "LST1", "AIF1", "FCER1G", "CTSS", "SPI1"],
    "NK_cytotoxic": ["GNLY", "NKG7", "GZMB", "PRF1", "GZMA", "CST7", "CTSW", "GZMH"],
}


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return msfm.datasets.pbmc68k()


@pytest.fixture(scope="module")
def backbone(pbmc, tmp_path_factory) -> Path:
    """A randomly initialised scfoundation-tiny on the data's genes."""
    from msfm.models.scfoundation.model import ScFoundation
    from msfm.models.scfoundation.pretraining import resolve_panel
    from msfm.models.scfoundation.provenance import preprocessing_record
    from msfm.registry import preset_config
    from msfm.runtime.checkpoint import save_checkpoint

    panel = resolve_panel("data", [pbmc])
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": len(panel)})
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("gn") / "bb",
        family="scfoundation",
        config=cfg,
        state_dict=ScFoundation(cfg).state_dict(),
        gene_panel=list(panel.symbols),
        preprocessing=preprocessing_record(),
    )


def _run(data, backbone, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return gene_network(data, backbone, **kw)


def test_shapes_keys_input_annotation_and_files(pbmc, backbone, tmp_path):
    cells = pbmc[:24].copy()
    out = tmp_path / "genes.h5ad"
    sets = {"B": MARKERS["B"], "other": ["LYZ", "S100A8", "NOT_A_GENE"]}
    genes = sorted({*MARKERS["B"], *MARKERS["myeloid"], *MARKERS["NK_cytotoxic"], *pbmc.var_names[:20]})
    res = _run(cells, backbone, genes=genes, gene_sets=sets, n_neighbors=5, batch_size=8, out=out)
    n = len(genes)
    assert "ATPIF1" in genes  # a data gene name that maps onto the panel through its alias
    assert list(res.obs_names) == ["ATP5IF1" if g == "ATPIF1" else g for g in genes]
    assert res.n_vars == 0
    assert res.obsm["X_scfoundation"].shape == (n, 32)  # tiny decoder width
    for key in (
        "scfoundation_similarity",
        "scfoundation_connectivities",
        "scfoundation_coexpression_similarity",
    ):
        g = res.obsp[key]
        assert sp.issparse(g)
        assert g.shape == (n, n)
        assert abs(g - g.T).max() < 1e-6
    mod = res.obs["scfoundation_module"]
    assert isinstance(mod.dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(mod.isna(), res.obs["scfoundation_module_similarity"].isna())
    rec = res.uns["scfoundation"]["gene_network"]
    assert rec["params"]["embedding"] == "context"
    assert rec["params"]["n_cells"] == 24
    table = rec["enrichment"]
    assert isinstance(table, pd.DataFrame)
    assert set(table.method) <= {"context", "coexpression"}
    assert "coexpression" in set(table.method)
    assert list(table.columns) == [
        "method", "module", "gene_set", "overlap", "module_size", "set_size", "p_value", "fdr", "genes"
    ]  # fmt: skip
    assert table.loc[table.gene_set == "other", "set_size"].eq(2).all()  # NOT_A_GENE is not analysed
    # the caller's AnnData carries the same per-gene results on its var rows
    pos = cells.var_names.get_indexer(genes)
    np.testing.assert_allclose(cells.varm["X_scfoundation"][pos], res.obsm["X_scfoundation"])
    assert np.isnan(cells.varm["X_scfoundation"][np.setdiff1d(np.arange(cells.n_vars), pos)]).all()
    assert list(cells.var["scfoundation_module"].iloc[pos].astype(str)) == list(mod.astype(str))
    assert cells.var["scfoundation_module"].isna().sum() == cells.n_vars - n
    lifted = cells.varp["scfoundation_similarity"][pos][:, pos].toarray()
    np.testing.assert_allclose(lifted, res.obsp["scfoundation_similarity"].toarray())
    # files: the gene AnnData and the table, both readable
    back = ad.read_h5ad(out)
    np.testing.assert_allclose(back.obsm["X_scfoundation"], res.obsm["X_scfoundation"])
    pd.testing.assert_frame_equal(back.uns["scfoundation"]["gene_network"]["enrichment"], table)
    csv = pd.read_csv(enrichment_csv_path(out), dtype={"module": str})
    assert len(csv) == len(table)
    assert list(csv.gene_set) == list(table.gene_set)
    with pytest.raises(OutputError, match="already exists"):
        _run(cells, backbone, genes=genes, out=out)


def test_context_embeddings_are_the_mean_of_embed_genes(pbmc, backbone):
    genes = list(pbmc.var_names[:16])
    cells = [3, 10, 0, 7, 5, 12, 1]
    one = embed_genes(
        pbmc,
        backbone,
        genes=genes,
        cells=cells,
        target_depth="f1",
        batch_size=1,
        device="cpu",
        progress=False,
    )
    batched = _run(pbmc, backbone, genes=genes, cells=cells, n_neighbors=3, batch_size=4, baseline=False)
    single = _run(pbmc, backbone, genes=genes, cells=cells, n_neighbors=3, batch_size=1, baseline=False)
    expected = one.array().mean(axis=0)
    np.testing.assert_allclose(batched.obsm["X_scfoundation"], expected, atol=1e-5)
    np.testing.assert_allclose(single.obsm["X_scfoundation"], batched.obsm["X_scfoundation"], atol=1e-5)


def test_input_embeddings_and_seeded_modules(pbmc, backbone):
    loaded = load(backbone, device="cpu")
    a = _run(pbmc[:60], backbone, embedding="input", n_top_genes=120, key_added="inp", seed=4)
    b = _run(pbmc[:60], backbone, embedding="input", n_top_genes=120, key_added="inp", seed=4)
    genes = list(a.obs_names)
    assert len(genes) == 120
    assert a.uns["inp"]["gene_network"]["params"]["genes"].startswith("top 120")
    idx = [loaded.vocab.index_of(g) for g in genes]
    np.testing.assert_allclose(a.obsm["X_inp"], loaded.model.gene_embedding.weight.detach().numpy()[idx])
    assert a.obsm["X_inp"].shape[1] == loaded.config.encoder_dim
    pd.testing.assert_series_equal(a.obs["inp_module"], b.obs["inp_module"])
    pd.testing.assert_series_equal(a.obs["inp_coexpression_module"], b.obs["inp_coexpression_module"])


def test_default_genes_are_the_most_variable(pbmc, backbone):
    res = _run(pbmc[:80], backbone, embedding="input", n_top_genes=50, baseline=False)
    x = pbmc[:80].layers["counts"]
    n_cells = np.asarray((x > 0).sum(axis=0)).ravel()
    chosen = pbmc.var_names.get_indexer(res.obs_names)
    assert (n_cells[chosen] >= 3).all()
    # highly variable genes vary more (CV of normalised counts) than the genes left out
    norm = sp.csr_matrix(x).multiply(1e4 / np.asarray(x.sum(axis=1))).tocsc()
    mean = np.asarray(norm.mean(axis=0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(axis=0)).ravel() - mean**2
    cv = np.sqrt(np.maximum(var, 0)) / np.maximum(mean, 1e-12)
    others = np.setdiff1d(np.flatnonzero(n_cells >= 3), chosen)
    assert np.median(cv[chosen]) > np.median(cv[others])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (
            {"genes": ["CD3E", "NOT_A_GENE", "ALSO_NOT"], "n_neighbors": 1},
            r"2 of the 3 requested genes are neither in the model's gene panel .*\['NOT_A_GENE', 'ALSO_NOT'\]",
        ),
        ({"embedding": "output"}, "embedding must be one of \\['context', 'input'\\]; got 'output'"),
        ({"cells": np.zeros(700, dtype=bool)}, "cells= selects no cell"),
        ({"genes": ["CD3E", "LYZ", "GNLY", "NKG7"], "n_neighbors": 15}, "Got 4 genes, but a kNN graph"),
        ({"gene_sets": {"S": ["XX1", "XX2"]}}, "None of the 1 gene set\\(s\\) shares a gene"),
    ],
    ids=["unknown_genes", "embedding", "empty_cells", "too_few_genes", "sets_share_no_gene"],
)
def test_bad_inputs(pbmc, backbone, kwargs, error):
    kwargs = {"embedding": "input", "n_top_genes": 40, **kwargs}
    with pytest.raises(MsfmInputError, match=error):
        _run(pbmc, backbone, **kwargs)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "does not exist"),
        (b"", "holds no gene set"),
        (b"ISG ISG15 MX1\n", "line 1"),
        (b"\xff\xfe", "not UTF-8"),
    ],
    ids=["missing", "empty", "malformed", "not_utf8"],
)
def test_bad_gmt_files_fail_before_compute(pbmc, backbone, tmp_path, content, error):
    path = tmp_path / "sets.gmt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MsfmInputError, match=error):
        _run(pbmc, "/no/such/checkpoint", gene_sets=path)  # the file is checked before the checkpoint


def test_sets_sharing_no_gene_are_left_out_with_a_warning(pbmc, backbone, caplog):
    with caplog.at_level("WARNING"):
        res = _run(
            pbmc[:40],
            backbone,
            embedding="input",
            n_top_genes=60,
            gene_sets={"none": ["XX1"], "B": MARKERS["B"]},
        )
    assert "share no gene" in caplog.text
    assert "'none'" in caplog.text
    assert res.uns["scfoundation"]["gene_network"]["params"]["gene_sets"] == ["B"]


# Real-data quality test (1-2 s, so not marked slow): real PBMC cells, marker gene sets.
def test_marker_sets_form_modules_on_real_pbmc(pbmc, backbone):
    """On real cells the co-expression pipeline puts each cell type's markers together, far beyond chance."""
    panel = load(backbone, device="cpu").vocab
    genes = sorted({g for s in MARKERS.values() for g in s} | {g for g in pbmc.var_names[::2] if g in panel})
    res = _run(pbmc, backbone, genes=genes, embedding="input", gene_sets=MARKERS, seed=0)
    table = res.uns["scfoundation"]["gene_network"]["enrichment"]
    coexp = table[table.method == "coexpression"]
    for name in MARKERS:
        assert coexp.loc[coexp.gene_set == name, "fdr"].min() < 0.05, name
    modules = res.obs["scfoundation_coexpression_module"].astype(object).where(lambda s: s.notna(), -1)
    shuffled = np.random.default_rng(0).permutation(modules.to_numpy())
    for name, markers in MARKERS.items():
        cohesion = gene_set_cohesion(
            {"coexpression": (genes, modules.to_numpy()), "shuffled": (genes, shuffled)},
            markers,
            gene_set_name=name,
            n_permutations=300,
        )
        real, trivial = cohesion.iloc[0], cohesion.iloc[1]
        assert real.fraction >= 0.9, (name, real.to_dict())
        assert real.p_permutation < 0.05, (name, real.to_dict())
        assert real.fraction > trivial.fraction + 0.25, name
