"""`msfm roam train | predict | evaluate | cascade` end to end on a tiny synthetic cohort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from msfm.cli import roam_predict, roam_train
from msfm.errors import MsfmInputError
from msfm.models.roam.features import SlideFeatures, write_slide_features

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
D = 16


def _app() -> typer.Typer:
    app = typer.Typer()
    roam_train.register(app)
    roam_predict.register(app)
    return app


def invoke(*args: object):
    return CliRunner().invoke(_app(), [str(a) for a in args], catch_exceptions=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    fd = root / "features"
    fd.mkdir()
    rows = []
    for c, name in enumerate(["astro", "oligo"]):
        for i in range(5):
            sid = f"{name}{i}"
            k = int(rng.integers(1, 5))
            x = rng.normal(size=(k, 84, D)).astype(np.float32)
            x[..., c * 4 : c * 4 + 4] += 3.0
            write_slide_features(fd / f"{sid}.h5", SlideFeatures(sid, x, np.zeros((k, 2), np.int64)))
            rows.append({"slide_id": sid, "subtype": name, "grade": str(2 + i % 2)})
    table = root / "slides.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    config = root / "train.yaml"
    config.write_text(
        "model_overrides: {dim: 16, heads: 2, dim_head: 8, mlp_dim: 32}\n"
        "warmup_epochs: 1\nbest_from_epoch: 1\nlr: 0.003\ncheckpoint_every_n_epochs: 2\n"
    )
    return table, fd, config


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    table, fd, config = cohort
    out = tmp_path_factory.mktemp("runs") / "subtype"
    res = invoke(
        "train", fd, "--slides", table, "--task", "subtype", "--folds", 2, "-o", out,
        "--preset", "roam-tiny", "--config", config, "--max-epochs", 3, "--accelerator", "cpu", "--devices", "1",
        "--test-frac", 0.2, "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "out-of-fold accuracy" in res.output
    assert "test ensemble" in res.output
    return out


def test_train_writes_a_run(run):
    rec = json.loads((run / "run.json").read_text())
    assert rec["classes"] == ["astro", "oligo"]
    assert rec["config"]["model"] == "roam-tiny"
    assert rec["config"]["model_overrides"]["dim"] == 16
    assert rec["config"]["max_epochs"] == 3
    assert (run / "metrics.json").is_file()
    assert (run / "fold1" / "best" / "model.safetensors").is_file()


def test_predict_evaluate_and_cascade(run, cohort, tmp_path):
    table, fd, _ = cohort
    preds = tmp_path / "preds.csv"
    res = invoke("predict", fd, "-c", run, "-o", preds, "--device", "cpu")
    assert res.exit_code == 0, res.output + repr(res.exception)
    df = pd.read_csv(preds)
    assert len(df) == 10
    assert {"prob_astro", "prob_oligo", "pred", "confidence"} <= set(df.columns)
    res = invoke("predict", fd, "-c", run, "-o", preds, "--device", "cpu")
    assert isinstance(res.exception, MsfmInputError)
    assert "--overwrite" in str(res.exception)

    metrics, png = tmp_path / "m.json", tmp_path / "cm.png"
    res = invoke(
        "evaluate",
        preds,
        "--slides",
        table,
        "--task",
        "subtype",
        "--out",
        metrics,
        "--plot",
        png,
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = json.loads(metrics.read_text())
    assert m["n"] == 10
    assert m["accuracy"] >= 0.8
    assert png.read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "cascade.csv"
    res = invoke(
        "cascade", fd, "-o", out, "--device", "cpu",
        "--stage", f"subtype={run}", "--stage", f"again={run}:subtype==oligo",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    c = pd.read_csv(out, keep_default_na=False)
    assert list(c.columns[:2]) == ["slide_id", "subtype"]
    oligo = c.subtype == "oligo"
    assert (c.loc[oligo, "again"] == "oligo").all()
    assert (c.loc[~oligo, "again"] == "").all()
    res = invoke("evaluate", out, "--slides", table, "--task", "subtype", "--stage", "again")
    assert res.exit_code == 0
    assert '"n": ' + str(int(oligo.sum())) in res.output


def test_cli_errors(run, cohort, tmp_path):
    table, fd, config = cohort
    df = pd.read_csv(table)
    df.loc[len(df)] = {"slide_id": "missing1", "subtype": "astro", "grade": "2"}
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    res = invoke("train", fd, "--slides", bad, "--task", "subtype", "-o", tmp_path / "r")
    assert isinstance(res.exception, MsfmInputError)
    assert "missing1" in str(res.exception)
    assert str(fd) in str(res.exception)
    # same run directory, different settings -> refused before anything is trained
    res = invoke(
        "train", fd, "--slides", table, "--task", "subtype", "--folds", 2, "-o", run,
        "--preset", "roam-tiny", "--config", config, "--max-epochs", 4, "--test-frac", 0.2,
    )  # fmt: skip
    assert isinstance(res.exception, MsfmInputError)
    assert "max_epochs" in str(res.exception)
    res = invoke("cascade", fd, "-o", tmp_path / "c.csv")
    assert isinstance(res.exception, MsfmInputError)
    assert "--stage" in str(res.exception)
    res = invoke("train", fd, "--slides", table, "-o", tmp_path / "r2")
    assert isinstance(res.exception, MsfmInputError)
    assert "--task" in str(res.exception)


def test_slide_ids_that_leave_folders_are_refused(run, cohort, tmp_path):
    # Regression: ids name files under --features and --out; every verb refuses ids that leave them.
    table, fd, _ = cohort
    bad = tmp_path / "bad_ids.csv"
    pd.DataFrame({"slide_id": ["astro0", "../../astro1"], "subtype": ["astro", "oligo"]}).to_csv(
        bad, index=False
    )
    preds = tmp_path / "p.csv"
    pd.DataFrame({"slide_id": ["../astro0"], "prob_astro": [0.9], "prob_oligo": [0.1]}).to_csv(
        preds, index=False
    )
    verbs = {
        "train": ["train", fd, "--slides", bad, "--task", "subtype", "-o", tmp_path / "r"],
        "predict": ["predict", fd, "-c", run, "--slides", bad, "-o", tmp_path / "o.csv"],
        "cascade": ["cascade", fd, "--slides", bad, "-o", tmp_path / "c.csv", "--stage", f"subtype={run}"],
        "evaluate labels": ["evaluate", preds, "--slides", bad, "--task", "subtype"],
        "evaluate predictions": ["evaluate", preds, "--slides", table, "--task", "subtype"],
    }  # fmt: skip
    for name, args in verbs.items():
        res = invoke(*args)
        assert isinstance(res.exception, MsfmInputError), name
        assert "Invalid slide id" in str(res.exception), name
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "o.csv").exists()


def test_fine_tuning_from_c_and_joined_checkpoints(run, cohort, tmp_path):
    table, fd, config = cohort
    init = run / "fold0" / "best"
    out = tmp_path / "ft"
    res = invoke(
        "train", fd, "--slides", table, "--task", "subtype", "--folds", 2, "-o", out, "-c", init,
        "--config", config, "--max-epochs", 1, "--accelerator", "cpu", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert json.loads((out / "run.json").read_text())["config"]["init_from"] == str(init)
    # '+' joins checkpoints into one ensemble: the same as the run they come from
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert invoke("predict", fd, "-c", run, "-o", a, "--device", "cpu").exit_code == 0
    joined = f"{run}/fold0/best+{run}/fold1/best"
    res = invoke("predict", fd, "-c", joined, "-o", b, "--device", "cpu")
    assert res.exit_code == 0, res.output + repr(res.exception)
    pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b))


def test_the_commands_use_the_shared_options():
    cmds = typer.main.get_command(_app()).commands
    opts = {name: {o for p in cmd.params for o in p.opts} for name, cmd in cmds.items()}
    for name in ("train", "predict", "cascade", "evaluate"):
        assert not opts[name] & {"--features", "--run", "--model", "--predictions", "--init-from"}, name
    assert {"-c", "--preset", "--config", "--devices", "--max-epochs", "--lr", "-o"} <= opts["train"]
    assert "--max-steps" not in opts["train"]  # only the trainer options RoamTrainConfig understands
    assert {"-c", "-o"} <= opts["predict"]
