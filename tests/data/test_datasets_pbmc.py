"""msfm.datasets: pbmc68k counts recovery, resampled data and the streaming backed writer."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import msfm.datasets
from msfm.data import CellSource, GenePanel, harmonize_genes, write_h5ad_streaming
from msfm.errors import MsfmInputError


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return msfm.datasets.pbmc68k()


def test_pbmc68k_counts(pbmc):
    assert pbmc.shape == (700, 765)
    x = pbmc.X
    assert sp.issparse(x)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x.data, np.rint(x.data))
    assert (pbmc.layers["counts"] != x).nnz == 0
    assert pbmc.layers["counts"] is not x
    assert pbmc.obs["cell_type"].nunique() == 10
    assert pbmc.obs["cell_type"].value_counts()["Dendritic"] == 240
    assert "louvain" in pbmc.obs
    assert "X_umap" in pbmc.obsm
    info = pbmc.uns["dataset"]
    assert info["source_sha256"].startswith("e71d41e737c94155")
    assert "Zheng" in info["citation"]
    assert info["max_rounding_deviation"] < 0.1
    # Every cell's smallest count is 1 (the recovery is exact, not off by a scale).
    assert np.allclose([row.data.min() for row in x], 1.0)
    assert CellSource(pbmc).kind == "counts"


def test_pbmc68k_fixture_cell(pbmc):
    with pytest.warns(UserWarning, match="panel genes"):
        mapping = harmonize_genes(pbmc.var_names, GenePanel.scfoundation(), use_aliases=False)
    row = mapping.apply(pbmc[["TAAGGGCTTATTCC-7"]].layers["counts"])
    assert row.nnz == 168
    assert row.sum() == 346


def test_pbmc68k_rejects_a_different_file(monkeypatch):
    from msfm.datasets import pbmc

    monkeypatch.setattr(pbmc, "_PBMC_SHA256_PREFIX", "0000000000000000")
    with pytest.raises(MsfmInputError, match=r"expected 0000000000000000.*scanpy==1.11.5"):
        msfm.datasets.pbmc68k()


def test_list_datasets():
    info = msfm.datasets.list_datasets()
    assert set(info) >= {"pbmc68k", "pbmc68k_resampled"}
    assert info["pbmc68k_resampled"]["derived"] is True
    json.dumps(info)


def test_resampled_and_backed_writer_agree(tmp_path):
    small = msfm.datasets.pbmc68k_resampled(500, seed=3)
    assert small.shape == (500, 765)
    assert small.uns["dataset"]["derived_from"] == "pbmc68k"
    np.testing.assert_array_equal(small.X.data, np.rint(small.X.data))
    again = msfm.datasets.pbmc68k_resampled(500, seed=3)
    assert (small.X != again.X).nnz == 0
    path = msfm.datasets.write_backed_h5ad(tmp_path / "big.h5ad", 500, chunk_size=128, seed=3)
    backed = ad.read_h5ad(path, backed="r")
    assert backed.shape == (500, 765)
    assert list(backed.obs_names) == list(small.obs_names)
    src = CellSource(backed, chunk_size=100)
    assert src.kind == "counts"
    assert src.matrix_name == "X"
    np.testing.assert_array_equal(src.rows(np.arange(500)).toarray(), small.X.toarray())
    with pytest.raises(MsfmInputError, match="n_cells"):
        msfm.datasets.pbmc68k_resampled(0)


def test_streaming_writer_checks(tmp_path):
    obs = pd.DataFrame(index=["a", "b", "c"])
    var = pd.DataFrame(index=["g0", "g1"])
    blocks = [sp.csr_matrix(np.array([[1, 0], [0, 2]], dtype=np.float32)), sp.csr_matrix(np.array([[3, 3]]))]
    write_h5ad_streaming(tmp_path / "ok.h5ad", blocks, obs=obs, var=var, counts_layer=True)
    out = ad.read_h5ad(tmp_path / "ok.h5ad")
    np.testing.assert_array_equal(out.X.toarray(), [[1, 0], [0, 2], [3, 3]])
    np.testing.assert_array_equal(out.layers["counts"].toarray(), out.X.toarray())
    with pytest.raises(MsfmInputError, match="hold 2 rows in total; expected 3"):
        write_h5ad_streaming(tmp_path / "bad.h5ad", blocks[:1], obs=obs, var=var)
    with pytest.raises(MsfmInputError, match="expected 2"):
        write_h5ad_streaming(tmp_path / "bad.h5ad", [sp.csr_matrix((3, 5))], obs=obs, var=var)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.h5ad"]
