"""Bad inputs of issue 12 (the BAD-INPUT rows): each ends in an msfm error or a documented, tested behaviour.

Rows: damaged or mislabelled ``.h5ad`` files, non-UTF-8 names, float16 and other matrix dtypes, CSV files without a
header row, GeST coordinates in the wrong unit, scanpy-style Visium pixel coordinates, TPM given as pre-normalised
values, and mouse gene symbols without ``species="mouse"``.
"""

from __future__ import annotations

import gzip
import hashlib
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from msfm.data import CellSource, GenePanel, SpatialReadOptions, harmonize_genes, prepare_cells, read
from msfm.data.normalize import LOG1P_CP10K_MAX, PRE_NORMALIZED_MAX, check_log1p_values
from msfm.data.spatial import (
    VISIUM_SPOT_DIAMETER_UM,
    as_spatial_anndata,
    spatial_coords,
    visium_positions,
)
from msfm.errors import MsfmInputError

GENES = ["ACTB", "GAPDH", "CD3E", "MS4A1"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _counts_adata() -> ad.AnnData:
    x = sp.csr_matrix(np.array([[1, 0, 3, 0], [0, 2, 0, 5], [4, 0, 0, 1]], dtype=np.float32))
    return ad.AnnData(x, obs=pd.DataFrame(index=["c1", "c2", "c3"]), var=pd.DataFrame(index=GENES))


@pytest.fixture
def good_h5ad(tmp_path) -> Path:
    path = tmp_path / "good.h5ad"
    _counts_adata().write_h5ad(path)
    return path


# --------------------------------------------------------------------------------- 1. damaged / wrong .h5ad files
def _make(kind: str, good: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.h5ad"
    data = good.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif kind == "jpeg":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    elif kind == "gzip":
        path.write_bytes(gzip.compress(data))
    elif kind == "zip":
        path.write_bytes(b"PK\x03\x04" + bytes(200))
    elif kind == "text":
        path.write_text("cell_id,ACTB,GAPDH\nc1,1,0\n")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        damaged = bytearray(data)
        damaged[96:1500] = b"\xab" * (1500 - 96)  # the root group's object header
        path.write_bytes(bytes(damaged))
    elif kind == "not_anndata":
        with h5py.File(path, "w") as fh:
            fh["features"] = np.arange(3)
    return path


BAD_FILES = [
    ("empty", r"but it is empty \(0 bytes\)"),
    ("png", r"but it is a PNG image"),
    ("jpeg", r"but it is a JPEG image"),
    ("gzip", r"but it is a gzip-compressed file \(decompress it first"),
    ("zip", r"but it is a zip archive \(extract it first"),
    ("text", r"but it is a text file \(first line: 'cell_id,ACTB,GAPDH'\)"),
    ("truncated", r"is an HDF5 file but cannot be opened \(.*truncated.*\); it is truncated or damaged"),
    ("corrupt", r"is an HDF5 file but cannot be opened .*it is truncated or damaged"),
    ("not_anndata", r"is an HDF5 file but not an AnnData \(\.h5ad\): it has no 'obs' and 'var' groups"),
]


@pytest.mark.parametrize("backed", [False, True], ids=["in_memory", "backed"])
@pytest.mark.parametrize(("kind", "pattern"), BAD_FILES, ids=[k for k, _ in BAD_FILES])
def test_damaged_or_mislabelled_h5ad_is_named(kind, pattern, backed, good_h5ad, tmp_path):
    path = _make(kind, good_h5ad, tmp_path)
    before = _digest(path)
    with pytest.raises(MsfmInputError, match=pattern) as err:
        read(path, backed=backed)
    text = str(err.value)
    assert f"{kind}.h5ad" in text  # names the file
    assert "Copy or" in text or "Pass" in text or "Write" in text  # and says how to fix it
    assert _digest(path) == before  # never touched


def test_verbs_report_bad_files_in_one_line_through_as_anndata(good_h5ad, tmp_path):
    from msfm.data import as_anndata

    with pytest.raises(MsfmInputError, match="but it is a PNG image"):
        as_anndata(_make("png", good_h5ad, tmp_path))
    with pytest.raises(MsfmInputError, match="but it is empty"):
        as_spatial_anndata(_make("empty", good_h5ad, tmp_path))


def test_png_named_h5_and_folder_named_h5ad(good_h5ad, tmp_path):
    fake = tmp_path / "filtered_feature_bc_matrix.h5"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(MsfmInputError, match=r"should be a 10x Genomics HDF5 \(\.h5\) file.*PNG image"):
        read(fake)
    folder = tmp_path / "cells.h5ad"
    folder.mkdir()
    with pytest.raises(MsfmInputError, match=r"is a folder, not an AnnData \(\.h5ad\) file"):
        read(folder)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_zarr_store_is_named(tmp_path):
    store = tmp_path / "cells.zarr"
    _counts_adata().write_zarr(store)
    metas = [m for m in (store / ".zmetadata", store / "zarr.json") if m.exists()]
    assert metas  # the consolidated metadata anndata reads first
    metas[0].write_text("{truncated")  # a half-copied store
    with pytest.raises(MsfmInputError, match=r"cells\.zarr.*cannot be read as an AnnData zarr store"):
        read(store)


# ---------------------------------------------------------------------------------------- 2. non-UTF-8 names
def _write_non_utf8(path: Path, where: str) -> None:
    _counts_adata().write_h5ad(path)
    with h5py.File(path, "r+") as fh:
        group = fh[where]
        name = group.attrs["_index"]
        values = [v.encode() for v in group[name].asstr()[()]]
        values[1] = values[1][:2] + b"\xff" + values[1][2:]  # a Latin-1 / binary byte in one name
        attrs = dict(group[name].attrs)
        del group[name]
        ds = group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8"))
        for k, v in attrs.items():
            ds.attrs[k] = v


@pytest.mark.parametrize("backed", [False, True], ids=["in_memory", "backed"])
@pytest.mark.parametrize(
    ("where", "label"), [("var", "var index (gene names)"), ("obs", "obs index (cell names)")]
)
def test_non_utf8_names_name_the_column(where, label, backed, tmp_path):
    path = tmp_path / "latin1.h5ad"
    _write_non_utf8(path, where)
    with pytest.raises(MsfmInputError, match=r"not valid UTF-8") as err:
        read(path, backed=backed)
    text = str(err.value)
    assert f"the {label} holds text" in text
    assert r"\xff" in text  # the offending value is shown
    assert "re-encode those names as UTF-8" in text


# ------------------------------------------------------------------------------------------------- 3. dtypes
def _float16_file(path: Path, *, sparse: bool) -> np.ndarray:
    x = np.array([[1, 0, 3, 0], [0, 2, 0, 5], [4, 0, 0, 1]], dtype=np.float32)
    if sparse:
        ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=GENES)).write_h5ad(path)
        with h5py.File(path, "r+") as fh:
            data = fh["X/data"][()].astype(np.float16)
            del fh["X/data"]
            fh["X"].create_dataset("data", data=data)
    else:
        ad.AnnData(x.astype(np.float16), var=pd.DataFrame(index=GENES)).write_h5ad(path)
    return x


