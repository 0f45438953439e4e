"""Bundled histology files, the pyramid writer, the stain change and the synthetic cohort end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from msfm.data.resources import sha256_file
from msfm.data.slides import open_slide
from msfm.data.tissue import segment_tissue
from msfm.data.wsi import is_background_roi, plan_rois, read_roi
from msfm.datasets import histology
from msfm.datasets.histology import (
    COHORT_CLASSES,
    build_cohort,
    cmu_svs_path,
    histology_info,
    load_image,
    restain_od_matrix,
    stain_target_path,
    write_pyramid_tiff,
)
from msfm.errors import MsfmInputError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("cohort")
    return out, build_cohort(out, n_slides_per_class=1, seed=3)


def test_bundled_files_and_images() -> None:
    assert sha256_file(cmu_svs_path()).startswith("ed92d5a9f2e86df6")
    assert sha256_file(stain_target_path()).startswith("23c1e65fb65f2c5b")
    cmu = load_image("cmu")
    assert cmu.shape == (2967, 2220, 3)
    assert cmu.dtype == np.uint8
    cmu[0, 0] = 0  # a copy: the cached image is not touched
    assert load_image("cmu")[0, 0].tolist() != [0, 0, 0]
    assert load_image("tia_target").shape == (1000, 1000, 3)
    with pytest.raises(MsfmInputError, match="tia_target"):
        load_image("ihc")


def test_write_pyramid_tiff_is_atomic_and_validated(tmp_path: Path) -> None:
    img = np.ascontiguousarray(load_image("tia_target")[:512, :768])
    path = tmp_path / "p.tif"
    path.write_bytes(b"old")
    write_pyramid_tiff(img, path, mpp=0.25, levels=3, tile=128, compression="deflate")
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]  # replaced in place, no temporary left
    with open_slide(path, backend="tiffslide") as slide:
        assert slide.level_dimensions == ((768, 512), (384, 256), (192, 128))
        assert slide.mpp == pytest.approx(0.25)
        assert np.array_equal(slide.read_region((0, 0), 0, (768, 512)), img)  # lossless compression
    with pytest.raises(MsfmInputError, match="uint8 RGB"):
        write_pyramid_tiff(img.astype(np.float32), tmp_path / "f.tif", mpp=0.5)
    with pytest.raises(MsfmInputError, match="levels"):
        write_pyramid_tiff(img[:4, :4], tmp_path / "s.tif", mpp=0.5, levels=4)
    with pytest.raises(MsfmInputError, match="does not exist"):
        write_pyramid_tiff(img, tmp_path / "missing" / "x.tif", mpp=0.5)
    with pytest.raises(MsfmInputError, match="compression"):
        write_pyramid_tiff(img, tmp_path / "c.tif", mpp=0.5, compression="webp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif"]


def test_restain_matrix_rotates_and_scales_h_and_e() -> None:
    m = restain_od_matrix()
    h = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
    n = np.cross(h, e) / np.linalg.norm(np.cross(h, e))
    assert np.allclose(m @ n, n)
    mh, me = m @ h, m @ e
    assert np.linalg.norm(mh) == pytest.approx(1.25)
    assert np.linalg.norm(me) == pytest.approx(0.8)
    assert np.degrees(np.arccos(mh @ h / 1.25)) == pytest.approx(12.0)
    assert np.degrees(np.arccos(me @ e / 0.8)) == pytest.approx(15.0)
    assert abs(mh @ n) < 1e-12
    assert abs(me @ n) < 1e-12
    white = np.full((4, 4, 3), 255, np.uint8)
    assert np.array_equal(histology._restain(white, m), white)


def test_cohort_table_and_files(cohort: tuple[Path, pd.DataFrame]) -> None:
    out, table = cohort
    assert list(table.columns[:6]) == ["slide_id", "path", "source", "stain", "label", "restained"]
    assert table["label"].tolist() == list(COHORT_CLASSES)
    assert table["restained"].tolist() == [0, 0, 1]
    assert table["stain"].tolist() == ["original", "original", "altered"]
    assert table["n_tissue_cells"].between(2, 4).all()
    saved = pd.read_csv(out / "slides.csv")
    pd.testing.assert_frame_equal(saved, table)
    for row in table.itertuples():
        assert Path(row.path).is_file()
        assert Path(row.path).parent == out / "slides"
        with open_slide(row.path) as slide:
            assert slide.backend == "openslide"
            assert slide.level_count == 3
            assert slide.mpp == pytest.approx(0.5)
            assert slide.dimensions == (row.width, row.height)


def test_cohort_slides_give_one_roi_per_tissue_cell(cohort: tuple[Path, pd.DataFrame]) -> None:
    _, table = cohort
    means = {}
    for row in table.itertuples():
        with open_slide(row.path) as slide:
            thumb, ds = slide.thumbnail(1024)
            mask = segment_tissue(thumb, mpp_thumb=slide.mpp * ds)
            grid = plan_rois(slide, mask, ds, slide_mpp=slide.mpp)
            assert grid.roi_size_level0 == 2048
            assert len(grid) == row.n_tissue_cells
            assert (grid.tissue_fraction > 0.3).all()
            means[row.label] = thumb[mask].mean(axis=0)
            if row.label == "tia":
                roi = read_roi(slide, grid, len(grid) - 1)
                assert roi.shape == (2048, 2048, 3)
                assert not is_background_roi(roi)
    # The altered stain shows in the colour of the tissue (same source image, different stain).
    assert np.abs(means["cmu"] - means["cmu_restained"]).max() > 8.0


def test_cohort_is_deterministic(cohort: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    _out, table = cohort
    again = build_cohort(tmp_path, n_slides_per_class=1, seed=3, classes=("tia",))
    first = table.set_index("label").loc["tia"]
    assert again["n_tissue_cells"].iloc[0] == first["n_tissue_cells"]
    assert Path(again["path"].iloc[0]).read_bytes() == Path(first["path"]).read_bytes()
    other = build_cohort(tmp_path / "s4", n_slides_per_class=1, seed=4, classes=("tia",))
    assert Path(other["path"].iloc[0]).read_bytes() != Path(first["path"]).read_bytes()


def test_cohort_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(MsfmInputError, match="rois_per_slide"):
        build_cohort(tmp_path, rois_per_slide=(3, 1))
    with pytest.raises(MsfmInputError, match="unknown classes"):
        build_cohort(tmp_path, classes=("lung",))
    with pytest.raises(MsfmInputError, match="n_slides_per_class"):
        build_cohort(tmp_path, n_slides_per_class=0)


def test_histology_info() -> None:
    info = histology_info()
    assert set(info) == {"cmu_small_region", "tia_target", "histology_cohort"}
    for entry in info.values():
        assert {"function", "description", "source", "licence", "derived"} <= set(entry)
    assert "CC0" in info["cmu_small_region"]["licence"]
    assert "BSD-3" in info["tia_target"]["licence"]
    assert info["histology_cohort"]["derived"] is True
