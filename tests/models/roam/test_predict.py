"""ROAM prediction: fold ensembles (mean softmax), feature checks, and cascade routing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from msfm.errors import MsfmInputError
from msfm.models.roam.checkpoint import save_model
from msfm.models.roam.features import SlideFeatures, write_slide_features
from msfm.models.roam.model import Roam
from msfm.models.roam.predict import (
    CascadeStage,
    cascade,
    load_ensemble,
    parse_condition,
    parse_stage,
    predict_slides,
    read_cascade_spec,
)
from msfm.registry import preset_config

D = 16
TINY = {"dim": 16, "heads": 2, "dim_head": 8, "mlp_dim": 32, "depths": (1, 1, 1, 1, 1)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _features(root: Path, n: int = 10, encoder: str = "synthetic", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    fd = root / "features"
    fd.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = int(rng.integers(1, 6))
        x = (rng.normal(size=(k, 84, D)) + rng.normal(scale=3.0, size=(1, 1, D))).astype(np.float32)
        write_slide_features(
            fd / f"s{i}.h5", SlideFeatures(f"s{i}", x, np.zeros((k, 2), np.int64), attrs={"encoder": encoder})
        )
    return fd


def _model(classes: list[str], seed: int) -> Roam:
    torch.manual_seed(seed)
    model = Roam(
        preset_config("roam-tiny", d_in=D, n_classes=len(classes), class_names=tuple(classes), **TINY)
    )
    with torch.no_grad():  # larger head weights so the random models disagree clearly between slides
        for head in model.slide_heads:
            head.fc.weight.mul_(20.0)
    return model.eval()


def _run(root: Path, classes: list[str], task: str, seeds=(0, 1)) -> Path:
    """A run directory laid out as `msfm roam train` writes it (fold*/best + done.json)."""
    for k, seed in enumerate(seeds):
        fold = root / f"fold{k}"
        extra = {
            "task": task,
            "class_names": classes,
            "encoder": {"name": "synthetic"},
            "feature_dim": D,
            "fold": k,
        }
        save_model(_model(classes, seed), fold / "best", extra=extra)
        (fold / "done.json").write_text(json.dumps({"fold": k}))
    return root


def _softmax(model: Roam, fd: Path, sid: str) -> np.ndarray:
    from msfm.models.roam.features import read_slide_features

    x = torch.from_numpy(read_slide_features(fd / f"{sid}.h5").features)
    with torch.no_grad():
        return torch.softmax(model(x).logits, -1)[0].double().numpy()


def test_ensemble_is_the_mean_of_fold_softmaxes(tmp_path):
    fd = _features(tmp_path)
    run = _run(tmp_path / "run", ["astro", "oligo", "epend"], "subtyping")
    pred = predict_slides(run, fd, device="cpu", per_model=True)
    assert list(pred.slide_id) == [f"s{i}" for i in range(10)]
    assert pred.attrs["n_models"] == 2
    assert pred.attrs["task"] == "subtyping"
    cols = ["prob_astro", "prob_oligo", "prob_epend"]
    f0 = load_ensemble(run / "fold0" / "best").models[0]
    f1 = load_ensemble(run / "fold1" / "best").models[0]
    for i, sid in enumerate(pred.slide_id):
        p0, p1 = _softmax(f0, fd, sid), _softmax(f1, fd, sid)
        np.testing.assert_allclose(pred.loc[i, cols].to_numpy(float), (p0 + p1) / 2, atol=1e-6)
        np.testing.assert_allclose(
            pred.loc[i, ["m0_prob_astro", "m0_prob_oligo", "m0_prob_epend"]].to_numpy(float), p0, atol=1e-6
        )
    best = pred[cols].to_numpy().argmax(1)
    assert list(pred.pred) == [["astro", "oligo", "epend"][j] for j in best]
    np.testing.assert_allclose(pred.confidence, pred[cols].max(1))
    assert (pred.n_rois >= 1).all()
    # the same ensemble from an explicit checkpoint list, and a subset of slides from a table
    table = pd.DataFrame({"slide_id": ["s3", "s1"]})
    sub = predict_slides([run / "fold0" / "best", run / "fold1" / "best"], fd, table, device="cpu")
    np.testing.assert_allclose(
        sub[cols].to_numpy(), pred.set_index("slide_id").loc[["s3", "s1"], cols].to_numpy()
    )


def test_prediction_errors(tmp_path):
    fd = _features(tmp_path, n=3)
    run = _run(tmp_path / "run", ["a", "b"], "t")
    with pytest.raises(MsfmInputError, match=r"1 slide\(s\) have no feature file.*ghost"):
        predict_slides(run, fd, ["s0", "ghost"], device="cpu")
    assert list(predict_slides(run, fd, ["s0", "ghost"], device="cpu", skip_missing=True).slide_id) == ["s0"]
    other = _features(tmp_path / "other", n=2, encoder="resnet50_trunc")
    with pytest.raises(MsfmInputError, match=r"another encoder|encoder 'resnet50_trunc'"):
        predict_slides(run, other, device="cpu")
    (run / "fold1" / "done.json").unlink()
    with pytest.raises(MsfmInputError, match=r"not finished.*fold1"):
        predict_slides(run, fd, device="cpu")
    mixed = _run(tmp_path / "mixed", ["a", "b"], "t")
    save_model(_model(["x", "y"], 3), mixed / "fold1" / "best", extra={"class_names": ["x", "y"]})
    with pytest.raises(MsfmInputError, match="disagree on the classes"):
        load_ensemble(mixed)


def test_condition_and_stage_parsing(tmp_path):
    (c,) = parse_condition("detection==tumour")
    assert (c.stage, c.values, c.negate) == ("detection", ("tumour",), False)
    a, b = parse_condition("detection==tumour,gliosis & subtyping != epend")
    assert a.values == ("tumour", "gliosis")
    assert b.negate
    assert b.values == ("epend",)
    with pytest.raises(MsfmInputError, match="Cannot parse"):
        parse_condition("detection=tumour")
    s = parse_stage("subtyping=C:/runs/sub:detection==tumour")
    assert (s.name, s.source, s.when) == ("subtyping", "C:/runs/sub", "detection==tumour")
    assert parse_stage("idh=runs/a+runs/b").source == ["runs/a", "runs/b"]
    assert parse_stage("det=runs/det").when is None
    with pytest.raises(MsfmInputError, match="NAME=RUN_DIR"):
        parse_stage("runs/det")
    with pytest.raises(MsfmInputError, match="not usable"):
        CascadeStage("slide_id", "x")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "stages:\n  - {name: det, run: runs/det}\n  - {name: sub, run: runs/sub, when: 'det==tumour'}\n"
    )
    st = read_cascade_spec(spec)
    assert [x.name for x in st] == ["det", "sub"]
    assert st[1].source == str(tmp_path / "runs/sub")
    (tmp_path / "bad.json").write_text(json.dumps({"stages": [{"name": "det", "path": "x"}]}))
    with pytest.raises(MsfmInputError, match="needs 'name' and 'run'"):
        read_cascade_spec(tmp_path / "bad.json")


def test_cascade_routes_slides_by_earlier_predictions(tmp_path):
    fd = _features(tmp_path, n=12, seed=4)
    det = _run(tmp_path / "det", ["normal", "tumour"], "detection", seeds=(10, 11))
    sub = _run(tmp_path / "sub", ["astro", "oligo"], "subtyping", seeds=(20, 21))
    grade = _run(tmp_path / "grade", ["G2", "G3"], "grade", seeds=(30,))
    stages = [
        CascadeStage("detection", det),
        CascadeStage("subtyping", sub, when="detection==tumour"),
        CascadeStage("grade", grade, when="detection==tumour&subtyping!=oligo"),
    ]
    out = cascade(stages, fd, device="cpu")
    assert out.attrs["stage_order"] == ["detection", "subtyping", "grade"]
    alone = predict_slides(det, fd, device="cpu").set_index("slide_id")
    tumour = alone.index[alone.pred == "tumour"].tolist()
    assert 0 < len(tumour) < 12, "test data must give both detection outcomes"
    out = out.set_index("slide_id")
    assert list(out.detection) == list(alone.pred)
    ran_sub = out.index[out.subtyping != ""].tolist()
    assert ran_sub == tumour
    # where subtyping ran, its probabilities are those of the subtyping ensemble alone
    sub_alone = predict_slides(sub, fd, tumour, device="cpu").set_index("slide_id")
    np.testing.assert_allclose(out.loc[tumour, "subtyping_prob_oligo"], sub_alone.prob_oligo, atol=1e-9)
    assert out.loc[~out.index.isin(tumour), "subtyping_prob_astro"].isna().all()
    assert out.loc[~out.index.isin(tumour), "subtyping_confidence"].isna().all()
    expect_grade = [s for s in tumour if out.at[s, "subtyping"] != "oligo"]
    assert out.index[out.grade != ""].tolist() == expect_grade
    for s in out.index:
        chain = (
            ["detection"] + (["subtyping"] if s in tumour else []) + (["grade"] if s in expect_grade else [])
        )
        assert out.at[s, "stages"] == ">".join(chain)


def test_cascade_rejects_bad_conditions(tmp_path):
    fd = _features(tmp_path, n=2)
    det = _run(tmp_path / "det", ["normal", "tumour"], "detection", seeds=(0,))
    with pytest.raises(MsfmInputError, match="later stage"):
        cascade([CascadeStage("a", det, when="b==tumour"), CascadeStage("b", det)], fd, device="cpu")
    with pytest.raises(MsfmInputError, match=r"never predicts.*\['normal', 'tumour'\]"):
        cascade([CascadeStage("a", det), CascadeStage("b", det, when="a==tumor")], fd, device="cpu")
    with pytest.raises(MsfmInputError, match="repeat"):
        cascade([CascadeStage("a", det), CascadeStage("a", det)], fd, device="cpu")
    # a stage that selects no slide leaves empty columns, not an error
    out = cascade(
        [CascadeStage("a", det), CascadeStage("b", det, when="a==normal&a==tumour")], fd, device="cpu"
    )
    assert (out.b == "").all()
    assert out.b_prob_tumour.isna().all()
    assert not math.isnan(out.a_confidence[0])
