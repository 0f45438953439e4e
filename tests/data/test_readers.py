"""Readers: every supported format round-trips through files made in tmp_path."""

from __future__ import annotations

import gzip

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from msfm.data import CellSource, read, read_many
from msfm.errors import MsfmInputError

SYMBOLS = ["CD3E", "MS4A1", "LYZ", "NKG7", "CD3E"]  # one duplicated symbol, as in real 10x references
IDS = ["ENSG00000198851", "ENSG00000156738", "ENSG00000090382", "ENSG00000105374", "ENSG00000999999"]


@pytest.fixture
def counts() -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(7, len(SYMBOLS))).astype(np.float32)
    x[2] = 0  # a cell without counts
    return sp.csr_matrix(x)


def _write_10x_h5(path, x: sp.csr_matrix) -> None:
    with h5py.File(path, "w") as fh:
        m = fh.create_group("matrix")
        m["barcodes"] = np.array([f"AAAC-{i}".encode() for i in range(x.shape[0])])
        m["data"] = x.data.astype(np.int32)
        m["indices"] = x.indices.astype(np.int64)
        m["indptr"] = x.indptr.astype(np.int64)
        m["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
        f = m.create_group("features")
        f["id"] = np.array([s.encode() for s in IDS])
        f["name"] = np.array([s.encode() for s in SYMBOLS])
        f["feature_type"] = np.array([b"Gene Expression"] * len(SYMBOLS))
        f["genome"] = np.array([b"GRCh38"] * len(SYMBOLS))


def test_h5ad_in_memory_and_backed(tmp_path, counts):
    adata = ad.AnnData(counts, var=pd.DataFrame(index=[f"g{i}" for i in range(counts.shape[1])]))
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    mem = read(path)
    backed = read(path, backed=True)
    assert not mem.isbacked
    assert backed.isbacked
    np.testing.assert_array_equal(CellSource(backed).rows([3, 0]).toarray(), counts[[3, 0]].toarray())


def test_10x_h5_keeps_ensembl_ids_and_makes_symbols_unique(tmp_path, counts):
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    _write_10x_h5(path, counts)
    adata = read(path)
    assert adata.shape == counts.shape
    assert list(adata.var["gene_ids"]) == IDS
    assert adata.var_names.is_unique
    assert adata.var_names[0] == "CD3E"
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray())


@pytest.mark.parametrize("compressed", [True, False])
def test_10x_mtx_folder(tmp_path, counts, compressed):
    folder = tmp_path / "mtx"
    folder.mkdir()
    suffix = ".gz" if compressed else ""
    opener = gzip.open if compressed else open
    with opener(folder / f"matrix.mtx{suffix}", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(counts.T.astype(np.int64)))
    with opener(folder / f"features.tsv{suffix}", "wt") as fh:
        fh.writelines(f"{i}\t{s}\tGene Expression\n" for i, s in zip(IDS, SYMBOLS, strict=True))
        fh.write("AB_CD3\tCD3_TotalSeqB\tAntibody Capture\n")
    with opener(folder / f"barcodes.tsv{suffix}", "wt") as fh:
        fh.writelines(f"AAAC-{i}\n" for i in range(counts.shape[0]))
    # Add the antibody row to the matrix too: it must be dropped (gene expression only).
    full = sp.hstack([counts, sp.csr_matrix(np.ones((counts.shape[0], 1), dtype=np.float32))]).tocsr()
    with opener(folder / f"matrix.mtx{suffix}", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(full.T.astype(np.int64)))
    adata = read(folder)
    assert adata.shape == counts.shape
    assert list(adata.var["gene_ids"]) == IDS
    assert list(adata.obs_names[:2]) == ["AAAC-0", "AAAC-1"]
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray())


@pytest.mark.parametrize("name", ["cells.csv", "cells.tsv", "cells.csv.gz"])
def test_csv_tsv(tmp_path, counts, name):
    genes = [f"G{i}" for i in range(counts.shape[1])]
    df = pd.DataFrame(counts.toarray(), index=[f"c{i}" for i in range(counts.shape[0])], columns=genes)
    df.to_csv(tmp_path / name, sep="\t" if ".tsv" in name else ",")
    adata = read(tmp_path / name)
    assert list(adata.var_names) == genes
    assert adata.obs_names[0] == "c0"
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray())


def test_csv_with_text_column_is_rejected(tmp_path):
    pd.DataFrame({"A": [1, 2], "label": ["x", "y"]}, index=["c0", "c1"]).to_csv(tmp_path / "bad.csv")
    with pytest.raises(MsfmInputError, match="not numeric"):
        read(tmp_path / "bad.csv")


@pytest.mark.filterwarnings("ignore:Writing zarr v2:UserWarning")
def test_zarr(tmp_path, counts):
    adata = ad.AnnData(counts)
    adata.write_zarr(tmp_path / "x.zarr")
    out = read(tmp_path / "x.zarr")
    np.testing.assert_array_equal(out.X.toarray(), counts.toarray())


def test_missing_and_unknown(tmp_path):
    with pytest.raises(MsfmInputError, match=r"does not exist.*h5ad"):
        read(tmp_path / "nope.h5ad")
    (tmp_path / "x.xyz").write_text("1")
    with pytest.raises(MsfmInputError, match=r"Unknown file format.*10x"):
        read(tmp_path / "x.xyz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MsfmInputError, match="neither a zarr store nor a 10x"):
        read(tmp_path / "empty_dir")


def test_backed_non_h5ad_warns(tmp_path, counts):
    pd.DataFrame(counts.toarray()).to_csv(tmp_path / "c.csv")
    with pytest.warns(UserWarning, match="only available for .h5ad"):
        read(tmp_path / "c.csv", backed=True)


def test_read_many_records_source(tmp_path, counts):
    for name in ("a.h5ad", "b.h5ad"):
        ad.AnnData(counts, var=pd.DataFrame(index=[f"g{i}" for i in range(counts.shape[1])])).write_h5ad(
            tmp_path / name
        )
    out = read_many([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], batch_key="batch")
    assert out.n_obs == 2 * counts.shape[0]
    assert out.obs_names.is_unique
    assert out.obs["batch"].value_counts().to_dict() == {"a.h5ad": 7, "b.h5ad": 7}
    with pytest.raises(MsfmInputError, match="no paths"):
        read_many([])
