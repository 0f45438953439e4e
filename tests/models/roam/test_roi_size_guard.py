"""ROAM refuses feature files of another ROI geometry than the model's training features (issue 12).

Before, only the encoder and the feature dimension were checked, so ``roam predict`` on features made with another
ROI size predicted with confidence 0.99 and no warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import msfm
from msfm.errors import MsfmInputError
from msfm.models.roam.checkpoint import save_model
from msfm.models.roam.feature_store import FeatureStore, training_geometry
from msfm.models.roam.features import SlideFeatures, read_slide_features, write_slide_features
from msfm.models.roam.model import Roam
from msfm.registry import preset_config

D = 16
TINY = {"dim": 16, "heads": 2, "dim_head": 8, "mlp_dim": 32, "depths": (1, 1, 1, 1, 1)}
TRAINED = {"roi_size": 512, "patch_size": 64, "target_mpp": 0.5}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _features(folder: Path, n: int = 3, **geometry) -> Path:
    """Feature files as `msfm roam preprocess` writes them, with the given ROI geometry."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = rng.normal(size=(2, 84, D)).astype(np.float32)
        attrs = {"encoder": "synthetic", **TRAINED, **geometry}
        write_slide_features(
            folder / f"s{i}.h5", SlideFeatures(f"s{i}", x, np.zeros((2, 2), np.int64), attrs=attrs)
        )
    return folder


def _legacy_features(folder: Path, n: int = 2) -> Path:
    """Files with only the two datasets (ROAM's official extractor, other tools): no geometry recorded."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with h5py.File(folder / f"s{i}.h5", "w") as fh:
            fh["features"] = rng.normal(size=(2, 84, D)).astype(np.float32)
            fh["coords"] = np.zeros((2, 2), np.int64)
    return folder


def _run(root: Path, preprocessing: dict | None, folds: int = 2) -> Path:
    """A finished run laid out as `msfm roam train` writes it, with the training features' preprocessing."""
    for k in range(folds):
        torch.manual_seed(k)
        model = Roam(preset_config("roam-tiny", d_in=D, n_classes=2, class_names=("a", "b"), **TINY)).eval()
        extra = {"task": "t", "class_names": ["a", "b"], "encoder": {"name": "synthetic"}, "feature_dim": D}
        save_model(model, root / f"fold{k}" / "best", extra=extra, preprocessing=preprocessing)
        (root / f"fold{k}" / "done.json").write_text(json.dumps({"fold": k}))
    return root


def test_feature_files_record_their_roi_geometry(tmp_path):
    fd = _features(tmp_path / "f")
    sf = read_slide_features(fd / "s0.h5")
    assert sf.geometry() == TRAINED
    legacy = read_slide_features(_legacy_features(tmp_path / "legacy") / "s0.h5")
    assert legacy.geometry() == {}  # defaults fill attrs, but they are not taken as recorded
    assert legacy.attrs["roi_size"] == 2048


def test_training_records_only_recorded_geometry(tmp_path):
    """What `roam train` stores in meta['preprocessing'] (FeatureStore.preprocessing) and reads back."""
    store = FeatureStore({"s0": _features(tmp_path / "f") / "s0.h5"})
    store.get("s0")
    assert {k: store.preprocessing()[k] for k in TRAINED} == TRAINED
    legacy = FeatureStore({"s0": _legacy_features(tmp_path / "l") / "s0.h5"})
    legacy.get("s0")
    assert not set(TRAINED) & set(legacy.preprocessing())  # no default masquerading as the training geometry
    run = _run(tmp_path / "run", store.preprocessing())
    assert training_geometry(msfm.roam.load(run, device="cpu").meta["members"]) == TRAINED


