"""Spatial coordinates (validation, scale, sections, duplicates) and the own Visium reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

from msfm.data.resources import resource_path
from msfm.data.spatial import (
    JITTER_HALF_WIDTH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    SpatialCoords,
    as_spatial_anndata,
    is_visium_folder,
    read_positions,
    read_visium,
    spatial_coords,
    visium_positions,
)
from msfm.errors import MsfmInputError

VISIUM = resource_path("spatial", "visium_1.0.0", "filtered_feature_bc_matrix.h5").parent


def _adata(xy, **obs) -> ad.AnnData:
    xy = np.asarray(xy, dtype=float)
    a = ad.AnnData(
        X=np.zeros((len(xy), 1), np.float32),
        obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(len(xy))]),
    )
    a.obsm["spatial"] = xy
    return a


# ------------------------------------------------------------------------------------------- spatial_coords
def test_basic_coords_are_a_float64_copy_in_um():
    a = _adata([[0, 0], [1, 2], [3, 4]])
    before = a.obsm["spatial"].copy()
    c = spatial_coords(a, scale=2.5)
    assert isinstance(c, SpatialCoords)
    assert c.xy.dtype == np.float64
    np.testing.assert_allclose(c.xy, before * 2.5)
    assert c.scale == 2.5
    assert c.key == "spatial"
    assert c.section.dtype == np.int64
    assert c.section.tolist() == [0, 0, 0]
    assert c.section_names == ["all"]
    assert len(c) == 3
    c.xy[:] = -1  # the result is a copy: the user's AnnData stays as it was
    np.testing.assert_array_equal(a.obsm["spatial"], before)


def test_scale_defaults_to_uns_then_one():
    a = _adata([[1, 1], [2, 3]])
    assert spatial_coords(a).scale == 1.0
    a.uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 0.5}
    c = spatial_coords(a)
    assert c.scale == 0.5
    np.testing.assert_allclose(c.xy, [[0.5, 0.5], [1.0, 1.5]])
    assert spatial_coords(a, scale=4.0).scale == 4.0  # an explicit scale wins over uns


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "px"])
def test_bad_scale(bad):
    a = _adata([[1, 1], [2, 3]])
    with pytest.raises(MsfmInputError, match="µm per unit"):
        spatial_coords(a, scale=bad)
    a.uns["msfm_spatial"] = {"um_per_unit": bad}
    with pytest.raises(MsfmInputError, match="scale="):
        spatial_coords(a)


def test_missing_key_lists_keys_and_says_how_to_fix():
    a = _adata([[0, 0], [1, 1]])
    a.obsm["X_pca"] = np.zeros((2, 3))
    with pytest.raises(MsfmInputError) as err:
        spatial_coords(a, key="xy_um")
    text = str(err.value)
    assert "'xy_um'" in text
    assert "'spatial'" in text
    assert "'X_pca'" in text
    assert "adata.obsm['spatial'] = coordinates in micrometres" in text
    assert "scale=" in text
    assert "key=" in text


def test_wrong_shape():
    a = _adata([[0, 0], [1, 1]])
    a.obsm["spatial3d"] = np.zeros((2, 3))
    with pytest.raises(MsfmInputError, match=r"shape \(2, 3\), expected \(2, 2\)"):
        spatial_coords(a, key="spatial3d")


def test_non_numeric():
    a = _adata([[0, 0], [1, 1]])
    a.obsm["spatial"] = np.array([["a", "b"], ["c", "d"]], dtype=object)
    with pytest.raises(MsfmInputError, match="expected numbers"):
        spatial_coords(a)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite(value):
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    xy[1, 0] = value
    with pytest.raises(MsfmInputError, match=r"NaN or infinite values in 1 of 3 rows \(e\.g\. \['c1'\]\)"):
        spatial_coords(_adata(xy))


def test_sections_categorical_order_and_codes():
    sec = pd.Categorical(["b", "a", "b", "a"], categories=["b", "a", "unused"])
    a = _adata([[0, 0], [0, 0], [1, 1], [1, 1]], slide=sec)
    c = spatial_coords(a, section_key="slide")  # same positions in different sections are fine
    assert c.section_names == ["b", "a"]
    assert c.section.tolist() == [0, 1, 0, 1]
    assert c.n_sections == 2
    assert c.indices(1).tolist() == [1, 3]
    # Plain string column: sorted names.
    b = _adata([[0, 0], [1, 1], [2, 2]], slide=["s2", "s1", "s2"])
    cb = spatial_coords(b, section_key="slide")
    assert cb.section_names == ["s1", "s2"]
    assert cb.section.tolist() == [1, 0, 1]


def test_unknown_and_incomplete_section_key():
    a = _adata([[0, 0], [1, 1]], slide=["a", None])
    with pytest.raises(MsfmInputError, match=r"section_key='sample' is not a column.*\['slide'\]"):
        spatial_coords(a, section_key="sample")
    with pytest.raises(MsfmInputError, match="missing for 1 cells"):
        spatial_coords(a, section_key="slide")


def test_duplicates_error_names_count_and_examples():
    a = _adata([[0, 0], [5, 5], [0, 0], [0, 0], [7, 1]])
    with pytest.raises(MsfmInputError) as err:
        spatial_coords(a)
    text = str(err.value)
    assert "2 cells repeat the position" in text
    assert "'c2' = 'c0'" in text
    assert "duplicates='keep'" in text
    assert "duplicates='jitter'" in text
    assert "section_key" in text


def test_duplicates_keep_and_jitter():
    xy = [[0, 0], [5, 5], [0, 0], [0, 0], [7, 1]]
    a = _adata(xy)
    kept = spatial_coords(a, duplicates="keep")
    np.testing.assert_array_equal(kept.xy, np.asarray(xy, float))
    assert kept.n_jittered == 0

    jit = spatial_coords(a, duplicates="jitter", scale=10.0)
    assert jit.n_jittered == 2
    # The first occurrence and the unique cells do not move; repeats move by at most the documented half-width.
    np.testing.assert_array_equal(jit.xy[[0, 1, 4]], np.asarray(xy, float)[[0, 1, 4]] * 10)
    moved = jit.xy[[2, 3]] - 0.0
    assert np.all(np.abs(moved) <= JITTER_HALF_WIDTH_UM)
    assert np.all(np.abs(moved) > 0)
    assert len(np.unique(jit.xy, axis=0)) == 5
    # Seeded: the same input gets the same jitter.
    np.testing.assert_array_equal(jit.xy, spatial_coords(a, duplicates="jitter", scale=10.0).xy)
    np.testing.assert_array_equal(a.obsm["spatial"], np.asarray(xy, float))  # input untouched


def test_unknown_duplicates_mode():
    with pytest.raises(MsfmInputError, match="'error', 'keep', 'jitter'"):
        spatial_coords(_adata([[0, 0], [1, 1]]), duplicates="merge")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- Visium
def test_read_visium_bundled_folder():
    a = read_visium(VISIUM)
    assert a.shape == (100, 100)
    assert sp.issparse(a.X)
    assert a.X.dtype == np.float32
    assert a.X.nnz == 656
    assert (a.X != a.layers["counts"]).nnz == 0
    assert a.layers["counts"] is not a.X
    np.testing.assert_array_equal(a.X.data, np.rint(a.X.data))
    assert {"gene_ids", "feature_types"} <= set(a.var.columns)
    assert a.var_names.is_unique

    pos = visium_positions(VISIUM)
    sub = pos.loc[a.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        np.testing.assert_array_equal(a.obs[col].to_numpy(), sub[col].to_numpy())
    factors = json.loads((VISIUM / "spatial" / "scalefactors_json.json").read_text())
    um_per_px = VISIUM_SPOT_DIAMETER_UM / factors["spot_diameter_fullres"]
    np.testing.assert_allclose(a.obsm["spatial"][:, 0], sub["pxl_col_in_fullres"] * um_per_px)
    np.testing.assert_allclose(a.obsm["spatial"][:, 1], sub["pxl_row_in_fullres"] * um_per_px)
    assert a.uns["msfm_spatial"]["unit"] == "um"
    assert a.uns["msfm_spatial"]["um_per_unit"] == 1.0
    assert a.uns["msfm_spatial"]["um_per_pixel"] == pytest.approx(um_per_px)

    lib = a.uns["spatial"]["custom"]  # the library id stored in the counts file
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(factors["spot_diameter_fullres"])
    assert lib["images"]["lowres"].shape == (600, 600, 3)
    assert lib["images"]["hires"].shape == (2000, 2000, 3)
    assert lib["images"]["lowres"].dtype == np.uint8
    assert lib["metadata"]["software_version"] == "spaceranger-1.0.0"
    # spatial_coords accepts the result as is (µm, no duplicates).
    assert spatial_coords(a).scale == 1.0


def test_visium_positions_full_slide_spacing_is_100um():
    pos = visium_positions(VISIUM)
    assert len(pos) == 4992
    assert int(pos["in_tissue"].sum()) == 4235
    assert ((pos["array_row"] + pos["array_col"]) % 2 == 0).all()
    factors = json.loads((VISIUM / "spatial" / "scalefactors_json.json").read_text())
    um = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy() * (
        VISIUM_SPOT_DIAMETER_UM / factors["spot_diameter_fullres"]
    )
    dist, _ = cKDTree(um).query(um, k=7)
    assert np.median(dist[:, 1:]) == pytest.approx(100.0, abs=1.5)
    assert np.percentile(dist[:, 1], 99) < 102.0


def _copy_visium(tmp_path: Path) -> Path:
    dst = tmp_path / "outs"
    shutil.copytree(VISIUM, dst)
    return dst


def test_read_visium_space_ranger_2_positions_with_header(tmp_path):
    dst = _copy_visium(tmp_path)
    old = dst / "spatial" / "tissue_positions_list.csv"
    table = pd.read_csv(old, header=None)
    table.columns = [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    table.to_csv(dst / "spatial" / "tissue_positions.csv", index=False)
    old.unlink()
    ref, new = read_visium(VISIUM), read_visium(dst, library_id="lib1")
    assert list(new.uns["spatial"]) == ["lib1"]
    assert new.uns["msfm_spatial"]["source"].endswith("spatial/tissue_positions.csv)")
    np.testing.assert_array_equal(new.obsm["spatial"], ref.obsm["spatial"])
    pd.testing.assert_frame_equal(new.obs, ref.obs)


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("filtered_feature_bc_matrix.h5", "counts file 'filtered_feature_bc_matrix.h5' is missing"),
        ("spatial/scalefactors_json.json", "scalefactors_json.json is missing"),
        ("spatial/tissue_positions_list.csv", "neither tissue_positions.csv nor tissue_positions_list.csv"),
        ("spatial", "has no 'spatial' subfolder"),
    ],
)
def test_read_visium_missing_files_are_named(tmp_path, remove, expected):
    dst = _copy_visium(tmp_path)
    target = dst / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MsfmInputError, match=expected):
        read_visium(dst)


def test_read_visium_missing_folder_and_images_optional(tmp_path):
    with pytest.raises(MsfmInputError, match="does not exist"):
        read_visium(tmp_path / "nope")
    dst = _copy_visium(tmp_path)
    (dst / "spatial" / "tissue_hires_image.png").unlink()
    a = read_visium(dst)
    assert list(a.uns["spatial"]["custom"]["images"]) == ["lowres"]


def test_read_visium_barcodes_not_in_positions(tmp_path):
    dst = _copy_visium(tmp_path)
    a = read_visium(VISIUM)
    path = dst / "spatial" / "tissue_positions_list.csv"
    table = pd.read_csv(path, header=None)
    table = table[table[0] != a.obs_names[0]]
    table.to_csv(path, header=False, index=False)
    with pytest.raises(
        MsfmInputError, match=r"1 of 100 barcodes are not in spatial/tissue_positions_list\.csv"
    ):
        read_visium(dst)


# ------------------------------------------------------------------------------------ inputs of spatial verbs
def test_as_spatial_anndata_reads_visium_folders_files_and_objects(tmp_path):
    assert is_visium_folder(VISIUM)
    assert not is_visium_folder(tmp_path)
    a = as_spatial_anndata(VISIUM)
    assert a.shape == (100, 100)
    assert a.obsm["spatial"].shape == (100, 2)
    # The only .h5 matrix of the folder is used when the default name is absent.
    copy = tmp_path / "outs"
    shutil.copytree(VISIUM, copy)
    (copy / "filtered_feature_bc_matrix.h5").rename(copy / "sample.h5")
    assert as_spatial_anndata(copy).shape == (100, 100)
    (copy / "sample.h5").unlink()
    with pytest.raises(MsfmInputError, match=r"0 \.h5 matrices"):
        as_spatial_anndata(copy)
    # AnnData objects pass through (or are copied); files go through msfm.data.read.
    assert as_spatial_anndata(a) is a
    assert as_spatial_anndata(a, copy=True) is not a
    a.write_h5ad(tmp_path / "v.h5ad")
    assert as_spatial_anndata(tmp_path / "v.h5ad").shape == (100, 100)
    with pytest.raises(MsfmInputError, match="does not exist"):
        as_spatial_anndata(tmp_path / "missing.h5ad")


def test_read_positions(tmp_path):
    path = tmp_path / "pos.tsv"
    pd.DataFrame({"X": [1.0, 2.5], "Y": [3.0, 4.0], "note": ["a", "b"]}).to_csv(path, sep="\t", index=False)
    np.testing.assert_array_equal(read_positions(path), [[1.0, 3.0], [2.5, 4.0]])
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(bad, index=False)
    with pytest.raises(MsfmInputError, match=r"region_polygon.*needs columns x and y"):
        read_positions(bad, what="region_polygon")
    nan = tmp_path / "nan.csv"
    nan.write_text("x,y\n1,\n")
    with pytest.raises(MsfmInputError, match="finite"):
        read_positions(nan)
    with pytest.raises(MsfmInputError, match="does not exist"):
        read_positions(tmp_path / "none.csv")
