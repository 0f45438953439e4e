"""Tissue segmentation: real thumbnail, blank and synthetic images, µm² area filters, holes, presets."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from scipy import ndimage

from msfm.data.slides import open_slide
from msfm.data.tissue import TISSUE_PRESETS, TissueParams, otsu_threshold, segment_tissue, tissue_fraction
from msfm.datasets.histology import cmu_svs_path
from msfm.errors import MsfmInputError

PINK = (200, 120, 170)  # an H&E-like colour: saturation ~102/255


@pytest.fixture(scope="module")
def cmu_thumb() -> tuple[np.ndarray, float]:
    with open_slide(cmu_svs_path()) as slide:
        thumb, ds = slide.thumbnail(1024)
        return thumb, slide.mpp * ds


def _canvas(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Glass is not perfectly white: a little grey noise, as on a real scan.
    return np.clip(rng.normal(243, 2, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _paint(img: np.ndarray, rows: slice, cols: slice, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    block = img[rows, cols]
    img[rows, cols] = np.clip(rng.normal(PINK, 12, size=block.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("preset", list(TISSUE_PRESETS))
def test_bundled_svs_tissue_fraction_is_plausible(cmu_thumb: tuple[np.ndarray, float], preset: str) -> None:
    thumb, mpp_thumb = cmu_thumb
    mask = segment_tissue(thumb, mpp_thumb=mpp_thumb, params=preset)
    assert mask.shape == thumb.shape[:2]
    assert mask.dtype == bool
    frac = tissue_fraction(mask)
    # The SVS shows one elongated piece of skin on white glass (about 40 % of the field when inspected).
    assert 0.2 < frac < 0.98
    # Tissue is where the colour is: much more saturated and darker than what is called background.
    rgb = thumb.astype(int)
    sat = rgb.max(2) - rgb.min(2)
    assert sat[mask].mean() > 3 * sat[~mask].mean()
    assert rgb[mask].mean() < rgb[~mask].mean() - 40
    # The glass along the left border is background.
    assert mask[:, :40].mean() < 0.05


def test_mpp_none_uses_fractions(cmu_thumb: tuple[np.ndarray, float]) -> None:
    thumb, mpp_thumb = cmu_thumb
    with_mpp = segment_tissue(thumb, mpp_thumb=mpp_thumb)
    without = segment_tissue(thumb, mpp_thumb=None)
    assert 0.2 < tissue_fraction(without) < 0.98
    assert (with_mpp != without).mean() < 0.05


@pytest.mark.parametrize("preset", list(TISSUE_PRESETS))
def test_white_and_grey_images_have_no_tissue(preset: str) -> None:
    assert not segment_tissue(np.full((300, 400, 3), 255, np.uint8), mpp_thumb=4.0, params=preset).any()
    assert not segment_tissue(_canvas(300, 400), mpp_thumb=4.0, params=preset).any()
    assert not segment_tissue(_canvas(300, 400), mpp_thumb=None, params=preset).any()


def test_synthetic_square_is_found_in_place() -> None:
    img = _canvas(400, 600)
    _paint(img, slice(100, 250), slice(200, 400))
    mask = segment_tissue(img, mpp_thumb=8.0)
    truth = np.zeros(mask.shape, bool)
    truth[100:250, 200:400] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.97
    cy, cx = ndimage.center_of_mass(mask)
    assert abs(cy - 174.5) < 2
    assert abs(cx - 299.5) < 2


def test_otsu_preset_finds_the_square() -> None:
    img = _canvas(400, 600)
    _paint(img, slice(100, 250), slice(200, 400))
    mask = segment_tissue(img, mpp_thumb=8.0, params="resection")
    assert mask[110:240, 210:390].all()
    assert not mask[:80].any()


def test_area_filter_is_in_square_microns() -> None:
    img = _canvas(300, 300)
    _paint(img, slice(50, 60), slice(50, 60))  # a 10 x 10 px fragment
    _paint(img, slice(150, 250), slice(150, 250), seed=2)  # a large piece
    # At 10 µm/px the fragment is 10,000 µm², below the default minimum (50,000 µm²): dropped.
    small_scale = segment_tissue(img, mpp_thumb=10.0)
    assert not small_scale[50:60, 50:60].any()
    assert small_scale[160:240, 160:240].all()
    # At 30 µm/px the same fragment is 90,000 µm²: kept.
    large_scale = segment_tissue(img, mpp_thumb=30.0)
    assert large_scale[52:58, 52:58].all()
    # The permissive preset keeps it at 10 µm/px (minimum 1,000 µm²).
    assert segment_tissue(img, mpp_thumb=10.0, params="permissive")[52:58, 52:58].all()


def test_small_holes_are_filled_large_holes_stay() -> None:
    img = _canvas(300, 300)
    _paint(img, slice(20, 280), slice(20, 280))
    img[60:70, 60:70] = 243  # 10 x 10 px hole: 100 px * 25 µm² = 2,500 µm² <= 20,000 -> filled
    img[150:250, 150:250] = 243  # 100 x 100 px hole: 250,000 µm² -> stays
    mask = segment_tissue(img, mpp_thumb=5.0)
    assert mask[62:68, 62:68].all()
    assert not mask[160:240, 160:240].any()
    params = TISSUE_PRESETS["default"].model_copy(update={"max_hole_area_um2": 0.0})
    assert not segment_tissue(img, mpp_thumb=5.0, params=params)[62:68, 62:68].any()


def test_otsu_threshold() -> None:
    rng = np.random.default_rng(0)
    low = rng.normal(5, 2, 5000).clip(0, 255).astype(np.uint8)
    high = rng.normal(100, 10, 2000).clip(0, 255).astype(np.uint8)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() <= t < high.min()  # classes are values <= t and values > t
    mixed = np.concatenate([low, rng.normal(30, 2, 5000).clip(0, 255).astype(np.uint8)])
    assert 10 < otsu_threshold(mixed) < 25
    assert otsu_threshold(np.full(10, 7, np.uint8)) == 7.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(MsfmInputError, match="uint8 RGB"):
        segment_tissue(np.zeros((10, 10), np.uint8), mpp_thumb=1.0)
    with pytest.raises(MsfmInputError, match="uint8 RGB"):
        segment_tissue(np.zeros((10, 10, 3), np.float32), mpp_thumb=1.0)
    with pytest.raises(MsfmInputError, match="preset"):
        segment_tissue(np.zeros((10, 10, 3), np.uint8), mpp_thumb=1.0, params="fatty")
    with pytest.raises(MsfmInputError, match="mpp_thumb"):
        segment_tissue(np.zeros((10, 10, 3), np.uint8), mpp_thumb=-2.0)
    with pytest.raises(pydantic.ValidationError):
        TISSUE_PRESETS["default"].saturation_threshold = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        TissueParams(median_size=0)
