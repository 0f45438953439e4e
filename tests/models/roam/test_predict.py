"""ROAM prediction: fold ensembles (mean softmax), feature checks, and cascade routing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import msfm
from msfm.errors import MsfmInputError
from msfm.models.roam.cascades import CascadeStage, parse_condition, parse_stage, read_cascade_spec
from msfm.models.roam.checkpoint import save_model
from msfm.models.roam.ensemble import RoamEnsemble
from msfm.models.roam.features import SlideFeatures, write_slide_features
from msfm.models.roam.model import Roam
from msfm.registry import preset_config
from msfm.runtime.loaded import Loaded

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


def predict_slides(run, fd, slides=None, **kw) -> pd.DataFrame:
    return msfm.roam.predict(fd, run, slides=slides, **kw).table


def cascade(stages, fd, **kw) -> pd.DataFrame:
    return msfm.roam.cascade(fd, stages, **kw).table


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
    f0 = msfm.roam.load(run / "fold0" / "best", device="cpu").model
    f1 = msfm.roam.load(run / "fold1" / "best", device="cpu").model
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
        msfm.roam.load(mixed, device="cpu")


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


# --- the public shape: load, Results, out=, text stages, evaluate, deprecated names ---------------------------


def test_load_gives_one_model_or_the_fold_ensemble(tmp_path):
    run = _run(tmp_path / "run", ["a", "b", "c"], "t")
    one = msfm.roam.load(run / "fold0" / "best", device="cpu")
    assert isinstance(one.model, Roam)
    assert one.extra["class_names"] == ["a", "b", "c"]
    ens = msfm.roam.load(run, device="cpu")
    assert isinstance(ens, Loaded)
    assert isinstance(ens.model, RoamEnsemble)
    assert isinstance(ens.model.models, torch.nn.ModuleList)
    assert len(ens.model) == 2
    assert ens.path == run
    assert ens.config == ens.model.models[0].config
    assert (ens.model.class_names, ens.model.task, ens.model.encoder) == (["a", "b", "c"], "t", "synthetic")
    assert ens.extra["class_names"] == ["a", "b", "c"]
    assert ens.extra["n_models"] == 2
    assert ens.extra["feature_dim"] == D
    # forward = mean softmax over the folds
    x = torch.randn(1, 3, 84, D)
    with torch.no_grad():
        mean = (ens.model.models[0](x).logits.softmax(-1) + ens.model.models[1](x).logits.softmax(-1)) / 2
        torch.testing.assert_close(ens.model(x), mean)
    # a list, or text joined by '+', is one ensemble without a path
    for source in ([run / "fold0" / "best", run / "fold1" / "best"], f"{run}/fold0/best+{run}/fold1/best"):
        listed = msfm.roam.load(source, device="cpu")
        assert isinstance(listed.model, RoamEnsemble)
        assert listed.path is None
        assert len(listed.model) == 2
    with pytest.raises(MsfmInputError, match="neither an msfm ROAM checkpoint"):
        msfm.roam.load(tmp_path, device="cpu")


def test_predict_takes_a_loaded_writes_out_and_saves(tmp_path):
    fd = _features(tmp_path, n=4)
    run = _run(tmp_path / "run", ["a", "b"], "t")
    res = msfm.roam.predict(fd, run, device="cpu")
    assert isinstance(res, msfm.roam.SlidePredictions)
    assert (res.class_names, res.task, res.n_models) == (["a", "b"], "t", 2)
    loaded = msfm.roam.load(run, device="cpu")
    out = tmp_path / "preds.csv"
    again = msfm.roam.predict(fd, loaded, device="cpu", out=out)
    pd.testing.assert_frame_equal(res.table, again.table)
    pd.testing.assert_frame_equal(pd.read_csv(out), res.table, check_dtype=False)
    with pytest.raises(MsfmInputError, match="already exists"):
        msfm.roam.predict(fd, loaded, device="cpu", out=out)
    saved = res.save(tmp_path / "saved")
    assert json.loads((saved / "result.json").read_text())["class_names"] == ["a", "b"]
    assert len(pd.read_csv(saved / "table.csv")) == 4


def test_cascade_stages_as_text_and_spec(tmp_path):
    fd = _features(tmp_path, n=6, seed=4)
    det = _run(tmp_path / "det", ["normal", "tumour"], "detection", seeds=(10, 11))
    sub = _run(tmp_path / "sub", ["astro", "oligo"], "subtyping", seeds=(20,))
    objects = [CascadeStage("det", det), CascadeStage("sub", sub, when="det==tumour")]
    texts = [f"det={det}", f"sub={sub}:det==tumour"]
    a = msfm.roam.cascade(fd, objects, device="cpu")
    b = msfm.roam.cascade(fd, texts, device="cpu", out=tmp_path / "c.csv")
    pd.testing.assert_frame_equal(a.table, b.table)
    assert b.stage_order == ["det", "sub"]
    assert b.stages[0]["n_slides"] == 6
    assert (tmp_path / "c.csv").is_file()
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"stages:\n  - {{name: det, run: {det}}}\n  - {{name: sub, run: {sub}, when: det==tumour}}\n"
    )
    pd.testing.assert_frame_equal(msfm.roam.cascade(fd, spec, device="cpu").table, a.table)
    with pytest.raises(MsfmInputError, match="at least one stage"):
        msfm.roam.cascade(fd, [], device="cpu")


def test_evaluate_scores_predictions_and_cascade_stages(tmp_path):
    fd = _features(tmp_path, n=8, seed=2)
    run = _run(tmp_path / "run", ["a", "b"], "t")
    preds = msfm.roam.predict(fd, run, device="cpu")
    truth = preds.table[["slide_id"]].assign(label=preds.table["pred"].map({"a": "1", "b": "2"}))
    truth.loc[0, "label"] = None  # unlabelled: left out
    res = msfm.roam.evaluate(preds, truth, task="label", label_map="1=a,2=b", out=tmp_path / "m.json")
    assert isinstance(res, msfm.roam.EvaluationResult)
    assert res.metrics["n"] == 7
    assert res.metrics["n_skipped"] == 1
    assert res.metrics["accuracy"] == 1.0  # the labels are the predictions
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 7
    assert res.class_names == ["a", "b"]
    with pytest.raises(MsfmInputError, match="already exists"):
        msfm.roam.evaluate(preds, truth, task="label", label_map="1=a,2=b", out=tmp_path / "m.json")
    with pytest.raises(MsfmInputError, match=r"Labels \['1', '2'\]"):
        msfm.roam.evaluate(preds.table, truth, task="label")
    casc = msfm.roam.cascade(fd, [f"x={run}"], device="cpu")
    with pytest.raises(MsfmInputError, match="stage=NAME"):
        msfm.roam.evaluate(casc, truth, task="label")
    staged = msfm.roam.evaluate(casc, truth, task="label", stage="x", label_map={"1": "a", "2": "b"})
    assert staged.metrics["accuracy"] == res.metrics["accuracy"]
    bad = truth.assign(slide_id=["../x", *truth.slide_id[1:]])
    with pytest.raises(MsfmInputError, match="Invalid slide id"):
        msfm.roam.evaluate(preds, bad, task="label")


def test_old_names_warn_and_keep_their_return_types(tmp_path):
    import warnings

    fd = _features(tmp_path, n=3)
    run = _run(tmp_path / "run", ["a", "b"], "t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = msfm.roam.predict_slides(run, fd, device="cpu")
        model, meta = msfm.roam.load_model(run / "fold0" / "best")
        ens = msfm.roam.load_ensemble(run)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("msfm.roam.predict(" in m for m in messages)
    assert any("msfm.roam.load(" in m for m in messages)
    assert isinstance(table, pd.DataFrame)
    assert len(table) == 3
    assert isinstance(model, Roam)
    assert meta["extra"]["task"] == "t"
    assert isinstance(ens, RoamEnsemble)
