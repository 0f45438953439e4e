"""Slide-classification metrics: values against scikit-learn, absent classes, JSON and the confusion PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from msfm.errors import MsfmInputError
from msfm.eval.classification import classification_report, one_vs_rest_auc, save_confusion_png, to_jsonable


def _random_case(n: int = 60, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0  # informative but imperfect
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_multiclass_values_match_sklearn():
    y, p = _random_case()
    names = ["astro", "oligo", "epend"]
    r = classification_report(y, p, names)
    pred = p.argmax(1)
    assert r["n"] == 60
    assert r["accuracy"] == pytest.approx((pred == y).mean())
    assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert r["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    for c, name in enumerate(names):
        assert r["auc"][name] == pytest.approx(roc_auc_score(y == c, p[:, c]))
    assert r["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    counts = np.array(r["confusion"]["counts"])
    assert counts.sum() == 60
    assert counts.trace() == (pred == y).sum()
    np.testing.assert_allclose(np.array(r["confusion"]["normalized"]).sum(1), 1.0)
    assert r["support"] == {n: int((y == c).sum()) for c, n in enumerate(names)}
    assert r["notes"] == []


def test_binary_auc_is_the_positive_class():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.3])
    r = classification_report(y, np.stack([1 - p1, p1], 1), ["wt", "mut"])
    assert r["auc_macro"] == pytest.approx(roc_auc_score(y, p1))
    assert r["auc"]["mut"] == pytest.approx(r["auc"]["wt"])


def test_class_absent_from_y_true_gives_nan_auc_and_a_note():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.5, 0.2, 0.3], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    r = classification_report(y, p, ["a", "b", "c"])
    assert math.isnan(r["auc"]["c"])
    assert r["auc"]["a"] == pytest.approx(1.0)
    # macro over the defined classes only
    assert r["auc_macro"] == pytest.approx(np.mean([r["auc"]["a"], r["auc"]["b"]]))
    assert any("'c'" in n and "undefined" in n for n in r["notes"])
    # slide 3 predicted as the absent class: counted as an error, absent class not averaged in
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["balanced_accuracy"] == pytest.approx(0.75)
    assert all(math.isnan(v) for v in r["confusion"]["normalized"][2])
    assert r["confusion"]["counts"][1][2] == 1


def test_single_class_in_y_true_does_not_crash():
    r = classification_report([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["neg", "pos"])
    assert math.isnan(r["auc_macro"])
    assert r["accuracy"] == 0.5


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(MsfmInputError, match="shape"):
        classification_report([0, 1], np.ones((3, 2)) / 2, ["a", "b"])
    with pytest.raises(MsfmInputError, match="outside"):
        classification_report([0, 2], np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(MsfmInputError, match="NaN"):
        classification_report([0, 1], np.array([[np.nan, 1.0], [0.5, 0.5]]), ["a", "b"])
    with pytest.raises(MsfmInputError, match="integer"):
        classification_report(["a", "b"], np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(MsfmInputError, match="two classes"):
        one_vs_rest_auc([0], np.ones((1, 1)), ["a"])


def test_report_to_strict_json_and_png(tmp_path):
    y = np.array([0, 0, 1])
    p = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.2, 0.8, 0.0]])
    r = classification_report(y, p, ["a", "b", "c"])
    text = json.dumps(to_jsonable(r), allow_nan=False)  # NaN became null
    back = json.loads(text)
    assert back["auc"]["c"] is None
    assert back["confusion"]["normalized"][2] == [None, None, None]
    png = save_confusion_png(back["confusion"], ["a", "b", "c"], tmp_path / "cm.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]  # no temporary debris
