"""Stain normalisation: identity on the target, stain changes undone, serialisation, blank images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msfm.data.stain import (
    MacenkoNormalizer,
    ReinhardNormalizer,
    StainNormalizer,
    build_normalizer,
    lab_to_rgb,
    od_to_rgb,
    rgb_to_lab,
    rgb_to_od,
)
from msfm.datasets.histology import _restain, load_image, restain_od_matrix, stain_target_path
from msfm.errors import MsfmInputError

CLASSES = [MacenkoNormalizer, ReinhardNormalizer]


@pytest.fixture(scope="module")
def target() -> np.ndarray:
    # Half resolution of the bundled target keeps each transform fast; same colours.
    return np.ascontiguousarray(load_image("tia_target")[::2, ::2])


@pytest.fixture(scope="module")
def restained(target: np.ndarray) -> np.ndarray:
    # The same tissue flipped, with the cohort's optical-density stain change (H and E rotated and rescaled).
    return _restain(np.ascontiguousarray(target[::-1, ::-1]), restain_od_matrix())


def _colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-channel 1-D Wasserstein distance (LAB) between the tissue pixels of two images."""

    def tissue_lab(x: np.ndarray) -> np.ndarray:
        tissue = (rgb_to_od(x).reshape(-1, 3) > 0.15).all(axis=1)
        return rgb_to_lab(x).reshape(-1, 3)[tissue].astype(np.float64)

    la, lb = tissue_lab(a), tissue_lab(b)
    q = np.linspace(1, 99, 50)
    return float(
        np.mean([np.abs(np.percentile(la[:, c], q) - np.percentile(lb[:, c], q)).mean() for c in range(3)])
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_target_to_itself_is_near_identity(cls: type, target: np.ndarray) -> None:
    norm = cls().fit(target)
    out = norm.transform(target)
    assert out.shape == target.shape
    assert out.dtype == np.uint8
    diff = np.abs(out.astype(int) - target).mean()
    # Reinhard is exact; Macenko drops the OD component outside the H-E plane (a few grey levels).
    assert diff < (0.5 if cls is ReinhardNormalizer else 3.0)


@pytest.mark.parametrize("cls", CLASSES)
def test_stain_change_is_undone(cls: type, target: np.ndarray, restained: np.ndarray) -> None:
    norm = cls().fit(target)
    before = _colour_distance(restained, target)
    after = _colour_distance(norm.transform(restained), target)
    assert before > 3.0  # the stain change moves the LAB quantiles by several units
    assert after < 0.3 * before


@pytest.mark.parametrize("cls", CLASSES)
def test_dict_round_trip(cls: type, target: np.ndarray, restained: np.ndarray) -> None:
    norm = cls().fit(target)
    assert isinstance(norm, StainNormalizer)
    saved = json.loads(json.dumps(norm.to_dict()))
    again = cls.from_dict(saved)
    assert again.to_dict() == norm.to_dict()
    assert np.array_equal(again.transform(restained[:200, :200]), norm.transform(restained[:200, :200]))
    with pytest.raises(MsfmInputError, match="to_dict"):
        cls.from_dict({"name": "vahadane"})


@pytest.mark.parametrize("cls", CLASSES)
def test_blank_image_fit_raises_transform_returns_copy(cls: type, target: np.ndarray) -> None:
    white = np.full((64, 64, 3), 255, np.uint8)
    with pytest.raises(MsfmInputError, match="no stained tissue"):
        cls().fit(white)
    norm = cls().fit(target)
    out = norm.transform(white)
    assert np.array_equal(out, white)
    assert out is not white
    glass = np.full((64, 64, 3), 235, np.uint8)  # pale grey: OD 0.08, still no tissue
    assert np.array_equal(norm.transform(glass), glass)
    with pytest.raises(MsfmInputError, match="before fit"):
        cls().transform(target)
    with pytest.raises(MsfmInputError, match="uint8 RGB"):
        norm.transform(target.astype(np.float32))


def test_macenko_stain_vectors_are_h_then_e(target: np.ndarray) -> None:
    norm = MacenkoNormalizer().fit(target)
    h, e = norm.stain_matrix
    assert np.allclose(np.linalg.norm(norm.stain_matrix, axis=1), 1.0)
    assert h[0] > e[0]  # haematoxylin absorbs more red
    assert e[1] == max(e)  # eosin absorbs mostly green
    assert (norm.max_concentrations > 0).all()


def test_build_normalizer(target: np.ndarray) -> None:
    assert build_normalizer(None) is None
    assert build_normalizer("none") is None
    default = build_normalizer("reinhard")  # the bundled target
    from_path = build_normalizer("Reinhard", stain_target_path())
    assert default is not None
    assert from_path is not None
    assert np.allclose(default.mean, from_path.mean)
    from_array = build_normalizer("macenko", target)
    assert isinstance(from_array, MacenkoNormalizer)
    with pytest.raises(MsfmInputError, match="Unknown stain normaliser"):
        build_normalizer("vahadane")
    with pytest.raises(MsfmInputError, match="does not exist"):
        build_normalizer("macenko", "/no/such/target.png")


def test_colour_conversions() -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(5000, 1, 3), dtype=np.uint8)
    assert np.array_equal(lab_to_rgb(rgb_to_lab(colours)), colours)
    lab = rgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    assert np.allclose(lab, [[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20]], atol=0.05)
    assert np.array_equal(od_to_rgb(rgb_to_od(colours)), colours)
    assert rgb_to_od(np.array([255], np.uint8))[0] == 0.0
