"""The slide -> feature-file pipeline on small real-tissue slides (crops of the bundled SVS), tiny encoder.

ROIs are 512 px at 0.5 µm/px with 64-px patches (still 84 tokens per ROI), so a 1,100 px slide has a 2x2 grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from msfm.data.slides import open_slide
from msfm.data.tissue import segment_tissue
from msfm.data.wsi import plan_rois, read_roi, roi_pyramid
from msfm.datasets.histology import load_image, write_pyramid_tiff
from msfm.errors import MsfmInputError
from msfm.models.roam.encoders import build_encoder
from msfm.models.roam.features import read_slide_features
from msfm.models.roam.preprocess_config import PreprocessConfig
from msfm.models.roam.preprocessing import PreprocessResult, preprocess
from msfm.models.roam.slide_inputs import collect_slides, parse_shard

CFG = PreprocessConfig(encoder="tiny", roi_size=512, patch_size=64, thumbnail_size=512, read_threads=2)


@pytest.fixture(scope="module")
def cmu() -> np.ndarray:
    return load_image("cmu")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, cmu: np.ndarray) -> dict[str, Path]:
    """Good slides g1-g3 (different crops), a blank one, a small one, one without mpp, a truncated one."""
    d = tmp_path_factory.mktemp("slides")
    out: dict[str, Path] = {}
    for i, (y, x) in enumerate([(500, 400), (1500, 900), (300, 1000)], start=1):
        out[f"g{i}"] = write_pyramid_tiff(cmu[y : y + 1100, x : x + 1100], d / f"g{i}.tif", mpp=0.5, levels=2)
    out["white"] = write_pyramid_tiff(
        np.full((1100, 1100, 3), 250, np.uint8), d / "white.tif", mpp=0.5, levels=2
    )
    out["small"] = write_pyramid_tiff(cmu[600:900, 600:900], d / "small.tif", mpp=0.5, levels=1)
    Image.fromarray(cmu[500:1600, 400:1500]).save(d / "nompp.png")
    out["nompp"] = d / "nompp.png"
    good = out["g1"].read_bytes()
    (d / "trunc.tif").write_bytes(good[: len(good) // 3])
    out["trunc"] = d / "trunc.tif"
    # Left half tissue, right half a flat pink that the saturation mask calls tissue: blank ROIs to skip.
    half = np.full((1100, 1100, 3), (235, 170, 200), np.uint8)
    half[:, :550] = cmu[500:1600, 950:1500]
    out["flat"] = write_pyramid_tiff(half, d / "flat.tif", mpp=0.5, levels=2, compression="deflate")
    return out


def preprocess_slides(inputs, out, config, **kw) -> pd.DataFrame:
    return preprocess(inputs, out, config=config, **kw).report


def _status(report: pd.DataFrame) -> dict[str, str]:
    return dict(zip(report["slide_id"], report["status"], strict=True))


def test_features_match_a_direct_computation(tmp_path: Path, slides: dict[str, Path]) -> None:
    report = preprocess_slides([slides["g1"]], tmp_path, CFG, progress=False)
    assert _status(report) == {"g1": "ok"}
    sf = read_slide_features(tmp_path / "features" / "g1.h5", encoder="tiny", feature_dim=32)
    assert sf.features.shape[1:] == (84, 32)
    assert sf.n_roi == int(report["n_roi"][0]) >= 2
    # The same ROIs and features computed step by step with the data-layer API.
    enc = build_encoder("tiny")
    with open_slide(slides["g1"]) as slide:
        thumb, ds = slide.thumbnail(512)
        mask = segment_tissue(thumb, mpp_thumb=0.5 * ds)
        grid = plan_rois(slide, mask, ds, slide_mpp=0.5, roi_size=512)
        np.testing.assert_array_equal(sf.coords, grid.coords)
        for i in range(len(grid)):
            direct = enc.embed(roi_pyramid(read_roi(slide, grid, i), patch_size=64))
            np.testing.assert_allclose(sf.features[i], direct, rtol=1e-4, atol=1e-5)
    a = sf.attrs
    assert (a["encoder"], a["roi_size"], a["patch_size"], a["slide_mpp"], a["target_mpp"]) == (
        "tiny",
        512,
        64,
        0.5,
        0.5,
    )
    assert a["roi_size_level0"] == 512
    assert a["stain_norm"] == "none"
    assert a["slide_dimensions"] == [1100, 1100]
    assert json.loads(a["encoder_config"])["name"] == "tiny"
    assert sf.preprocess_config["config"]["roi_size"] == 512
    cfg = json.loads((tmp_path / "preprocess_config.json").read_text())
    assert cfg["config"]["encoder"] == "tiny"
    assert cfg["signature"] == sf.preprocess_config
    qc = Image.open(tmp_path / "qc" / "g1.png")
    assert max(qc.size) <= 1024
    assert qc.mode == "RGB"
    csv = pd.read_csv(tmp_path / "reports" / "report.csv")
    assert list(csv["status"]) == ["ok"]


def test_resume_skips_and_redoes_only_what_is_missing(tmp_path: Path, slides: dict[str, Path]) -> None:
    inputs = [slides["g1"], slides["g2"]]
    assert _status(preprocess_slides(inputs, tmp_path, CFG, progress=False)) == {"g1": "ok", "g2": "ok"}
    mtime = (tmp_path / "features" / "g2.h5").stat().st_mtime_ns
    second = preprocess_slides(inputs, tmp_path, CFG, progress=False)
    assert _status(second) == {"g1": "skipped", "g2": "skipped"}
    assert (second["n_roi"] > 0).all()
    (tmp_path / "features" / "g1.h5").unlink()
    assert _status(preprocess_slides(inputs, tmp_path, CFG, progress=False)) == {"g1": "ok", "g2": "skipped"}
    assert (tmp_path / "features" / "g2.h5").stat().st_mtime_ns == mtime
    # A corrupt file is not "done"; neither is a file made with other feature settings.
    (tmp_path / "features" / "g1.h5").write_bytes(b"garbage")
    changed = CFG.model_copy(update={"min_tissue": 0.05})
    assert _status(preprocess_slides(inputs, tmp_path, CFG, progress=False))["g1"] == "ok"
    assert _status(preprocess_slides(inputs, tmp_path, changed, progress=False)) == {"g1": "ok", "g2": "ok"}
    # Speed-only settings (batch size, threads) do not invalidate finished files; overwrite=True redoes them.
    faster = changed.model_copy(update={"batch_size": 84, "read_threads": 1})
    assert set(_status(preprocess_slides(inputs, tmp_path, faster, progress=False)).values()) == {"skipped"}
    assert set(
        _status(preprocess_slides(inputs, tmp_path, faster, overwrite=True, progress=False)).values()
    ) == {"ok"}
    assert not [p for p in (tmp_path / "features").iterdir() if p.name.startswith(".")]  # no temporary debris


def test_shards_cover_every_slide_once(tmp_path: Path, slides: dict[str, Path]) -> None:
    inputs = [slides["g3"], slides["g1"], slides["g2"]]
    r0 = preprocess_slides(inputs, tmp_path, CFG, shard="0/2", progress=False)
    r1 = preprocess_slides(inputs, tmp_path, CFG, shard=(1, 2), progress=False)
    assert list(r0["slide_id"]) == ["g1", "g3"]
    assert list(r1["slide_id"]) == ["g2"]
    assert set(r0["status"]) | set(r1["status"]) == {"ok"}
    assert (tmp_path / "reports" / "report.shard-0-of-2.csv").is_file()
    assert (tmp_path / "reports" / "report.shard-1-of-2.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "features").glob("*.h5")) == ["g1.h5", "g2.h5", "g3.h5"]
    for bad in ("2/2", "a/b", "1", "-1/3"):
        with pytest.raises(MsfmInputError, match="shard"):
            parse_shard(bad)


def test_bad_slides_are_reported_and_the_batch_goes_on(tmp_path: Path, slides: dict[str, Path]) -> None:
    names = ["trunc", "g1", "white", "small", "nompp"]
    report = preprocess_slides([slides[n] for n in names], tmp_path, CFG, progress=False)
    status = _status(report)
    assert status == {"g1": "ok", "trunc": "failed", "white": "failed", "small": "failed", "nompp": "failed"}
    err = dict(zip(report["slide_id"], report["error"], strict=True))
    assert err["trunc"].startswith("SlideReadError")
    assert "trunc.tif" in err["trunc"]
    assert err["white"].startswith("NoTissueError")
    assert "--tissue permissive" in err["white"]
    assert err["small"].startswith("SlideTooSmallError")
    assert "smaller than one ROI" in err["small"]
    assert "--mpp" in err["nompp"]
    assert (tmp_path / "qc" / "white.png").is_file()  # the QC image helps to see why
    assert sorted(p.name for p in (tmp_path / "features").glob("*.h5")) == ["g1.h5"]
    csv = pd.read_csv(tmp_path / "reports" / "report.csv")
    assert sorted(csv["status"]) == ["failed"] * 4 + ["ok"]
    # The mpp override makes the PNG usable.
    fixed = preprocess_slides(
        [slides["nompp"]], tmp_path, CFG.model_copy(update={"mpp": 0.5}), progress=False
    )
    assert _status(fixed) == {"nompp": "ok"}
    sf = read_slide_features(tmp_path / "features" / "nompp.h5")
    assert sf.attrs["mpp_source"] == "override"
    assert sf.attrs["slide_mpp"] == 0.5


def test_background_rois_are_skipped(tmp_path: Path, slides: dict[str, Path]) -> None:
    report = preprocess_slides([slides["flat"]], tmp_path, CFG, progress=False)
    assert report["status"][0] == "ok"
    assert report["n_background"][0] == 2
    assert report["n_roi"][0] >= 1
    sf = read_slide_features(tmp_path / "features" / "flat.h5")
    assert (sf.coords[:, 0] < 550).all()  # only the tissue half is kept
    keep = CFG.model_copy(update={"skip_background": False})
    again = preprocess_slides([slides["flat"]], tmp_path, keep, progress=False)
    assert again["n_roi"][0] == report["n_roi"][0] + 2
    assert again["n_background"][0] == 0


def test_stain_normalisation_changes_features(tmp_path: Path, slides: dict[str, Path]) -> None:
    plain = preprocess_slides([slides["g2"]], tmp_path / "a", CFG, progress=False)
    mac = preprocess_slides(
        [slides["g2"]], tmp_path / "b", CFG.model_copy(update={"stain_norm": "macenko"}), progress=False
    )
    assert plain["status"][0] == mac["status"][0] == "ok"
    fa = read_slide_features(tmp_path / "a" / "features" / "g2.h5")
    fb = read_slide_features(tmp_path / "b" / "features" / "g2.h5")
    assert fb.attrs["stain_norm"] == "macenko"
    assert fb.preprocess_config["stain"]["name"] == "macenko"
    np.testing.assert_array_equal(fa.coords, fb.coords)
    assert not np.allclose(fa.features, fb.features)


def test_worker_processes_give_the_same_files(tmp_path: Path, slides: dict[str, Path]) -> None:
    inputs = [slides["g1"], slides["g2"]]
    preprocess_slides(inputs, tmp_path / "one", CFG, progress=False)
    two = preprocess_slides(inputs, tmp_path / "two", CFG.model_copy(update={"workers": 2}), progress=False)
    assert set(two["status"]) == {"ok"}
    for sid in ("g1", "g2"):
        a = read_slide_features(tmp_path / "one" / "features" / f"{sid}.h5")
        b = read_slide_features(tmp_path / "two" / "features" / f"{sid}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)


def test_collect_slides(tmp_path: Path, slides: dict[str, Path]) -> None:
    root = slides["g1"].parent
    found = collect_slides([root], exclude=tmp_path)
    assert list(found["slide_id"]) == sorted(["g1", "g2", "g3", "white", "small", "nompp", "trunc", "flat"])
    # Recursive search, output folder excluded, hidden files skipped.
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "x.svs").write_bytes(b"")
    (tmp_path / "in" / ".hidden.tif").write_bytes(b"")
    (tmp_path / "in" / "out" / "qc").mkdir(parents=True)
    (tmp_path / "in" / "out" / "qc" / "x2.png").write_bytes(b"")
    got = collect_slides(tmp_path / "in", exclude=tmp_path / "in" / "out")
    assert list(got["slide_id"]) == ["x"]
    # CSV with relative paths and a slide_id column.
    csv = root / "cohort.csv"
    pd.DataFrame({"path": ["g1.tif", str(slides["g2"])], "slide_id": ["case-1", None]}).to_csv(
        csv, index=False
    )
    table = collect_slides([csv])
    assert list(table["slide_id"]) == ["case-1", "g2"]
    assert Path(table["path"][0]) == slides["g1"]
    csv.unlink()
    # The same file twice is one slide; two files with one id are an error.
    assert len(collect_slides([slides["g1"], root / "g1.tif"])) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "g1.tif").write_bytes(b"")
    with pytest.raises(MsfmInputError, match=r"used by more than one file.*g1.*slide_id"):
        collect_slides([slides["g1"], tmp_path / "other" / "g1.tif"])
    with pytest.raises(MsfmInputError, match="does not exist"):
        collect_slides([tmp_path / "absent.svs"])
    with pytest.raises(MsfmInputError, match="expected a 'path' column"):
        collect_slides(pd.DataFrame({"file": ["a.svs"]}))
    with pytest.raises(MsfmInputError, match="Invalid slide id"):
        collect_slides(pd.DataFrame({"path": ["a.svs"], "slide_id": ["x/y"]}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MsfmInputError, match="holds no slides"):
        collect_slides([tmp_path / "empty"])


def test_config_checks(tmp_path: Path, slides: dict[str, Path]) -> None:
    with pytest.raises(MsfmInputError, match="84 tokens"):
        PreprocessConfig(roi_size=1024, patch_size=256)
    with pytest.raises(MsfmInputError, match="Unknown tissue preset"):
        PreprocessConfig(tissue_preset="nope")
    with pytest.raises(MsfmInputError, match="tissue_overrides"):
        PreprocessConfig(tissue_overrides={"nope": 1})
    cfg = PreprocessConfig(tissue_preset="biopsy", tissue_overrides={"use_otsu": True})
    assert cfg.tissue_params().use_otsu
    assert cfg.tissue_params().median_size == 5
    # Settings that cannot work fail before any slide is touched (no output folder is made).
    with pytest.raises(MsfmInputError, match="downloads nothing"):
        preprocess_slides([slides["g1"]], tmp_path / "out", PreprocessConfig())
    assert not (tmp_path / "out").exists()


def test_settings_from_overrides_and_files(tmp_path: Path, slides: dict[str, Path]) -> None:
    # Flat overrides build the config; roi_size alone fixes patch_size (84 tokens per ROI).
    res = preprocess(
        [slides["g1"]], tmp_path / "a", encoder="tiny", roi_size=512, thumbnail_size=512, progress=False
    )
    assert isinstance(res, PreprocessResult)
    assert res.counts == {"ok": 1, "skipped": 0, "failed": 0}
    assert res.n_failed == 0
    assert Path(res) == res.features == tmp_path / "a" / "features"  # path-like: the feature folder
    cfg = json.loads((tmp_path / "a" / "preprocess_config.json").read_text())["config"]
    assert (cfg["roi_size"], cfg["patch_size"], cfg["encoder"]) == (512, 64, "tiny")
    # A YAML file with overrides on top; the result is the same as the object config: every slide is done.
    f = tmp_path / "prep.yaml"
    f.write_text("encoder: tiny\nroi_size: 2048\nthumbnail_size: 512\nread_threads: 2\n")
    again = preprocess([slides["g1"]], tmp_path / "a", config=f, roi_size=512, progress=False)
    assert again.counts["skipped"] == 1
    assert preprocess([slides["g1"]], tmp_path / "a", config=CFG, progress=False).counts["skipped"] == 1
    with pytest.raises(MsfmInputError, match="Did you mean 'min_tissue'"):
        preprocess([slides["g1"]], tmp_path / "b", config=CFG, min_tisue=0.2)
    with pytest.raises(MsfmInputError, match="84 tokens"):
        preprocess([slides["g1"]], tmp_path / "b", config=CFG, roi_size=512, patch_size=32)
    assert not (tmp_path / "b").exists()
    saved = res.save(tmp_path / "saved")
    assert list(pd.read_csv(saved / "report.csv")["status"]) == ["ok"]


def test_bench_naive_loop_agrees_with_the_pipeline(tmp_path: Path, slides: dict[str, Path]) -> None:
    """The benchmark's per-patch baseline computes the same features (up to resampling) as the pipeline."""
    from msfm.bench.roam import naive_slide_features

    preprocess_slides([slides["g1"]], tmp_path, CFG, progress=False)
    sf = read_slide_features(tmp_path / "features" / "g1.h5")
    enc = build_encoder("tiny")
    with open_slide(slides["g1"]) as slide:
        thumb, ds = slide.thumbnail(512)
        grid = plan_rois(slide, segment_tissue(thumb, mpp_thumb=0.5 * ds), ds, slide_mpp=0.5, roi_size=512)
        naive = naive_slide_features(slide, grid, enc, patch_size=64)
    assert naive.shape == sf.features.shape
    # Level 0 tokens are the same pixels; coarser tokens come from the slide's own pyramid levels (JPEG).
    np.testing.assert_allclose(naive[:, :64], sf.features[:, :64], rtol=1e-4, atol=1e-5)
    a, b = naive.reshape(-1, 32), sf.features.reshape(-1, 32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99
