"""Slide reading: the bundled Aperio SVS with each backend, generated pyramids, errors and mpp handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from msfm.data.slides import SlideReadError, open_slide, require_mpp
from msfm.datasets.histology import cmu_svs_path, load_image, write_pyramid_tiff
from msfm.errors import MsfmInputError

SVS_SIZE = (2220, 2967)  # (width, height), verified with openslide and tiffslide


@pytest.fixture(scope="module")
def svs() -> Path:
    return cmu_svs_path()


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    # 1536 x 1024 px of real tissue: large enough for a 3-level pyramid, small enough to write fast.
    return np.ascontiguousarray(load_image("cmu")[1000:2024, 300:1836])


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory, crop: np.ndarray) -> Path:
    return write_pyramid_tiff(crop, tmp_path_factory.mktemp("pyr") / "pyr.tif", mpp=0.5, levels=3)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_bundled_svs_opens_with_each_backend(svs: Path, backend: str) -> None:
    with open_slide(svs, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.dimensions == SVS_SIZE
        assert slide.level_count == 1
        assert slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20.0
        region = slide.read_region((1000, 1500), 0, (64, 32))
        assert region.shape == (32, 64, 3)
        assert region.dtype == np.uint8


def test_auto_prefers_openslide(svs: Path) -> None:
    with open_slide(svs) as slide:
        assert slide.backend == "openslide"
        assert slide.mpp_source == "openslide.mpp-x"


def test_svs_regions_agree_between_backends_and_outside_is_white(svs: Path) -> None:
    with open_slide(svs, backend="openslide") as a, open_slide(svs, backend="tiffslide") as b:
        # A region that sticks out past the top-left and one past the bottom-right corner.
        for loc in ((-40, -30), (2220 - 100, 2967 - 50)):
            ra = a.read_region(loc, 0, (200, 120))
            rb = b.read_region(loc, 0, (200, 120))
            assert np.abs(ra.astype(int) - rb).mean() < 2.0  # same JPEG tiles; decoders may differ slightly
        outside = a.read_region((-40, -30), 0, (200, 120))[:30, :, :]
        assert (outside == 255).all()
        outside_b = b.read_region((2220 - 100, 2967 - 50), 0, (200, 120))[:, 100:, :]
        assert (outside_b == 255).all()
        assert (a.read_region((5000, 5000), 0, (10, 10)) == 255).all()


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_generated_pyramid_has_three_levels(pyramid: Path, crop: np.ndarray, backend: str) -> None:
    with open_slide(pyramid, backend=backend) as slide:
        assert slide.level_count == 3
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert slide.level_dimensions == ((1536, 1024), (768, 512), (384, 256))
        assert slide.mpp == pytest.approx(0.5)  # from the resolution tags (pixels per cm)
        level0 = slide.read_region((0, 0), 0, slide.dimensions)
        assert np.abs(level0.astype(int) - crop).mean() < 5.0  # JPEG (quality 95) on dense tissue
        assert slide.best_level_for_downsample(3.0) == 1
        assert slide.best_level_for_downsample(4.0) == 2
        assert slide.best_level_for_downsample(0.5) == 0


def test_pyramid_read_region_agrees_between_backends(pyramid: Path) -> None:
    with open_slide(pyramid, backend="openslide") as a, open_slide(pyramid, backend="tiffslide") as b:
        for level in range(3):
            ra = a.read_region((200, 120), level, (160, 96))
            rb = b.read_region((200, 120), level, (160, 96))
            assert np.abs(ra.astype(int) - rb).mean() < 2.0


def test_thumbnail_matches_a_resized_read(pyramid: Path, crop: np.ndarray) -> None:
    with open_slide(pyramid) as slide:
        thumb, ds = slide.thumbnail(300)
    assert thumb.shape == (200, 300, 3)
    assert ds == pytest.approx(1536 / 300)
    expected = np.asarray(Image.fromarray(crop).resize((300, 200), Image.Resampling.BOX))
    # Read from level 2 (JPEG, 4x averaged) and then resized: close to, not equal to, a direct resize.
    assert np.abs(thumb.astype(int) - expected).mean() < 10.0
    assert np.corrcoef(thumb.ravel(), expected.ravel())[0, 1] > 0.95


def test_thumbnail_of_single_level_slide_in_bands(svs: Path) -> None:
    with open_slide(svs, backend="tiffslide") as slide:
        full = slide.read_region((0, 0), 0, slide.dimensions)
        import msfm.data.slides as slides_mod

        old = slides_mod._THUMB_BAND_PIXELS
        slides_mod._THUMB_BAND_PIXELS = 1_000_000  # force several bands: they must join without seams
        try:
            thumb, _ds = slide.thumbnail(512)
        finally:
            slides_mod._THUMB_BAND_PIXELS = old
    assert max(thumb.shape[:2]) == 512
    expected = np.asarray(Image.fromarray(full).resize(thumb.shape[1::-1], Image.Resampling.BOX))
    assert np.abs(thumb.astype(int) - expected).max() <= 2


def test_truncated_svs_raises(svs: Path, tmp_path: Path) -> None:
    data = svs.read_bytes()
    for frac in (0.5, 0.9):
        bad = tmp_path / f"cut{frac}.svs"
        bad.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(SlideReadError) as err:
            open_slide(bad)
        text = str(err.value)
        assert bad.name in text
        for name in ("openslide", "tiffslide", "image"):
            assert f"{name}:" in text
    # At 90 % the first directory and all level-0 tiles survive: tiffslide opens it, the structure check refuses.
    assert "past the end of the file" in text


def test_text_file_named_svs_raises(tmp_path: Path) -> None:
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide\n" * 20)
    with pytest.raises(SlideReadError, match=r"notes\.svs.*openslide: .*tiffslide: .*image: "):
        open_slide(bad)


def test_missing_file_and_bad_arguments(tmp_path: Path, svs: Path) -> None:
    with pytest.raises(SlideReadError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(MsfmInputError, match="backend"):
        open_slide(svs, backend="bioformats")
    with pytest.raises(MsfmInputError, match="mpp"):
        open_slide(svs, mpp=-1.0)
    slide = open_slide(svs)
    with pytest.raises(MsfmInputError, match="level"):
        slide.read_region((0, 0), 1, (10, 10))
    slide.close()
    with pytest.raises(SlideReadError, match="closed"):
        slide.read_region((0, 0), 0, (10, 10))


def test_png_has_no_mpp_and_require_mpp_explains_override(tmp_path: Path, crop: np.ndarray) -> None:
    png = tmp_path / "tile.png"
    Image.fromarray(crop[:300, :400]).save(png)
    with open_slide(png) as slide:
        assert slide.backend == "image"
        assert slide.dimensions == (400, 300)
        assert slide.mpp is None
        with pytest.raises(MsfmInputError, match="--mpp"):
            require_mpp(slide)
        assert require_mpp(slide, 0.5) == 0.5
        assert np.array_equal(slide.read_region((10, 20), 0, (30, 40)), crop[20:60, 10:40])
    with open_slide(png, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.mpp_source == "override"
        assert require_mpp(slide) == 0.25


def test_override_wins_over_file_mpp(svs: Path) -> None:
    with open_slide(svs, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert require_mpp(slide, 0.3) == 0.3


def test_png_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 15:, 3] = 255  # right half opaque red-ish, left half transparent
    png = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(png)
    with open_slide(png, backend="image") as slide:
        out = slide.read_region((0, 0), 0, (30, 20))
    assert (out[:, :15] == 255).all()
    assert (out[:, 15:, 0] == 200).all()
    assert (out[:, 15:, 1] == 0).all()


def test_plain_tiff_mpp_from_resolution_tags(tmp_path: Path, crop: np.ndarray) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(
        path,
        crop[:256, :384],
        photometric="rgb",
        resolution=(25400 / 0.3, 25400 / 0.3),
        resolutionunit="INCH",
    )
    with open_slide(path, backend="image") as slide:
        assert slide.dimensions == (384, 256)
        assert slide.mpp == pytest.approx(0.3)
        assert np.array_equal(slide.read_region((0, 0), 0, (384, 256)), crop[:256, :384])
    with open_slide(path) as slide:  # whichever backend takes it, the mpp is the same
        assert slide.mpp == pytest.approx(0.3)


def test_subifd_pyramid_pitfall(tmp_path: Path, crop: np.ndarray) -> None:
    """A pyramid stored as SubIFDs: tiffslide sees 3 levels, OpenSlide 4 only level 0 (why we never write one)."""
    path = tmp_path / "subifd.tif"
    opts = {
        "tile": (256, 256),
        "compression": "jpeg",
        "photometric": "rgb",
        "resolution": (2e4, 2e4),
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path) as tw:
        tw.write(crop, subifds=2, **opts)
        tw.write(crop[::2, ::2], subfiletype=1, **opts)
        tw.write(crop[::4, ::4], subfiletype=1, **opts)
    with open_slide(path, backend="tiffslide") as ts, open_slide(path, backend="openslide") as os_:
        assert ts.level_count == 3
        assert ts.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert os_.level_count == 1  # OpenSlide 4.0.1 ignores SubIFDs
        # Level 0 still reads correctly through OpenSlide, and the grid planner falls back to it.
        a = os_.read_region((100, 100), 0, (200, 150))
        b = ts.read_region((100, 100), 0, (200, 150))
        assert np.abs(a.astype(int) - b).mean() < 2.0
        assert os_.best_level_for_downsample(4.0) == 0
        assert ts.best_level_for_downsample(4.0) == 2