@pytest.mark.parametrize(
    ("geometry", "differ"),
    [
        ({"roi_size": 2048, "patch_size": 256}, "roi_size, patch_size differ"),
        ({"target_mpp": 1.0}, "target_mpp differ"),
    ],
    ids=["roi_size", "magnification"],
)
def test_predict_refuses_features_of_another_roi_geometry(geometry, differ, tmp_path):
    run = _run(tmp_path / "run", TRAINED)
    fd = _features(tmp_path / "other", **geometry)
    out = tmp_path / "pred.csv"
    with pytest.raises(MsfmInputError) as err:
        msfm.roam.predict(fd, run, device="cpu", out=out)
    text = str(err.value)
    made = {**TRAINED, **geometry}
    assert f"was made with ROI size {made['roi_size']} px" in text
    assert f"{made['target_mpp']:g} µm/px" in text
    assert "trained on features with ROI size 512 px, patch size 64 px, 0.5 µm/px" in text
    assert differ in text
    assert "re-run `msfm roam preprocess` with --roi-size 512 --patch-size 64 --target-mpp 0.5" in text
    assert not out.exists()


def test_predict_accepts_the_training_geometry_silently(tmp_path):
    run = _run(tmp_path / "run", TRAINED)
    fd = _features(tmp_path / "same")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        table = msfm.roam.predict(fd, run, device="cpu").table
    assert list(table.slide_id) == ["s0", "s1", "s2"]


def test_files_without_geometry_warn_once(tmp_path):
    run = _run(tmp_path / "run", TRAINED)
    fd = _legacy_features(tmp_path / "legacy", n=3)
    with pytest.warns(UserWarning, match=r"does not record its roi_size, patch_size, target_mpp") as rec:
        table = msfm.roam.predict(fd, run, device="cpu").table
    assert len(table) == 3
    assert sum("does not record" in str(w.message) for w in rec) == 1


def test_models_without_recorded_geometry_are_not_checked(tmp_path):
    """Converted release checkpoints and runs from before this check record no geometry: nothing to compare."""
    run = _run(tmp_path / "run", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        msfm.roam.predict(_features(tmp_path / "f", roi_size=2048, patch_size=256), run, device="cpu")


def test_cascade_and_heatmap_refuse_too(tmp_path):
    run = _run(tmp_path / "run", TRAINED)
    fd = _features(tmp_path / "other", roi_size=1024, patch_size=128)
    with pytest.raises(MsfmInputError, match=r"ROI size 1024 px.*trained on features with ROI size 512 px"):
        msfm.roam.cascade(fd, [f"stage={run}"], device="cpu")
    out = tmp_path / "heatmaps"
    with pytest.raises(MsfmInputError, match=r"ROI size 1024 px.*trained on features with ROI size 512 px"):
        msfm.roam.heatmap(fd, run, out=out, slides=["s0"], device="cpu")
    assert not (out / "s0").exists()


def test_ensemble_of_different_geometries_is_refused(tmp_path):
    a = _run(tmp_path / "a", TRAINED, folds=1)
    b = _run(tmp_path / "b", {"roi_size": 2048, "patch_size": 256, "target_mpp": 0.5}, folds=1)
    with pytest.raises(MsfmInputError, match="different ROI geometry"):
        msfm.roam.predict(
            _features(tmp_path / "f"), [a / "fold0" / "best", b / "fold0" / "best"], device="cpu"
        )


def test_cli_predict_exits_2_on_another_roi_size(tmp_path):
    from msfm.cli import main

    run = _run(tmp_path / "run", TRAINED)
    fd = _features(tmp_path / "other", roi_size=2048, patch_size=256)
    with pytest.raises(SystemExit) as exit_info:
        main(["roam", "predict", str(fd), "-c", str(run), "-o", str(tmp_path / "p.csv"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "p.csv").exists()


def test_training_refuses_features_of_mixed_roi_geometries(tmp_path):
    """`roam train` reads every header first: slides preprocessed with another ROI size are refused before any
    fold trains or anything is written."""
    import pandas as pd

    fd = _features(tmp_path / "f", n=4)
    odd = _features(tmp_path / "odd", n=1, roi_size=2048, patch_size=256)
    (odd / "s0.h5").replace(fd / "s4.h5")
    rows = [{"slide_id": f"s{i}", "label": "ab"[i % 2]} for i in range(5)]
    table = tmp_path / "slides.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    out = tmp_path / "run"
    with pytest.raises(MsfmInputError) as err:
        msfm.roam.train(fd, out, slides=table, task="label", model="roam-tiny", folds=2, accelerator="cpu")
    text = str(err.value)
    assert "different ROI geometries" in text
    assert "roi_size=2048" in text
    assert "roi_size=512" in text
    assert "['s4']" in text
    assert not out.exists()
