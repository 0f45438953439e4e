"""scFoundation AnnData API end to end: official parity through convert + embed/enhance/embed_genes, and the shape
of the public verbs (key_added, reading options, results, old names)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from safetensors.numpy import load_file

import msfm
from msfm.errors import CheckpointError, MsfmInputError
from msfm.runtime.loaded import Loaded
from sf_official import official_cells

sf = msfm.scfoundation

FIX = Path(__file__).parents[1] / "fixtures" / "scfoundation"
ATOL = 1e-4


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIX / "tiny_official_io.safetensors")


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    return official_cells()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {v: sf.convert(FIX / "tiny_official.ckpt", root / v, variant=v) for v in ("cell", "gene", "rde")}


def _embed(cells, ckpt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only 3.6% of the panel is present in these 765 genes
        out = sf.embed(cells, ckpt, copy=True, progress=False, use_aliases=False, device="cpu", **kw)
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
    assert "gene_mapping" in out.uns["scfoundation"]["embed"]
    assert out.uns["scfoundation"]["embed"]["gene_mapping"]["n_mapped"] == 691


def test_embed_aliases_change_input_and_are_reported(cells, ckpts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sf.embed(cells, ckpts["cell"], copy=True, progress=False, device="cpu")
    assert out.uns["scfoundation"]["embed"]["gene_mapping"]["n_mapped"] > 691


def test_enhance_matches_official_gene_expression(cells, ckpts, io):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sf.enhance(
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
    assert int(mapped.sum()) == 691  # the official mapping of these 765 genes (no aliases)
    # Only the documented additions: the counts stay as given, and copy=True left the caller's AnnData alone.
    assert set(out.layers) == {"scfoundation_enhanced"}
    np.testing.assert_array_equal(out.X.toarray(), io["source_counts"])
    assert out.uns["scfoundation"]["enhance"]["params"]["target_depth"] == "t4"
    assert not cells.layers
    assert "scfoundation_enhanced_mapped" not in cells.var
    assert "scfoundation" not in cells.uns


def test_embed_genes_memory_and_disk(cells, ckpts, io, tmp_path):
    genes = ["CD3E", "LYZ", "ACTB", "A1BG"]
    from msfm.data import GenePanel

    idx = [GenePanel.scfoundation().symbols.index(g) for g in genes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem = sf.embed_genes(
            cells, ckpts["gene"], genes=genes, cells=[1, 0], progress=False, use_aliases=False, device="cpu"
        )
        disk = sf.embed_genes(
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
    assert isinstance(mem, sf.GeneEmbeddings)
    np.testing.assert_allclose(mem.embeddings, expected[[1, 0]], atol=ATOL, rtol=ATOL)
    assert mem.cells == (cells.obs_names[1], cells.obs_names[0])
    assert mem.genes == tuple(genes)
    import h5py

    assert disk.embeddings is None
    assert disk.path == tmp_path / "g.h5"
    with h5py.File(disk.path) as h5:
        np.testing.assert_allclose(h5["embeddings"][:], expected, atol=ATOL, rtol=ATOL)
        assert [g.decode() for g in h5["genes"][:]] == genes
    np.testing.assert_allclose(disk.array(), expected, atol=ATOL, rtol=ATOL)
    # the file was written under a temporary name and renamed: nothing else is left in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5"]
    with pytest.raises(MsfmInputError, match="exists"):
        sf.embed_genes(cells, ckpts["gene"], genes=genes, out=tmp_path / "g.h5", progress=False)
    # Result.save writes the array and the plain fields
    saved = mem.save(tmp_path / "saved")
    np.testing.assert_array_equal(np.load(saved / "embeddings.npy"), mem.embeddings)
    plain = json.loads((saved / "result.json").read_text())
    assert plain["type"] == "GeneEmbeddings"
    assert plain["genes"] == genes
    assert plain["params"]["target_depth"] == "t4"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embed_genes_errors(cells, ckpts):
    with pytest.raises(MsfmInputError, match="not in the model's gene panel"):
        sf.embed_genes(cells, ckpts["gene"], genes=["NOT_A_GENE"], progress=False)
    with pytest.raises(MsfmInputError, match=r"out='file\.h5'"):
        sf.embed_genes(cells, ckpts["gene"], progress=False, max_in_memory_gb=0.0001)
    with pytest.raises(MsfmInputError, match="not found in obs_names"):
        sf.embed_genes(cells, ckpts["gene"], genes=["CD3E"], cells=["nope"], progress=False)


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
        assert sf.embed(a, ckpts["cell"], progress=False) is a
    np.testing.assert_array_equal(a.layers["counts"].toarray(), before)
    assert "X_scfoundation" in a.obsm


def test_embed_bad_inputs(cells, ckpts):
    neg = cells.copy()
    neg.X = sp.csr_matrix(-np.abs(neg.X.toarray()))
    with pytest.raises(MsfmInputError, match="negative"):
        sf.embed(neg, ckpts["cell"], progress=False)
    norm = cells.copy()
    norm.X = sp.csr_matrix(np.log1p(norm.X.toarray()))
    with pytest.raises(MsfmInputError, match="pre_normalized"):
        sf.embed(norm, ckpts["cell"], progress=False)
    with pytest.raises(MsfmInputError, match="pool"):
        sf.embed(cells, ckpts["cell"], pool="mean", progress=False)
    with pytest.raises(MsfmInputError):
        sf.embed(cells, ckpts["cell"], target_depth="x9", progress=False)
    mouse = cells.copy()
    mouse.var_names = [f"Gm{i}" for i in range(mouse.n_vars)]
    with pytest.raises(MsfmInputError, match="panel"):
        sf.embed(mouse, ckpts["cell"], progress=False)


def test_pre_normalized_warns_and_runs(cells, ckpts):
    norm = cells.copy()
    x = norm.X.toarray()
    norm.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    with pytest.warns(UserWarning, match="pre_normalized=True"):
        sf.embed(norm, ckpts["cell"], pre_normalized=True, progress=False)
    assert np.isfinite(norm.obsm["X_scfoundation"]).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_embed_out_streams_backed_h5ad_and_matches_memory(cells, ckpts, io, tmp_path):
    src = tmp_path / "cells.h5ad"
    cells.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    res = sf.embed(src, ckpts["cell"], out=out, batch_size=4, progress=False, use_aliases=False, device="cpu")
    try:
        assert res.isbacked
        assert res.filename == out
        np.testing.assert_allclose(res.obsm["X_scfoundation"], io["cell_emb.all.t4"], atol=ATOL, rtol=ATOL)
        assert res.obs["scfoundation_zero_count"].dtype == bool
        record = res.uns["scfoundation"]["embed"]
        assert record["gene_mapping"]["n_mapped"] == 691
        assert record["params"]["streamed"]
        np.testing.assert_array_equal(
            res.X[:].toarray(), cells.X.toarray()
        )  # input data carried over unchanged
    finally:
        res.file.close()
    with pytest.raises(MsfmInputError, match="exists"):
        sf.embed(src, ckpts["cell"], out=out, progress=False)
    with pytest.raises(MsfmInputError):
        sf.embed(src, ckpts["cell"], out=src, overwrite=True, progress=False)
    # a path without out= is read into memory; an AnnData with out= is written as well as returned
    mem = sf.embed(src, ckpts["cell"], batch_size=4, progress=False, use_aliases=False, device="cpu")
    assert not mem.isbacked
    np.testing.assert_allclose(mem.obsm["X_scfoundation"], io["cell_emb.all.t4"], atol=ATOL, rtol=ATOL)
    written = sf.embed(
        cells, ckpts["cell"], copy=True, out=tmp_path / "mem.h5ad", progress=False, device="cpu"
    )
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "mem.h5ad").obsm["X_scfoundation"], written.obsm["X_scfoundation"]
    )


def test_convert_records_checksum_and_how_the_file_was_recognised(ckpts, tmp_path, caplog):
    from msfm.runtime.official_weights import file_sha256

    meta = json.loads((ckpts["rde"] / "meta.json").read_text())["extra"]
    assert meta["official_sha256"] == file_sha256(FIX / "tiny_official.ckpt")
    assert meta["official_recognised_by"].startswith("its key layout")
    with caplog.at_level("INFO", logger="msfm.runtime.official_weights"):
        sf.convert(FIX / "tiny_official.ckpt", tmp_path / "g", variant="gene")
    assert "official scFoundation models.ckpt, variant gene" in caplog.text
    assert meta["official_sha256"] in caplog.text


def test_convert_errors(tmp_path, ckpts):
    with pytest.raises(MsfmInputError, match="exists"):
        sf.convert(FIX / "tiny_official.ckpt", ckpts["cell"], variant="cell")
    with pytest.raises(MsfmInputError, match="variant"):
        sf.convert(FIX / "tiny_official.ckpt", tmp_path / "x", variant="nope")
    with pytest.raises(CheckpointError, match="convert"):
        sf.embed(ad.AnnData(np.ones((2, 2))), FIX / "tiny_official.ckpt", progress=False)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_key_added_names_every_output_and_keeps_both_records(cells, ckpts):
    a = cells.copy()
    sf.embed(a, ckpts["gene"], key_added="sf", progress=False, use_aliases=False, device="cpu")
    sf.enhance(
        a, ckpts["gene"], key_added="sf", target_depth="t4", progress=False, use_aliases=False, device="cpu"
    )
    assert "X_sf" in a.obsm
    assert "sf_zero_count" in a.obs
    assert "sf_enhanced" in a.layers
    assert "sf_enhanced_mapped" in a.var
    assert set(a.uns["sf"]) == {"embed", "enhance"}
    assert a.uns["sf"]["enhance"]["params"]["target_depth"] == "t4"
    assert "X_scfoundation" not in a.obsm
    assert "scfoundation" not in a.uns
    with pytest.raises(MsfmInputError, match="key_added='sf'"):
        sf.embed(a, ckpts["gene"], key_added="X_sf", progress=False)


def test_read_options_typo_says_did_you_mean(cells, ckpts):
    with pytest.raises(MsfmInputError, match="did you mean 'layer'"):
        sf.embed(cells, ckpts["cell"], layr="counts", progress=False)
    with pytest.raises(MsfmInputError, match="did you mean 'batch_size'"):
        sf.enhance(cells, ckpts["cell"], batch_sise=2, progress=False)
    with pytest.raises(MsfmInputError, match="did you mean 'genes'"):
        sf.embed_genes(cells, ckpts["cell"], gene=["CD3E"], progress=False)
    with pytest.raises(MsfmInputError, match="did you mean 'species'"):
        sf.predict(cells, ckpts["cell"], specis="mouse", progress=False)


def test_load_returns_the_shared_loaded_type(ckpts):
    loaded = sf.load(ckpts["cell"], device="cpu")
    assert isinstance(loaded, Loaded)
    assert loaded.family == "scfoundation"
    assert len(loaded.vocab) == loaded.config.num_genes == 19264
    assert loaded.extra["variant"] == "cell"
    assert loaded.path == ckpts["cell"]
    assert sf.load(loaded, device="cpu") is loaded  # a Loaded passes through
    assert sf.tokenizer_for(loaded).num_genes == loaded.config.num_genes
    with pytest.raises(CheckpointError, match="classifier"):
        sf.predict(ad.AnnData(np.ones((2, 2))), loaded, progress=False)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_old_names_warn_and_still_work(cells, ckpts, io, tmp_path):
    with pytest.warns(DeprecationWarning, match=r"msfm\.scfoundation\.load"):
        loaded = sf.load_model(ckpts["gene"], device="cpu")
    assert isinstance(loaded, Loaded)
    with pytest.warns(DeprecationWarning, match="embed_genes"):
        arr = sf.gene_embeddings(cells, loaded, genes=["CD3E"], progress=False, use_aliases=False)
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (6, 1, 16)
    src = tmp_path / "cells.h5ad"
    cells.write_h5ad(src)
    with pytest.warns(DeprecationWarning, match=r"embed\(data, checkpoint, out=\.\.\.\)"):
        path = sf.embed_file(src, tmp_path / "o.h5ad", ckpts["cell"], progress=False, use_aliases=False)
    np.testing.assert_allclose(ad.read_h5ad(path).obsm["X_scfoundation"], io["cell_emb.all.t4"], atol=ATOL)
    with pytest.warns(DeprecationWarning, match="Loaded"):
        assert sf.LoadedModel is Loaded


def test_load_refuses_a_damaged_config_and_a_non_path(ckpts, tmp_path):
    import shutil

    bad = shutil.copytree(ckpts["cell"], tmp_path / "bad")
    doc = json.loads((bad / "config.json").read_text())
    doc["config"]["encoder_dim"] = 33
    (bad / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"config\.json is damaged"):
        sf.load(bad, device="cpu")
    with pytest.raises(MsfmInputError, match="got int"):
        sf.load(3)