@pytest.mark.parametrize("backed", [False, True], ids=["in_memory", "backed"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_float16_x_is_read_as_float32(sparse, backed, tmp_path):
    path = tmp_path / "half.h5ad"
    expected = _float16_file(path, sparse=sparse)
    if sparse and not backed:  # anndata alone fails here (scipy.sparse has no float16)
        with pytest.raises(ValueError, match="float16"):
            ad.read_h5ad(path)
    adata = read(path, backed=backed)
    if not backed:
        assert adata.X.dtype == np.float32
    source = CellSource(adata)
    assert source.kind == "counts"
    rows = source.rows([2, 0])
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows.toarray(), expected[[2, 0]])
    # prepare_cells (every cell family's entry point) takes it too
    source, mapping = prepare_cells(adata, GenePanel.from_symbols(GENES), min_panel_fraction=0.0)
    np.testing.assert_array_equal(mapping.apply(source.rows([1])).toarray(), expected[[1]])


def test_backed_float16_csc_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "half_csc.h5ad"
    x = np.array([[1, 0, 3, 0], [0, 2, 0, 5]], dtype=np.float32)
    ad.AnnData(sp.csc_matrix(x), var=pd.DataFrame(index=GENES)).write_h5ad(path)
    with h5py.File(path, "r+") as fh:
        data = fh["X/data"][()].astype(np.float16)
        del fh["X/data"]
        fh["X"].create_dataset("data", data=data)
    with pytest.raises(MsfmInputError, match=r"backed float16 csc matrix.*Read the file in memory"):
        CellSource(read(path, backed=True))
    np.testing.assert_array_equal(CellSource(read(path)).rows([1, 0]).toarray(), x[[1, 0]])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_float16_sparse_zarr_is_read_as_float32(tmp_path):
    import zarr

    store = tmp_path / "half.zarr"
    x = np.array([[1, 0, 3, 0], [0, 2, 0, 5], [4, 0, 0, 1]], dtype=np.float32)
    ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=GENES)).write_zarr(store)
    group = zarr.open_group(str(store), mode="r+")
    data, attrs = group["X/data"][:].astype(np.float16), dict(group["X/data"].attrs)
    del group["X/data"]
    half = group["X"].create_array("data", shape=data.shape, dtype=np.float16)
    half[:] = data
    half.attrs.update(attrs)
    zarr.consolidate_metadata(str(store))
    with pytest.raises(ValueError, match="float16"):  # what anndata alone does
        ad.read_zarr(store)
    adata = read(store)
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), x)


