"""ROI planning (mpp-based sizes, grid, tissue filter), ROI reading and the 84-token pyramid order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msfm.data.slides import Slide, open_slide
from msfm.data.wsi import (
    TOKEN_SLICES,
    RoiGrid,
    SlideTooSmallError,
    is_background_roi,
    n_pyramid_tokens,
    plan_rois,
    read_roi,
    roi_pyramid,
)
from msfm.datasets.histology import load_image, write_pyramid_tiff
from msfm.errors import MsfmInputError


def _geometry(width: int, height: int, downsamples: tuple[float, ...] = (1.0, 4.0, 16.0)) -> Slide:
    """A Slide with geometry only (no pixels): all that plan_rois needs."""
    dims = tuple((round(width / d), round(height / d)) for d in downsamples)
    return Slide(
        path=Path("virtual.svs"),
        backend="openslide",
        dimensions=(width, height),
        level_count=len(downsamples),
        level_dimensions=dims,
        level_downsamples=downsamples,
        mpp=None,
        objective_power=None,
    )


def _full_mask(slide: Slide, ds: float) -> np.ndarray:
    w, h = slide.dimensions
    return np.ones((round(h / ds), round(w / ds)), bool)


def test_roi_size_follows_mpp_not_level() -> None:
    slide = _geometry(20_000, 12_000)
    g20 = plan_rois(slide, _full_mask(slide, 32), 32, slide_mpp=0.5)
    assert g20.roi_size_level0 == 2048
    assert g20.roi_size == 2048
    assert g20.read_level == 0
    g40 = plan_rois(slide, _full_mask(slide, 32), 32, slide_mpp=0.25)  # a 40x scan
    assert g40.roi_size_level0 == 4096
    assert g40.read_level == 0  # levels are 1/4/16: the 2x level does not exist, read level 0 and shrink
    pyr = _geometry(20_000, 12_000, (1.0, 2.0, 4.0))
    assert plan_rois(pyr, _full_mask(pyr, 32), 32, slide_mpp=0.25).read_level == 1
    g_odd = plan_rois(slide, _full_mask(slide, 32), 32, slide_mpp=0.499)
    assert g_odd.roi_size_level0 == round(2048 * 0.5 / 0.499)


def test_grid_is_row_major_centred_and_complete() -> None:
    slide = _geometry(10_000, 5_000)
    grid = plan_rois(slide, _full_mask(slide, 10), 10, slide_mpp=0.5)
    assert grid.grid_shape == (2, 4)
    assert len(grid) == 8
    assert grid.coords.dtype == np.int64
    assert grid.coords.shape == (8, 2)
    # Centred: (10000 - 4 * 2048) // 2 = 904 and (5000 - 2 * 2048) // 2 = 452.
    assert grid.origin == (904, 452)
    expected = [(904 + c * 2048, 452 + r * 2048) for r in range(2) for c in range(4)]
    assert grid.coords.tolist() == [list(e) for e in expected]
    assert grid.grid_index.tolist() == [[r, c] for r in range(2) for c in range(4)]
    assert np.allclose(grid.tissue_fraction, 1.0)
    assert grid.tissue_fraction.dtype == np.float32
    # Overlapping grid: half-ROI step.
    half = plan_rois(slide, _full_mask(slide, 10), 10, slide_mpp=0.5, step=1024)
    assert half.grid_shape == (3, 8)
    assert half.step_level0 == 1024


def test_only_rois_with_tissue_are_kept() -> None:
    slide = _geometry(8192, 4096)
    ds = 16.0
    mask = np.zeros((256, 512), bool)
    mask[128 + 10 : 128 + 60, 256 + 20 : 256 + 100] = True  # tissue inside the ROI at row 1, col 2
    grid = plan_rois(slide, mask, ds, slide_mpp=0.5, min_tissue=0.1)
    assert grid.coords.tolist() == [[4096, 2048]]
    assert grid.grid_index.tolist() == [[1, 2]]
    assert grid.tissue_fraction[0] == pytest.approx(50 * 80 / 128**2, abs=1e-6)
    assert len(plan_rois(slide, mask, ds, slide_mpp=0.5, min_tissue=0.3)) == 0
    empty = plan_rois(slide, np.zeros_like(mask), ds, slide_mpp=0.5)
    assert len(empty) == 0
    assert empty.coords.shape == (0, 2)
    assert empty.grid_shape == (2, 4)


def test_slide_smaller_than_one_roi_raises_with_microns() -> None:
    slide = _geometry(1500, 3000)
    with pytest.raises(SlideTooSmallError) as err:
        plan_rois(slide, _full_mask(slide, 8), 8, slide_mpp=0.5)
    text = str(err.value)
    assert "750 x 1,500 µm" in text
    assert "1,024 x 1,024 µm" in text
    assert "roi_size" in text
    assert "--mpp" in text
    assert isinstance(err.value, MsfmInputError)
    # The same slide scanned at 0.25 µm/px is even smaller in microns.
    with pytest.raises(SlideTooSmallError, match="375 x 750 µm"):
        plan_rois(slide, _full_mask(slide, 8), 8, slide_mpp=0.25)


def test_bad_mask_and_arguments_raise() -> None:
    slide = _geometry(8192, 4096)
    with pytest.raises(MsfmInputError, match="does not cover"):
        plan_rois(slide, np.ones((100, 100), bool), 16, slide_mpp=0.5)
    with pytest.raises(MsfmInputError, match="slide_mpp"):
        plan_rois(slide, np.ones((256, 512), bool), 16, slide_mpp=0.0)
    with pytest.raises(MsfmInputError, match="min_tissue"):
        plan_rois(slide, np.ones((256, 512), bool), 16, slide_mpp=0.5, min_tissue=2.0)


@pytest.fixture(scope="module")
def small_pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    img = np.ascontiguousarray(load_image("cmu")[:2048, :2048])
    return write_pyramid_tiff(img, tmp_path_factory.mktemp("wsi") / "s.tif", mpp=0.5), img


def test_read_roi_uses_the_coarsest_adequate_level(small_pyramid: tuple[Path, np.ndarray]) -> None:
    path, img = small_pyramid
    with open_slide(path) as slide:
        thumb, ds = slide.thumbnail(256)
        mask = np.ones(thumb.shape[:2], bool)
        # 512 px at 1.0 µm/px = 1024 level-0 px, read from level 1 (downsample 2) with no resize.
        grid = plan_rois(slide, mask, ds, slide_mpp=0.5, target_mpp=1.0, roi_size=512)
        assert grid.read_level == 1
        assert grid.roi_size_level0 == 1024
        assert len(grid) == 4
        roi = read_roi(slide, grid, 3)
        assert roi.shape == (512, 512, 3)
        assert roi.dtype == np.uint8
        x, y = grid.coords[3]
        expected = np.asarray(Image.fromarray(img[y : y + 1024, x : x + 1024]).reduce(2))
        assert np.abs(roi.astype(int) - expected).mean() < 5.0  # JPEG
        # 384 px at 1.0 µm/px: 768 level-0 px read from level 1 (384 px there), no resize either.
        g2 = plan_rois(slide, mask, ds, slide_mpp=0.5, target_mpp=1.0, roi_size=384)
        assert read_roi(slide, g2, 0).shape == (384, 384, 3)
        # Target finer than any level but level 0: read level 0 and shrink 1024 -> 700.
        g3 = plan_rois(slide, mask, ds, slide_mpp=0.5, target_mpp=0.5 * 1024 / 700, roi_size=700)
        assert g3.read_level == 0
        assert g3.roi_size_level0 == 1024
        assert read_roi(slide, g3, 0).shape == (700, 700, 3)
        with pytest.raises(MsfmInputError, match="out of range"):
            read_roi(slide, grid, 4)


def _block_colour(r: int, c: int) -> tuple[int, int, int]:
    return (r * 30 + 5, c * 30 + 5, 128 + 8 * ((r + c) % 8))


def test_pyramid_token_order() -> None:
    roi = np.zeros((2048, 2048, 3), np.uint8)
    for r in range(8):
        for c in range(8):
            roi[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = _block_colour(r, c)
    tokens = roi_pyramid(roi)
    assert tokens.shape == (84, 256, 256, 3)
    assert tokens.dtype == np.uint8
    assert n_pyramid_tokens() == 84
    # 20x: token t is block (t // 8, t % 8), uniform.
    for t in range(64):
        assert (tokens[t] == _block_colour(t // 8, t % 8)).all()
    # 10x: token j = R*4 + C covers blocks (2R..2R+1, 2C..2C+1), one 128-px quadrant each.
    for j in range(16):
        rr, cc = divmod(j, 4)
        patch = tokens[TOKEN_SLICES["10x"]][j]
        for a in range(2):
            for b in range(2):
                quad = patch[a * 128 : (a + 1) * 128, b * 128 : (b + 1) * 128]
                assert (quad == _block_colour(2 * rr + a, 2 * cc + b)).all()
    # 5x: token k = R*2 + C covers blocks (4R..4R+3, 4C..4C+3), one 64-px cell each.
    for k in range(4):
        rr, cc = divmod(k, 2)
        patch = tokens[TOKEN_SLICES["5x"]][k]
        for a in range(4):
            for b in range(4):
                cell = patch[a * 64 : (a + 1) * 64, b * 64 : (b + 1) * 64]
                assert (cell == _block_colour(4 * rr + a, 4 * cc + b)).all()


def test_pyramid_scales_are_box_averages() -> None:
    rng = np.random.default_rng(0)
    roi = rng.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
    tokens = roi_pyramid(roi)  # 1024 px: 16 + 4 + 1 = 21 tokens
    assert tokens.shape == (21, 256, 256, 3)
    assert n_pyramid_tokens(1024) == 21
    half = roi.reshape(512, 2, 512, 2, 3).mean(axis=(1, 3))
    assert np.abs(tokens[16 + 1].astype(float) - half[:256, 256:]).max() <= 1.0  # 10x token (0, 1)
    quarter = roi.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
    assert np.abs(tokens[20].astype(float) - quarter).max() <= 1.0
    assert roi_pyramid(roi[:512, :512], n_scales=2).shape == (5, 256, 256, 3)


def test_pyramid_rejects_sizes_that_do_not_tile() -> None:
    with pytest.raises(MsfmInputError, match="divisible"):
        roi_pyramid(np.zeros((1536, 1536, 3), np.uint8))
    with pytest.raises(MsfmInputError, match="square"):
        roi_pyramid(np.zeros((2048, 1024, 3), np.uint8))


def test_background_roi() -> None:
    assert is_background_roi(np.full((256, 256, 3), 240, np.uint8))
    assert not is_background_roi(np.ascontiguousarray(load_image("tia_target")[:256, :256]))


def test_roigrid_len() -> None:
    g = RoiGrid(
        coords=np.zeros((3, 2), np.int64),
        tissue_fraction=np.ones(3, np.float32),
        roi_size_level0=2048,
        roi_size=2048,
        target_mpp=0.5,
        slide_mpp=0.5,
        read_level=0,
        grid_shape=(1, 3),
    )
    assert len(g) == 3
