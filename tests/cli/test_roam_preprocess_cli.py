"""``msfm roam preprocess``: exit status, summary table, report, resume and option errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from msfm.cli.roam_preprocess import register
from msfm.datasets.histology import load_image, write_pyramid_tiff
from msfm.errors import MsfmInputError
from msfm.models.roam.features import read_slide_features

SMALL = ["--encoder", "tiny", "--roi-size", "512", "--quiet"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli_slides")
    cmu = load_image("cmu")
    write_pyramid_tiff(cmu[500:1600, 400:1500], d / "good.tif", mpp=0.5, levels=2)
    write_pyramid_tiff(np.full((1100, 1100, 3), 250, np.uint8), d / "blank.tif", mpp=0.5, levels=2)
    return d


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command keeps typer from collapsing the app into a single command
    def noop() -> None:
        pass

    return app


def test_cli_reports_failures_with_exit_1_and_resumes(app: typer.Typer, slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["preprocess", str(slides), "--out", str(out), *SMALL])
    assert res.exit_code == 1, res.output
    assert "ok 1, skipped 0, failed 1 (of 2)" in res.output
    assert "NoTissueError" in res.output
    assert "good" in res.output
    assert "blank" in res.output
    report = pd.read_csv(out / "reports" / "report.csv")
    assert dict(zip(report["slide_id"], report["status"], strict=True)) == {"blank": "failed", "good": "ok"}
    sf = read_slide_features(out / "features" / "good.h5", encoder="tiny", feature_dim=32)
    assert sf.attrs["patch_size"] == 64
    assert sf.features.shape[1] == 84
    # Only the good slide: exit 0, and it is skipped because it is done.
    res = runner.invoke(app, ["preprocess", str(slides / "good.tif"), "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    assert "ok 0, skipped 1, failed 0 (of 1)" in res.output
    # Shards write their own report.
    res = runner.invoke(app, ["preprocess", str(slides), "--out", str(out), "--shard", "1/2", *SMALL])
    assert res.exit_code == 0
    assert "skipped 1" in res.output
    assert (out / "reports" / "report.shard-1-of-2.csv").is_file()


def test_cli_option_errors(app: typer.Typer, slides: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["preprocess", str(slides / "good.tif"), "--out", str(tmp_path / "o"), "--quiet"]
    res = runner.invoke(app, [*base, "--encoder", "tiny", "--roi-size", "512", "--shard", "2/2"])
    assert isinstance(res.exception, MsfmInputError)
    assert "shard" in str(res.exception)
    res = runner.invoke(app, [*base, "--encoder", "tiny", "--roi-size", "512", "--patch-size", "128"])
    assert isinstance(res.exception, MsfmInputError)
    assert "84 tokens" in str(res.exception)
    res = runner.invoke(app, base)  # resnet50_trunc without --weights
    assert isinstance(res.exception, MsfmInputError)
    assert "--weights" in str(res.exception)
    res = runner.invoke(app, [*base, "--encoder", "tiny", "--tissue-overrides", "[1]"])
    assert isinstance(res.exception, MsfmInputError)
    assert "JSON object" in str(res.exception)
    res = runner.invoke(app, [*base, "--encoder", "tiny", "--tissue", "nope"])
    assert isinstance(res.exception, MsfmInputError)
    assert "Unknown tissue preset" in str(res.exception)
    res = runner.invoke(app, [*base, "--preset", "biopsy"])  # --preset names model presets (train) only
    assert res.exit_code == 2


def test_cli_tissue_preset_and_config_file(app: typer.Typer, slides: Path, tmp_path: Path) -> None:
    import json

    config = tmp_path / "prep.yaml"
    config.write_text("encoder: tiny\nroi_size: 512\nmin_tissue: 0.2\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["preprocess", str(slides / "good.tif"), "-o", str(out), "--config", str(config), "--tissue", "biopsy",
              "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "preprocess_config.json").read_text())["config"]
    assert (cfg["tissue_preset"], cfg["min_tissue"], cfg["patch_size"]) == ("biopsy", 0.2, 64)


def test_through_msfm_main(slides: Path, tmp_path: Path) -> None:
    import msfm.cli

    names = {g.name for g in msfm.cli.app.registered_groups}
    assert "roam" in names
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        msfm.cli.main(["roam", "preprocess", str(slides / "blank.tif"), "--out", str(out), *SMALL])
    assert exc.value.code == 1
    with pytest.raises(SystemExit) as exc:
        msfm.cli.main(["roam", "preprocess", str(slides / "absent.svs"), "--out", str(out), *SMALL])
    assert exc.value.code == 2