def test_in_memory_float16_anndata_is_upcast_and_left_untouched():
    x = np.array([[1, 0, 3], [0, 2, 0]], dtype=np.float16)
    adata = ad.AnnData(x)
    out = CellSource(adata).rows([1, 0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.toarray(), x[[1, 0]].astype(np.float32))
    assert adata.X.dtype == np.float16


@pytest.mark.parametrize(
    ("dtype", "pattern"),
    [
        (bool, r"dtype bool; expected numbers.*If the 0/1 values are counts"),
        (np.complex64, r"dtype complex64 \(complex\); expected numbers.*real part"),
        (object, r"dtype object; expected numbers"),
    ],
)
def test_unsupported_dtypes_are_refused(dtype, pattern):
    with pytest.raises(MsfmInputError, match=pattern):
        CellSource(ad.AnnData(np.ones((3, 2), dtype=dtype)))


# ----------------------------------------------------------------------------------- 4. CSV without a header
def test_csv_without_header_row_is_refused(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("c1,1,0,3\nc2,0,2,0\nc3,5,0,0\n")
    before = _digest(path)
    with pytest.raises(MsfmInputError) as err:
        read(path)
    text = str(err.value)
    assert "the first row looks like numbers (1, 0, 3)" in text
    assert "expected a comma-separated header row 'cell_id,GENE1,GENE2,...'" in text
    assert "Fix: add the header row" in text
    assert text.startswith(f"{path}: the first row looks like numbers")  # about the header, not gene names
    assert _digest(path) == before


def test_tsv_without_header_row_is_refused(tmp_path):
    path = tmp_path / "cells.tsv"
    path.write_text("c1\t0.5\t1.2\nc2\t0\t2\n")
    with pytest.raises(MsfmInputError, match=r"first row looks like numbers \(0\.5, 1\.2\).*tab-separated"):
        read(path)


@pytest.mark.parametrize(
    "header",
    ["cell,ACTB,GAPDH,CD3E", "cell,7157,1956,672", ",0,1,2"],
    ids=["symbols", "entrez_ids", "pandas_default_columns"],
)
def test_numeric_but_real_headers_still_read(header, tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text(f"{header}\nc1,1,0,3\nc2,0,2,0\n")
    adata = read(path)
    assert list(adata.var_names) == header.split(",")[1:]
    assert list(adata.obs_names) == ["c1", "c2"]


# ---------------------------------------------------------------------------- 5. GeST coordinates not in µm
@pytest.fixture(scope="module")
def scc():
    from msfm.datasets import scc_st

    return scc_st()


@pytest.mark.parametrize(
    ("factor", "unit", "scale"),
    [(1e-3, "millimetres", "1000"), (1e3, "nanometres", "0.001")],
    ids=["mm", "nm"],
)
def test_coordinates_in_mm_or_nm_are_refused(scc, factor, unit, scale):
    adata = scc.copy()
    del adata.uns["msfm_spatial"]
    adata.obsm["spatial"] = np.asarray(scc.obsm["spatial"]) * factor
    with pytest.raises(MsfmInputError) as err:
        spatial_coords(adata)
    text = str(err.value)
    # the measured spacing (the ST array has 100 µm between spots), what is expected, and the fix
    assert f"put neighbouring cells a median {100 * factor:.3g} µm apart" in text
    assert "msfm expects micrometres" in text
    assert f"The coordinates look like {unit}" in text
    assert f"pass scale=<µm per unit> (CLI: --scale), here probably scale={scale}" in text
    # the suggested scale makes them acceptable
    fixed = spatial_coords(adata, scale=float(scale))
    np.testing.assert_allclose(fixed.xy, scc.obsm["spatial"], rtol=1e-9)


def test_implausible_units_reach_gest_through_spatial_cells(scc):
    from msfm.models.gest.data import spatial_cells

    adata = scc.copy()
    adata.uns["msfm_spatial"] = {"unit": "mm", "um_per_unit": 1.0}  # a wrong recorded scale is caught too
    adata.obsm["spatial"] = np.asarray(scc.obsm["spatial"]) / 1000.0
    with pytest.raises(
        MsfmInputError, match=r"uns\['msfm_spatial'\]\['um_per_unit'\].*look like millimetres"
    ):
        spatial_cells(adata, None)


def test_section_wider_than_a_slide_is_refused():
    adata = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    adata.obsm["spatial"] = np.array([[0.0, 0.0], [50.0, 0.0], [2e5, 0.0], [2e5 + 50, 0.0]])
    with pytest.raises(MsfmInputError, match=r"span 2e\+05 µm.*at most 100000 µm"):
        spatial_coords(adata)


def test_plausible_real_spacings_pass(scc):
    from msfm.datasets import semi_real_tissue, visium_demo

    assert spatial_coords(scc).scale == 1.0  # ST spots, 100 µm
    assert spatial_coords(visium_demo()).scale == 1.0  # Visium spots read by msfm, already µm
    assert len(spatial_coords(semi_real_tissue(n_cells=300, side_um=300.0))) == 300  # cells ~17 µm apart


# ---------------------------------------------------------------------- 6. scanpy-style Visium (pixel) coords
def _scanpy_style_visium() -> tuple[ad.AnnData, ad.AnnData]:
    """The bundled Visium data as msfm reads it (µm) and as scanpy.read_visium lays it out (pixels)."""
    from msfm.datasets import visium_demo
    from msfm.datasets.spatial import visium_folder

    um = visium_demo()
    pos = visium_positions(visium_folder()).loc[um.obs_names]
    pixels = um.copy()
    del pixels.uns["msfm_spatial"]
    pixels.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    return um, pixels


def test_scanpy_visium_pixels_are_converted_with_a_warning():
    um, pixels = _scanpy_style_visium()
    diameter = pixels.uns["spatial"]["custom"]["scalefactors"]["spot_diameter_fullres"]
    factor = VISIUM_SPOT_DIAMETER_UM / diameter
    with pytest.warns(
        UserWarning, match=rf"converting to µm with {factor:.6g} µm per pixel = 65 µm / spot_diameter"
    ):
        coords = spatial_coords(pixels)
    np.testing.assert_allclose(coords.xy, um.obsm["spatial"], rtol=1e-12)  # same µm as msfm's own reader
    assert coords.scale == pytest.approx(factor)
    assert coords.scale_source.startswith("Visium scale factors")
    record = pixels.uns["msfm_spatial"]  # the factor is recorded in the output's uns
    assert record["um_per_unit"] == pytest.approx(factor)
    assert record["unit"] == "pixel"
    assert "spot_diameter_fullres" in record["source"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = spatial_coords(pixels)  # now recorded: no second warning, same result
    np.testing.assert_array_equal(again.xy, coords.xy)
    # an explicit scale wins (e.g. coordinates the user already converted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spatial_coords(um, scale=1.0).scale == 1.0


def test_scanpy_visium_without_spot_diameter_is_refused():
    _, pixels = _scanpy_style_visium()
    del pixels.uns["spatial"]["custom"]["scalefactors"]["spot_diameter_fullres"]
    with pytest.raises(
        MsfmInputError, match=r"spot_diameter_fullres=None, so pixels cannot be converted to µm.*pass scale="
    ):
        spatial_coords(pixels)


def test_scanpy_visium_libraries_of_different_pixel_sizes_are_refused():
    _, pixels = _scanpy_style_visium()
    lib = pixels.uns["spatial"]["custom"]
    pixels.uns["spatial"]["other"] = {"scalefactors": {**lib["scalefactors"], "spot_diameter_fullres": 120.0}}
    with pytest.raises(MsfmInputError, match=r"2 Visium libraries with different pixel sizes"):
        spatial_coords(pixels)


# --------------------------------------------------------------------- 7. TPM given as pre-normalised values
def _tpm(n: int = 40, genes: list[str] | None = None, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = genes or [f"G{i}" for i in range(30)]
    x = rng.gamma(0.3, 2000.0, size=(n, len(genes)))
    x[rng.random(x.shape) < 0.6] = 0
    x = x / np.maximum(x.sum(1, keepdims=True), 1) * 1e6  # TPM: rows sum to a million
    x = np.minimum(x, 30000.0)
    x[3, 2] = 34215.0  # the largest value of the glioma data of the issue
    return ad.AnnData(sp.csr_matrix(x.astype(np.float32)), var=pd.DataFrame(index=genes))


def test_tpm_is_refused_as_pre_normalized():
    adata = _tpm()
    before = adata.X.copy()
    with pytest.raises(MsfmInputError) as err:
        CellSource(adata, pre_normalized=True)
    text = str(err.value)
    assert "pre_normalized=True, but X holds values up to" in text
    assert f"lies in [0, {LOG1P_CP10K_MAX:.2f}]" in text
    assert "They look like TPM, CPM or raw counts" in text
    assert "pass the raw counts without pre_normalized (CLI: drop --pre-normalized" in text
    assert "sc.pp.log1p" in text
    assert (adata.X != before).nnz == 0


def test_pre_normalized_accepts_log1p_cp10k_and_warns_above_its_range():
    adata = _tpm()
    x = adata.X.copy()
    x.data = np.log1p(x.data / 100.0)  # TPM -> per 10k -> log1p: max log1p(342) = 5.8
    ok = ad.AnnData(x, var=adata.var)
    with pytest.warns(UserWarning, match="used as already log-normalised"):
        assert CellSource(ok, pre_normalized=True).kind == "normalized"
    log1p_cpm = ad.AnnData(
        sp.csr_matrix(np.log1p(adata.X.toarray())), var=adata.var
    )  # max log1p(34215) = 10.4
    with pytest.warns(
        UserWarning, match=r"holds values up to 10\.4\d*, above 9\.21, the largest log1p CP10k"
    ):
        CellSource(log1p_cpm, pre_normalized=True)


def test_pre_normalized_refuses_integer_only_counts():
    counts = ad.AnnData(sp.csr_matrix(np.array([[3.0, 0.0], [1.0, 2.0]])))
    with pytest.raises(MsfmInputError, match=r"only integer values \(max 3\): these look like raw counts"):
        CellSource(counts, pre_normalized=True)
    zeros = ad.AnnData(sp.csr_matrix((2, 2), dtype=np.float32))  # nothing expressed: nothing to refuse
    with pytest.warns(UserWarning, match="already log-normalised"):
        assert CellSource(zeros, pre_normalized=True).kind == "normalized"


def test_pre_normalized_check_runs_on_each_backed_chunk(tmp_path):
    """Backed data: the first chunk decides, later chunks are checked as they are read (never the whole file)."""
    adata = _tpm(n=60)
    x = adata.X.copy()
    x.data = np.log1p(x.data / 100.0)
    x = x.tolil()
    x[50, 1] = 500.0  # beyond the first chunk
    ad.AnnData(x.tocsr(), var=adata.var).write_h5ad(tmp_path / "late.h5ad")
    with pytest.warns(UserWarning, match="already log-normalised"):
        source = CellSource(read(tmp_path / "late.h5ad", backed=True), pre_normalized=True, chunk_size=10)
    source.rows([0, 1, 2])
    with pytest.raises(MsfmInputError, match=r"values up to 500 \(cell '50', row 50\).*not log1p-normalised"):
        source.rows([49, 50])


def test_check_log1p_values_is_the_one_shared_check():
    assert check_log1p_values(np.array([[0.0, 1.5]]), warn=False) == 1.5
    with pytest.raises(MsfmInputError, match=rf"msfm accepts up to {PRE_NORMALIZED_MAX:g}"):
        check_log1p_values(sp.csr_matrix(np.array([[0.0, 25.0]])), cell_names=["a"])


def test_tpm_refused_by_each_family_entry_point():
    """scFoundation and scMulan prepare cells with prepare_cells, GeST with spatial_cells: all refuse TPM."""
    from msfm.models.gest.data import spatial_cells

    genes = GenePanel.scfoundation().symbols[:30]
    adata = _tpm(genes=list(genes))
    with pytest.raises(MsfmInputError, match="They look like TPM"):
        prepare_cells(adata, GenePanel.scfoundation(), pre_normalized=True, min_panel_fraction=0.0)
    adata.obsm["spatial"] = np.stack([np.arange(adata.n_obs) * 20.0, np.zeros(adata.n_obs)], axis=1)
    with pytest.raises(MsfmInputError, match="They look like TPM"):
        spatial_cells(adata, None, SpatialReadOptions(pre_normalized=True))


@pytest.fixture(scope="module")
def scmulan_ckpt(tmp_path_factory):
    import msfm

    fixture = Path(__file__).parents[1] / "fixtures" / "scmulan" / "tiny_official.pt"
    return msfm.scmulan.convert(fixture, tmp_path_factory.mktemp("scmulan") / "ckpt")


def test_scmulan_predict_refuses_tpm_with_pre_normalized(scmulan_ckpt, tmp_path):
    """The issue's case: TPM (max 34,215) with pre_normalized=True must not be annotated."""
    import msfm
    from msfm.tokenizers.cell_sentence import CellSentenceVocab

    genes = list(CellSentenceVocab.official().genes[:30])
    adata = _tpm(genes=genes)
    out = tmp_path / "annotated.h5ad"
    with pytest.raises(MsfmInputError, match=r"values up to 34,215 .*They look like TPM"):
        msfm.scmulan.predict(adata, scmulan_ckpt, pre_normalized=True, progress=False, device="cpu", out=out)
    assert not out.exists()
    assert "scmulan_cell_type" not in adata.obs


# ------------------------------------------------------------------------ 9. mouse symbols without species
MOUSE = ["Actb", "Cd3e", "Gapdh", "Ms4a1", "Cd19", "Ptprc", "Cd4", "Cd8a", "Nkg7", "Lyz2"]


def test_mouse_symbols_without_species_warn():
    with pytest.warns(UserWarning, match=r"matched only after case folding.*look like mouse genes") as rec:
        mapping = harmonize_genes(MOUSE, GenePanel.scfoundation(), min_panel_fraction=0.0)
    text = str(rec[0].message)
    assert "pass species='mouse' (CLI: --species mouse)" in text
    assert "'Actb'" in text
    assert mapping.report["matched_by_method"]["case_insensitive"] > 0  # still mapped, as documented


def test_no_mouse_hint_for_mouse_species_or_human_symbols():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        harmonize_genes(
            MOUSE,
            GenePanel.scfoundation(),
            species="mouse",
            **{"min_panel_fraction": 0.0, "warn_panel_fraction": 0.0},
        )
        harmonize_genes(
            [g.upper() for g in MOUSE],
            GenePanel.scfoundation(),
            min_panel_fraction=0.0,
            warn_panel_fraction=0.0,
        )
        # human data with a few lower-case names (e.g. 'Metazoa_SRP'-style) is not mouse
        harmonize_genes(
            ["ACTB", "CD3E", "GAPDH", "MS4A1", "Cd19"],
            GenePanel.scfoundation(),
            min_panel_fraction=0.0,
            warn_panel_fraction=0.0,
        )


def test_mouse_hint_reaches_prepare_cells():
    adata = ad.AnnData(
        sp.csr_matrix(np.ones((2, len(MOUSE)), dtype=np.float32)), var=pd.DataFrame(index=MOUSE)
    )
    with pytest.warns(UserWarning, match="species='mouse'"):
        prepare_cells(adata, GenePanel.scfoundation(), min_panel_fraction=0.0)
