"""Feature files: round trip, atomic write, encoder/dimension checks, legacy layouts, corrupt files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from msfm.errors import MsfmInputError
from msfm.models.roam.features import (
    FEATURE_SCHEMA_VERSION,
    SlideFeatures,
    feature_path,
    read_feature_attrs,
    read_slide_features,
    write_slide_features,
)


def _sf(n: int = 3, d: int = 16, encoder: str = "tiny") -> SlideFeatures:
    rng = np.random.default_rng(0)
    return SlideFeatures(
        slide_id="s1",
        features=rng.standard_normal((n, 84, d)).astype(np.float32),
        coords=np.arange(n * 2, dtype=np.int64).reshape(n, 2) * 1024,
        tissue_fraction=np.linspace(0.2, 1.0, n).astype(np.float32),
        attrs={
            "slide_path": "/data/s1.svs",
            "slide_mpp": 0.25,
            "roi_size_level0": 4096,
            "encoder": encoder,
            "encoder_config": {"name": encoder, "dim": d},
            "stain_norm": "none",
            "grid_shape": (4, 5),
            "slide_dimensions": (20000, 16000),
        },
    )


def test_round_trip_and_layout(tmp_path: Path) -> None:
    sf = _sf()
    path = write_slide_features(tmp_path / "s1.h5", sf)
    back = read_slide_features(path, encoder="tiny", feature_dim=16)
    np.testing.assert_array_equal(back.features, sf.features)
    np.testing.assert_array_equal(back.coords, sf.coords)
    np.testing.assert_array_equal(back.tissue_fraction, sf.tissue_fraction)
    assert back.coords.dtype == np.int64
    assert back.features.dtype == np.float32
    assert back.slide_id == "s1"
    assert back.n_roi == 3
    assert back.feature_dim == 16
    assert back.encoder == "tiny"
    assert back.encoder_config == {"name": "tiny", "dim": 16}
    assert back.attrs["grid_shape"] == [4, 5]
    assert back.attrs["slide_mpp"] == 0.25
    assert back.attrs["schema_version"] == FEATURE_SCHEMA_VERSION
    assert back.attrs["tokens_per_roi"] == 84
    assert back.attrs["target_mpp"] == 0.5  # default filled in
    with h5py.File(path) as f:
        assert f["features"].chunks == (1, 84, 16)
        assert f["features"].compression is None
    attrs = read_feature_attrs(path)
    assert (attrs["n_roi"], attrs["n_tokens"], attrs["feature_dim"]) == (3, 84, 16)
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.h5"]


def test_write_is_atomic_and_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_slide_features(tmp_path / "s1.h5", _sf(n=2))
    before = path.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_slide_features(path, _sf(n=5))
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.h5"]  # and no debris
    bad = _sf()
    bad.features = bad.features[:, :80]
    with pytest.raises(MsfmInputError, match=r"\[n_roi, 84, d\]"):
        write_slide_features(tmp_path / "x.h5", bad)
    with pytest.raises(MsfmInputError, match="does not exist"):
        write_slide_features(tmp_path / "nope" / "x.h5", _sf())
    empty = _sf(n=0)
    back = read_slide_features(write_slide_features(tmp_path / "e.h5", empty))
    assert back.features.shape == (0, 84, 16)


def test_wrong_encoder_or_dim_is_refused(tmp_path: Path) -> None:
    path = write_slide_features(tmp_path / "s1.h5", _sf(d=16, encoder="colour_stats"))
    with pytest.raises(MsfmInputError) as err:
        read_slide_features(path, encoder="resnet50_trunc", feature_dim=1024)
    text = str(err.value)
    assert "'colour_stats'" in text
    assert "'resnet50_trunc'" in text
    assert "re-run `msfm roam preprocess`" in text
    assert "--encoder resnet50_trunc" in text
    with pytest.raises(MsfmInputError, match=r"16-d features.*expects 1024-d"):
        read_slide_features(path, feature_dim=1024)


def test_legacy_85_token_official_file(tmp_path: Path) -> None:
    """ROAM's official extractor: 'features' [n, 85, d] + 'coords', no attributes."""
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((2, 85, 8)).astype(np.float32)
    path = tmp_path / "TCGA-XX.h5"
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["coords"] = np.array([[0, 0], [4096, 0]], dtype=np.int32)
    back = read_slide_features(path, encoder="resnet50_trunc", feature_dim=8)
    assert back.features.shape == (2, 84, 8)
    np.testing.assert_array_equal(back.features, feats[:, :84])
    assert back.attrs["legacy_tokens"] == 85
    assert back.slide_id == "TCGA-XX"
    assert back.encoder == "unknown"
    assert back.tissue_fraction is None
    assert back.coords.dtype == np.int64
    assert back.attrs["roi_size"] == 2048
    assert back.attrs["schema_version"] == 0


def test_clam_style_file_with_coords_attrs(tmp_path: Path) -> None:
    path = tmp_path / "slide_a.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((1, 84, 4), dtype=np.float32)
        c = f.create_dataset("coords", data=np.array([[10.0, 20.0]]))
        c.attrs["patch_size"] = 4096
        c.attrs["patch_level"] = 0
    back = read_slide_features(path)
    assert back.attrs["roi_size_level0"] == 4096
    np.testing.assert_array_equal(back.coords, [[10, 20]])


def test_malformed_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(MsfmInputError, match=r"does not exist.*msfm roam preprocess"):
        read_slide_features(tmp_path / "absent.h5")
    good = write_slide_features(tmp_path / "good.h5", _sf(n=50, d=64))
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MsfmInputError, match="truncated or corrupt"):
        read_slide_features(truncated)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(MsfmInputError, match="truncated or corrupt"):
        read_feature_attrs(junk)
    patch_level = tmp_path / "clam_patches.h5"
    with h5py.File(patch_level, "w") as f:
        f["features"] = np.zeros((10, 1024), dtype=np.float32)
        f["coords"] = np.zeros((10, 2), dtype=np.int64)
    with pytest.raises(MsfmInputError, match="patch-level file"):
        read_slide_features(patch_level)
    no_coords = tmp_path / "no_coords.h5"
    with h5py.File(no_coords, "w") as f:
        f["features"] = np.zeros((1, 84, 4), dtype=np.float32)
    with pytest.raises(MsfmInputError, match=r"lacks the dataset\(s\) \['coords'\]"):
        read_slide_features(no_coords)


def test_feature_path_accepts_output_folder(tmp_path: Path) -> None:
    assert feature_path(tmp_path, "a") == tmp_path / "a.h5"
    (tmp_path / "features").mkdir()
    assert feature_path(tmp_path, "a") == tmp_path / "features" / "a.h5"
    (tmp_path / "a.h5").write_bytes(b"")
    assert feature_path(tmp_path, "a") == tmp_path / "a.h5"


def test_preprocess_config_attr_is_parsed(tmp_path: Path) -> None:
    sf = _sf()
    sf.attrs["preprocess_config"] = json.dumps({"roi_size": 512})
    back = read_slide_features(write_slide_features(tmp_path / "s.h5", sf))
    assert back.preprocess_config == {"roi_size": 512}
