"""`msfm roam heatmap` end to end on a tiny two-fold ROAM run and tiny feature files, in temporary folders."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
import typer
from PIL import Image

from msfm.cli.roam_interpret import register
from msfm.errors import MsfmInputError
from msfm.models.roam.checkpoint import save_model
from msfm.models.roam.config import RoamConfig
from msfm.models.roam.ensemble import BEST_DIR, DONE_FILE
from msfm.models.roam.features import SlideFeatures, write_slide_features
from msfm.models.roam.model import Roam

CLASSES = ("tumour", "normal")
D = 16
ROI0 = 100  # ROI side in level-0 pixels


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """msfm roam (test copy)."""

    register(app)
    return app


def run(*args: object) -> None:
    _app()(args=[str(a) for a in args], standalone_mode=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("roam_heatmap")
    cfg = RoamConfig(d_in=D, dim=16, heads=2, dim_head=8, mlp_dim=32, depths=(1, 1, 1, 1, 1), n_classes=2)
    run_dir = root / "run"
    for fold in range(2):
        torch.manual_seed(fold)
        best = run_dir / f"fold{fold}" / BEST_DIR
        save_model(Roam(cfg).eval(), best, extra={"class_names": list(CLASSES), "encoder": {"name": "tiny"}})
        (run_dir / f"fold{fold}" / DONE_FILE).write_text("{}")
    feats = root / "features"
    feats.mkdir()
    slides = root / "slides"
    slides.mkdir()
    rng = np.random.default_rng(0)
    for sid, n_roi in (("s1", 6), ("s2", 4)):
        img = np.full((300, 400, 3), 235, np.uint8)
        img[20:280, 20:380] = rng.integers(60, 200, size=(260, 360, 3), dtype=np.uint8)
        Image.fromarray(img).save(slides / f"{sid}.png")
        coords = np.array([[20 + 100 * (i % 3), 20 + 100 * (i // 3)] for i in range(n_roi)])
        sf = SlideFeatures(
            slide_id=sid,
            features=rng.normal(size=(n_roi, 84, D)).astype(np.float32),
            coords=coords,
            attrs={
                "slide_path": str(slides / f"{sid}.png"),
                "roi_size_level0": ROI0,
                "roi_size": 2048,
                "encoder": "tiny",
            },
        )
        write_slide_features(feats / f"{sid}.h5", sf)
    return {"root": root, "run": run_dir, "features": feats, "slides": slides}


def test_heatmap_writes_every_output(workspace) -> None:
    out = workspace["root"] / "out"
    run(
        "heatmap",
        workspace["features"],
        "--checkpoint",
        workspace["run"],
        "--out",
        out,
        "--top-k",
        3,
        "--bottom-k",
        2,
        "--roi-maps",
        2,
        "--roi-px",
        64,
        "--thumbnail-size",
        200,
    )
    for sid, n_roi in (("s1", 6), ("s2", 4)):
        d = out / sid
        for name in ("heatmap.png", "gallery.png", "scores.csv", "summary.json", "rois.h5ad"):
            assert (d / name).is_file(), name
        # heatmap.png is a figure (thumbnail | overlay | colour bar); the thumbnail itself is in rois.h5ad.
        assert Image.open(d / "heatmap.png").size[0] > 400
        rois = anndata.read_h5ad(d / "rois.h5ad")
        assert rois.uns["spatial"][sid]["images"]["hires"].shape == (150, 200, 3)
        assert rois.n_obs == n_roi
        table = pd.read_csv(d / "scores.csv")
        assert list(table.columns) == ["roi", "x", "y", "score", "percentile", "rank"]
        assert len(table) == n_roi
        assert table["score"].sum() == pytest.approx(1.0, abs=1e-6)
        assert table["percentile"].between(0, 100).all()
        assert sorted(table["rank"]) == list(range(1, n_roi + 1))
        summary = json.loads((d / "summary.json").read_text())
        assert summary["n_models"] == 2
        assert summary["class_shown"] == summary["predicted_class"] in CLASSES
        assert sum(summary["probabilities"].values()) == pytest.approx(1.0)
        top = table.sort_values("score", ascending=False)["roi"].tolist()[:2]
        assert summary["roi_maps"] == top
        for i in top:
            assert (d / "roi_maps" / f"roi{i}.png").is_file()
            maps = np.load(d / "roi_maps" / f"roi{i}.npz")
            assert {k: maps[k].shape for k in maps.files} == {"20x": (8, 8), "10x": (4, 4), "5x": (2, 2)}
            assert all(0.0 <= maps[k].min() and maps[k].max() <= 1.0 + 1e-6 for k in maps.files)
        assert len(list((d / "roi_maps").glob("*.png"))) == 2


def test_heatmap_class_choice_single_checkpoint_and_overwrite(workspace) -> None:
    out = workspace["root"] / "out_class"
    args = [
        "heatmap",
        workspace["features"],
        "-c",
        workspace["run"] / "fold0" / BEST_DIR,
        "-o",
        out,
        "--slides",
        workspace["slides"] / "s2.png",
        "--class",
        "normal",
        "--roi-maps",
        "0",
        "--method",
        "grad_cam",
        "--roi-px",
        "32",
        "--thumbnail-size",
        "100",
        "--colour-by",
        "score",
        "--no-blur",
    ]
    run(*args)
    summary = json.loads((out / "s2" / "summary.json").read_text())
    assert summary["class_shown"] == "normal"
    assert summary["n_models"] == 1
    assert not (out / "s2" / "roi_maps").exists()
    assert not (out / "s1").exists()  # only the slide asked for
    with pytest.raises(MsfmInputError, match="already exists"):
        run(*args)
    before = (out / "s2" / "scores.csv").read_text()
    run(*args, "--overwrite")
    assert (out / "s2" / "scores.csv").read_text() == before


def test_heatmap_errors(workspace, tmp_path: Path) -> None:
    base = ["heatmap", workspace["features"], "-c", workspace["run"], "-o", tmp_path / "o"]
    with pytest.raises(MsfmInputError, match="not a class"):
        run(*base, "--class", "stroma")
    with pytest.raises(MsfmInputError, match="--method"):
        run(*base, "--method", "lrp")
    with pytest.raises(MsfmInputError, match=r"no feature file .*: s9"):
        run(*base, "--slides", "s9")
    # The recorded slide image moved: a clear error naming --slide-dir, then --slide-dir finds it.
    moved = tmp_path / "moved"
    moved.mkdir()
    feats = tmp_path / "feats"
    feats.mkdir()
    from msfm.models.roam.features import read_slide_features

    sf = read_slide_features(workspace["features"] / "s2.h5")
    sf.attrs["slide_path"] = str(tmp_path / "gone" / "s2.png")
    write_slide_features(feats / "s2.h5", sf)
    Image.open(workspace["slides"] / "s2.png").save(moved / "s2.png")
    args = ["heatmap", feats, "-c", workspace["run"], "-o", tmp_path / "o2", "--roi-maps", "0"]
    with pytest.raises(MsfmInputError, match="--slide-dir"):
        run(*args, "--thumbnail-size", "64", "--roi-px", "32")
    run(*args, "--thumbnail-size", "64", "--roi-px", "32", "--slide-dir", moved)
    assert (tmp_path / "o2" / "s2" / "heatmap.png").is_file()


def test_heatmap_api_returns_a_result(workspace, tmp_path: Path) -> None:
    import msfm

    res = msfm.roam.heatmap(
        workspace["features"], workspace["run"], out=tmp_path / "h", slides="s1", roi_maps=0, roi_px=32,
        thumbnail_size=64, device="cpu",
    )  # fmt: skip
    assert isinstance(res, msfm.roam.HeatmapResult)
    assert list(res.table["slide_id"]) == ["s1"]
    assert res.table["out"][0] == tmp_path / "h" / "s1"
    assert (tmp_path / "h" / "s1" / "heatmap.png").is_file()
    with pytest.warns(DeprecationWarning, match=r"msfm\.roam\.heatmap\("):
        records = msfm.roam.write_heatmaps(
            workspace["run"], workspace["features"], tmp_path / "old", slides=["s2"], roi_maps=0, roi_px=32,
            thumbnail_size=64,
        )  # fmt: skip
    assert [r["slide_id"] for r in records] == ["s2"]


def test_heatmap_is_registered_in_msfm_roam() -> None:
    from msfm.cli.roam import app

    command = typer.main.get_command(app)
    assert "heatmap" in command.commands
    options = {o for p in command.commands["heatmap"].params for o in p.opts}
    assert "--features" not in options
    assert {
        "--checkpoint",
        "--slides",
        "--out",
        "--class",
        "--top-k",
        "--roi-maps",
        "--method",
    } <= options


@pytest.mark.parametrize("bad", ["../victim", "../../../victim", "..", ".hidden", "a/b", "a\\b"])
def test_heatmap_refuses_slide_ids_that_leave_out(workspace, tmp_path: Path, bad: str) -> None:
    # Regression: `--slides ../../../victim --overwrite` used to write outside --out and delete the folder.
    out = tmp_path / "deep" / "er" / "out"
    out.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("user data")
    # A feature file the traversal would find, so only the id check stands between the user and the damage.
    write_slide_features(
        workspace["features"].parent / "victim.h5",
        SlideFeatures(slide_id="victim", features=np.zeros((1, 84, D), np.float32), coords=np.zeros((1, 2))),
    )
    with pytest.raises(MsfmInputError, match="Invalid slide id"):
        run("heatmap", workspace["features"], "-c", workspace["run"], "-o", out, "--slides", bad,
            "--overwrite", "--roi-maps", "0")  # fmt: skip
    assert (victim / "keep.txt").read_text() == "user data"
    assert list(out.iterdir()) == []
