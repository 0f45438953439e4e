"""Bundled spatial datasets (scc_st, visium_demo), the semi-real tissue and their list_datasets entries."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

import msfm.datasets
from msfm.data.spatial import spatial_coords, visium_positions
from msfm.datasets import spatial as sds
from msfm.errors import MsfmInputError


@pytest.fixture(scope="module")
def scc() -> ad.AnnData:
    return msfm.datasets.scc_st()


@pytest.fixture(scope="module")
def tissue() -> ad.AnnData:
    return msfm.datasets.semi_real_tissue(1200, n_domains=4, side_um=900.0, seed=3)


# ---------------------------------------------------------------------------------------------------- scc_st
def test_scc_st_content(scc):
    assert scc.shape == (621, 2000)
    assert scc.X.dtype == np.float32
    x = scc.X.toarray() if sp.issparse(scc.X) else np.asarray(scc.X)
    assert np.isfinite(x).all()
    assert x.min() >= 0
    assert x.max() < np.log1p(200.0)  # log1p of Dino values (max 96 in the source), not raw values
    assert scc.var_names.is_unique
    assert scc.obs_names.is_unique
    assert isinstance(scc.obs["cluster"].dtype, pd.CategoricalDtype)
    assert list(scc.obs["cluster"].cat.categories) == [str(i) for i in range(1, 11)]
    assert scc.obs["cluster"].value_counts().min() == 21
    assert ((scc.obs["row"] + scc.obs["col"]) % 2 == 0).all()
    assert scc.uns["msfm_spatial"] == {"unit": "um", "um_per_unit": 1.0}
    info = scc.uns["msfm_dataset"]
    assert info["source_sha256"].startswith("cc52f34727fd2b35")
    assert "MIT" in info["licence"]
    assert "Ji" in info["citation"]
    assert "log1p" in info["derivation"]["X"]


def test_scc_st_hexagonal_spacing_is_100um(scc):
    xy = scc.obsm["spatial"]
    np.testing.assert_allclose(xy, sds.scc_hex_to_um(scc.obs["row"], scc.obs["col"]))
    dist, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(dist[:, 1], 100.0)  # every spot has a neighbour exactly 100 µm away
    # Interior spots (all six lattice neighbours present) have exactly six at 100 µm and the next ring farther.
    full = dist[:, 6] < 100.0 + 1e-6
    assert full.sum() > 300
    np.testing.assert_allclose(dist[full, 1:7], 100.0)
    c = spatial_coords(scc)  # no duplicated positions
    assert c.scale == 1.0


def test_scc_hex_axis_convention():
    xy = sds.scc_hex_to_um(np.array([10, 10, 11, 12]), np.array([10, 12, 11, 10]))
    d = np.linalg.norm(xy[1:] - xy[0], axis=1)
    np.testing.assert_allclose(d, [100.0, 100.0, 100.0 * np.sqrt(3)])  # col+2, diagonal, row+2 (second ring)


def test_derive_scc_st_steps(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.gamma(0.5, 1.0, size=(12, 6)).astype(np.float32)
    x[:, 4] = x[:, 1]  # a tie in variance, broken by name: "g1" < "g4"
    names = ["g5", "g1", "g3", "g2", "g4", "g0"]
    src = ad.AnnData(
        X=x,
        obs=pd.DataFrame(
            {"row": np.arange(12) * 2, "col": np.zeros(12, int), "cluster": [1, 2, 10] * 4},
            index=[f"s{i}" for i in range(12)],
        ),
        var=pd.DataFrame(index=names),
    )
    src.write_h5ad(tmp_path / "src.h5ad")
    with pytest.raises(MsfmInputError, match="expected cc52f34727fd2b35"):
        sds._derive_scc_st(tmp_path / "src.h5ad", tmp_path / "out.h5ad", n_genes=3)
    out_path = sds._derive_scc_st(tmp_path / "src.h5ad", tmp_path / "out.h5ad", n_genes=3, check_source=False)
    out = ad.read_h5ad(out_path)
    var = np.log1p(x.astype(np.float64)).var(axis=0)
    order = sorted(range(6), key=lambda j: (-var[j], names[j]))[:3]
    assert list(out.var_names) == [names[j] for j in sorted(order)]
    np.testing.assert_allclose(out.X, np.log1p(x[:, sorted(order)].astype(np.float64)), rtol=1e-6)
    assert list(out.obs["cluster"].cat.categories) == ["1", "2", "10"]


def test_sha256_check_failure_is_clear(monkeypatch):
    monkeypatch.setattr(sds, "_SCC_SHA256_PREFIX", "deadbeefdeadbeef")
    with pytest.raises(
        MsfmInputError,
        match=r"sha256 0ed70addf6ac06e4\.\.\., expected deadbeefdeadbeef\.\.\..*Reinstall msfm",
    ):
        sds.scc_st()
    monkeypatch.setitem(sds._VISIUM_FILES, "spatial/tissue_positions_list.csv", "0123456789abcdef")
    with pytest.raises(MsfmInputError, match=r"tissue_positions_list\.csv .*expected 0123456789abcdef"):
        sds.visium_demo()


# ----------------------------------------------------------------------------------------------- visium_demo
def test_visium_demo():
    a = msfm.datasets.visium_demo()
    assert a.shape == (100, 100)
    assert "custom" in a.uns["spatial"]
    assert a.uns["msfm_dataset"]["name"] == "visium_demo"
    assert "BSD-3" in a.uns["msfm_dataset"]["licence"]
    assert a.uns["msfm_spatial"]["source"] == "msfm/resources/spatial/visium_1.0.0"
    pos = visium_positions(sds.visium_folder())
    assert len(pos) == 4992
    assert set(a.obs_names) <= set(pos.index)


# ------------------------------------------------------------------------------------------ semi_real_tissue
def test_semi_real_tissue_content(tissue):
    assert tissue.shape == (1200, 765)
    xy = tissue.obsm["spatial"]
    assert xy.shape == (1200, 2)
    assert xy.dtype == np.float64
    assert xy.min() >= 0
    assert xy.max() < 900.0
    x = tissue.X
    assert sp.issparse(x)
    np.testing.assert_array_equal(x.data, np.rint(x.data))
    assert (x != tissue.layers["counts"]).nnz == 0
    assert list(tissue.obs["domain"].cat.categories) == ["D0", "D1", "D2", "D3"]
    assert tissue.obs["domain"].value_counts().min() > 50
    info = tissue.uns["msfm_dataset"]
    assert info["synthetic_arrangement"] is True
    assert "synthetic spatial arrangement" in info["note"]
    assert tissue.uns["msfm_spatial"] == {"unit": "um", "um_per_unit": 1.0}
    # Each cell is a real pbmc68k cell, counts unchanged, with that cell's type.
    base = msfm.datasets.pbmc68k()
    rows = base.obs_names.get_indexer(tissue.obs["source_cell"])
    assert (rows >= 0).all()
    assert (base.layers["counts"][rows] != x).nnz == 0
    np.testing.assert_array_equal(
        base.obs["cell_type"].astype(str).to_numpy()[rows], tissue.obs["cell_type"].astype(str).to_numpy()
    )
    assert list(tissue.var_names) == list(base.var_names)
    spatial_coords(tissue)  # valid, no duplicated positions


def test_semi_real_tissue_domains_are_contiguous_and_distinct(tissue):
    xy = tissue.obsm["spatial"]
    domain = tissue.obs["domain"].cat.codes.to_numpy()
    _, idx = cKDTree(xy).query(xy, k=7)
    same = (domain[idx[:, 1:]] == domain[:, None]).mean()
    assert same > 0.9  # neighbours nearly always share a domain: spatially coherent regions
    # Each domain is one connected region of the neighbour graph (Voronoi cells are convex).
    for d in range(4):
        members = np.flatnonzero(domain == d)
        seen, frontier = {members[0]}, [members[0]]
        while frontier:
            i = frontier.pop()
            for j in idx[i, 1:]:
                if domain[j] == d and j not in seen:
                    seen.add(j)
                    frontier.append(j)
        assert len(seen) == members.size
    # Compositions differ: the most frequent cell type is different in every domain.
    table = pd.crosstab(tissue.obs["domain"], tissue.obs["cell_type"])
    assert table.idxmax(axis=1).nunique() == 4
    # Neighbourhoods are informative: the type mix differs between domains far beyond sampling noise.
    frac = table.div(table.sum(axis=1), axis=0).to_numpy()
    assert np.abs(frac[:, None, :] - frac[None, :, :]).sum(axis=2)[~np.eye(4, dtype=bool)].min() > 0.4


def test_semi_real_tissue_deterministic_by_seed(tissue):
    again = msfm.datasets.semi_real_tissue(1200, n_domains=4, side_um=900.0, seed=3)
    np.testing.assert_array_equal(again.obsm["spatial"], tissue.obsm["spatial"])
    pd.testing.assert_frame_equal(again.obs, tissue.obs)
    assert (again.X != tissue.X).nnz == 0
    other = msfm.datasets.semi_real_tissue(1200, n_domains=4, side_um=900.0, seed=4)
    assert not np.array_equal(other.obsm["spatial"], tissue.obsm["spatial"])
    assert (other.obs["source_cell"].to_numpy() != tissue.obs["source_cell"].to_numpy()).mean() > 0.5


def test_semi_real_tissue_default_size_and_bad_args():
    a = msfm.datasets.semi_real_tissue()
    assert a.n_obs == 3000
    assert a.obs["domain"].nunique() == 5
    assert a.uns["msfm_dataset"]["lattice_spacing_um"] == pytest.approx(29.4, abs=0.5)
    with pytest.raises(MsfmInputError, match="n_domains"):
        msfm.datasets.semi_real_tissue(50, n_domains=6)
    with pytest.raises(MsfmInputError, match="side_um"):
        msfm.datasets.semi_real_tissue(100, side_um=-1.0)


# ------------------------------------------------------------------------------------------- list_datasets
def test_list_datasets_has_spatial_entries():
    info = msfm.datasets.list_datasets()
    keys = set(info["pbmc68k"])
    for name in ("scc_st", "visium_demo", "semi_real_tissue"):
        assert set(info[name]) == keys, name
        assert info[name]["licence"]
        assert info[name]["citation"]
        assert info[name]["source"]
    assert info["scc_st"]["shape"] == (621, 2000)
    assert info["scc_st"]["derived"] is True
    assert info["visium_demo"]["derived"] is False
    assert "synthetic" in info["semi_real_tissue"]["description"]
    assert {"scc_st", "semi_real_tissue", "visium_demo"} <= set(msfm.datasets.__all__)
