"""scFoundation AnnData API end to end: official parity through convert + embed/enhance/gene embeddings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from safetensors import safe_open
from safetensors.numpy import load_file

from msfm.errors import MsfmInputError
from msfm.models.scfoundation import api

FIX = Path(__file__).parents[1] / "fixtures" / "scfoundation"
ATOL = 1e-4


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIX / "tiny_official_io.safetensors")


@pytest.fixture(scope="module")
def cells(io) -> ad.AnnData:
    with safe_open(FIX / "tiny_official_io.safetensors", "np") as f:
        meta = f.metadata()
    genes = json.loads(meta["source_gene_symbols"])
    ids = json.loads(meta["cell_ids"])
    a = ad.AnnData(X=sp.csr_matrix(io["source_counts"]), var={"_": np.zeros(len(genes))})
    a.var_names = genes
    a.obs_names = ids
    return a


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {v: api.convert(FIX / "tiny_official.ckpt", root / v, variant=v) for v in ("cell", "gene", "rde")}


def _embed(cells, ckpt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only 3.6% of the panel is present in these 765 genes
        out = api.embed(cells, ckpt, copy=True, progress=False, use_aliases=False, device="cpu", **kw)
    return out


@pytest.mark.parametrize(
    ("target", "pool", "key"),
    [
        ("t4", "all", "cell_emb.all.t4"),
        ("a5", "all", "cell_emb.all.a5"),
        ("f1", "all", "cell_emb.all.f1"),
        ("t4", "max", "cell_emb.max.t4"),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_embed_matches_official_outputs(cells, ckpts, io, target, pool, key, batch_size):
    out = _embed(cells, ckpts["cell"], target_depth=target, pool=pool, batch_size=batch_size)
    np.testing.assert_allclose(out.obsm["X_scfoundation"], io[key], atol=ATOL, rtol=ATOL)
    assert "gene_mapping" in out.uns["scfoundation"]
    assert out.uns["scfoundation"]["gene_mapping"]["n_mapped"] == 691


def test_embed_aliases_change_input_and_are_reported(cells, ckpts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = api.embed(cells, ckpts["cell"], copy=True, progress=False, device="cpu")
    assert out.uns["scfoundation"]["gene_mapping"]["n_mapped"] > 691


def test_enhance_matches_official_gene_expression(cells, ckpts, io):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = api.enhance(
            cells,
            ckpts["gene"],
            target_depth="t4",
            copy=True,
            progress=False,
            use_aliases=False,
            batch_size=3,
            device="cpu",
        )
    from msfm.data import GenePanel

    panel = GenePanel.scfoundation()
    index = {s: i for i, s in enumerate(panel.symbols)}
    mapped = out.var["scfoundation_enhanced_mapped"].to_numpy()
    cols = np.array([index[g] for g in out.var_names[mapped]])
    np.testing.assert_allclose(
        out.layers["scfoundation_enhanced"][:, mapped],
        io["gene_expression.t4"][:, cols],
        atol=ATOL,
        rtol=ATOL,
    )
    assert not out.layers["scfoundation_enhanced"][:, ~mapped].any()
    assert "counts" not in out.layers or out.layers["counts"] is not None


def test_gene_embeddings_memory_and_disk(cells, ckpts, io, tmp_path):
    genes = ["CD3E", "LYZ", "ACTB", "A1BG"]
    from msfm.data import GenePanel

    idx = [GenePanel.scfoundation().symbols.index(g) for g in genes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = api.gene_embeddings(
            cells, ckpts["gene"], genes=genes, cells=[1, 0], progress=False, use_aliases=False, device="cpu"
        )
        path = api.gene_embeddings(
            cells,
            ckpts["gene"],
            genes=genes,
            cells=[cells.obs_names[0], cells.obs_names[1]],
            out=tmp_path / "g.h5",
            progress=False,
            use_aliases=False,
            device="cpu",
        )
    expected = io["gene_emb.t4"][:, idx]
    np.testing.assert_allclose(arr, expected[[1, 0]], atol=ATOL, rtol=ATOL)
    import h5py

    with h5py.File(path) as h5:
        np.testing.assert_allclose(h5["embeddings"][:], expected, atol=ATOL, rtol=ATOL)
        assert [g.decode() for g in h5["genes"][:]] == genes


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gene_embeddings_errors(cells, ckpts):
    with pytest.raises(MsfmInputError, match="not in the model's gene panel"):
        api.gene_embeddings(cells, ckpts["gene"], genes=["NOT_A_GENE"], progress=False)
    with pytest.raises(MsfmInputError, match=r"out='file\.h5'"):
        api.gene_embeddings(cells, ckpts["gene"], progress=False, max_in_memory_gb=0.0001)
    with pytest.raises(MsfmInputError, match="not found in obs_names"):
        api.gene_embeddings(cells, ckpts["gene"], genes=["CD3E"], cells=["nope"], progress=False)


def test_rde_variant_differs_only_in_head(ckpts):
    from msfm.runtime.checkpoint import load_checkpoint

    cell = load_checkpoint(ckpts["cell"]).state_dict
    rde = load_checkpoint(ckpts["rde"]).state_dict
    diff = [k for k in cell if not np.array_equal(cell[k].numpy(), rde[k].numpy())]
    assert diff == ["head.weight"]
    np.testing.assert_allclose(rde["head.weight"].numpy(), 2 * cell["head.weight"].numpy(), rtol=1e-6)


def test_zero_count_cells_are_kept_and_flagged(cells, ckpts):
    a = cells.copy()
    x = a.X.toarray()
    x[2] = 0
    a.X = sp.csr_matrix(x)
    out = _embed(a, ckpts["cell"])
    assert out.obs["scfoundation_zero_count"].tolist() == [False, False, True, False, False, False]
    assert np.isfinite(out.obsm["X_scfoundation"]).all()


def test_embed_never_touches_counts_and_copy_semantics(cells, ckpts):
    a = cells.copy()
    a.layers["counts"] = a.X.copy()
    before = a.layers["counts"].toarray().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert api.embed(a, ckpts["cell"], progress=False) is None
    np.testing.assert_array_equal(a.layers["counts"].toarray(), before)
    assert "X_scfoundation" in a.obsm


def test_embed_bad_inputs(cells, ckpts):
    neg = cells.copy()
    neg.X = sp.csr_matrix(-np.abs(neg.X.toarray()))
    with pytest.raises(MsfmInputError, match="negative"):
        api.embed(neg, ckpts["cell"], progress=False)
    norm = cells.copy()
    norm.X = sp.csr_matrix(np.log1p(norm.X.toarray()))
    with pytest.raises(MsfmInputError, match="pre_normalized"):
        api.embed(norm, ckpts["cell"], progress=False)
    with pytest.raises(MsfmInputError, match="pool"):
        api.embed(cells, ckpts["cell"], pool="mean", progress=False)
    with pytest.raises(MsfmInputError):
        api.embed(cells, ckpts["cell"], target_depth="x9", progress=False)
    mouse = cells.copy()
    mouse.var_names = [f"Gm{i}" for i in range(mouse.n_vars)]
    with pytest.raises(MsfmInputError, match="panel"):
        api.embed(mouse, ckpts["cell"], progress=False)


def test_pre_normalized_warns_and_runs(cells, ckpts):
    norm = cells.copy()
    x = norm.X.toarray()
    norm.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    with pytest.warns(UserWarning, match="pre_normalized=True"):
        api.embed(norm, ckpts["cell"], pre_normalized=True, progress=False)
    assert np.isfinite(norm.obsm["X_scfoundation"]).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embed_file_streams_backed_h5ad_and_matches_memory(cells, ckpts, io, tmp_path):
    src = tmp_path / "cells.h5ad"
    cells.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api.embed_file(src, out, ckpts["cell"], batch_size=4, progress=False, use_aliases=False, device="cpu")
    res = ad.read_h5ad(out)
    np.testing.assert_allclose(res.obsm["X_scfoundation"], io["cell_emb.all.t4"], atol=ATOL, rtol=ATOL)
    assert res.obs["scfoundation_zero_count"].dtype == bool
    assert json.loads(res.uns["scfoundation"])["gene_mapping"]["n_mapped"] == 691
    np.testing.assert_array_equal(res.X.toarray(), cells.X.toarray())  # input data carried over unchanged
    with pytest.raises(MsfmInputError, match="exists"):
        api.embed_file(src, out, ckpts["cell"], progress=False)
    with pytest.raises(MsfmInputError):
        api.embed_file(src, src, ckpts["cell"], overwrite=True, progress=False)


def test_convert_errors(tmp_path, ckpts):
    with pytest.raises(MsfmInputError, match="exists"):
        api.convert(FIX / "tiny_official.ckpt", ckpts["cell"], variant="cell")
    from msfm.errors import CheckpointError

    with pytest.raises(MsfmInputError, match="variant"):
        api.convert(FIX / "tiny_official.ckpt", tmp_path / "x", variant="nope")
    with pytest.raises(CheckpointError, match="convert"):
        api.embed(ad.AnnData(np.ones((2, 2))), FIX / "tiny_official.ckpt", progress=False)
