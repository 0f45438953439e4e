"""The cross-validation report of a ROAM run: per-fold prediction tables, metrics over folds, out-of-fold and
test-ensemble predictions, ``metrics.json`` and confusion matrices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msfm.models.roam.slide_table import SlideTable
from msfm.models.roam.tables import SLIDE_ID, prob_column
from msfm.runtime.atomic import atomic_write_json, atomic_write_text
from msfm.runtime.jsonable import to_jsonable

__all__ = ["FOLD_PREDICTIONS", "aggregate_run", "fold_frame", "summarize_folds"]

FOLD_PREDICTIONS = "predictions.csv"


def fold_frame(
    ids: Sequence[str], split: str, probs: np.ndarray, table: SlideTable, fold: int
) -> pd.DataFrame:
    """One fold's predictions of a split: ``slide_id, fold, split, label, pred, confidence, prob_<class>``."""
    lab = table.label_of()
    y = [table.class_names[lab[s]] for s in ids]
    idx = probs.argmax(axis=1) if len(ids) else np.zeros(0, dtype=int)
    df = pd.DataFrame(
        {
            SLIDE_ID: list(ids),
            "fold": fold,
            "split": split,
            "label": y,
            "pred": [table.class_names[i] for i in idx],
            "confidence": probs.max(axis=1) if len(ids) else [],
        }
    )
    for c, name in enumerate(table.class_names):
        df[prob_column(name)] = probs[:, c]
    return df


def summarize_folds(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation and per-fold values of the main metrics over fold reports."""
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auc_macro")
    out = {}
    for key in keys:
        vals = np.array([r[key] for r in reports], dtype=float)
        finite = vals[np.isfinite(vals)]
        out[key] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            "per_fold": vals.tolist(),
        }
    return out


def aggregate_run(out: Path, table: SlideTable, dones: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the run's out-of-fold and test-ensemble predictions, metrics and figures; return the metrics.

    Files: ``oof_predictions.csv``, ``test_predictions.csv`` (mean softmax over the folds that held the slide out),
    ``metrics.json``, ``fold_metrics.csv``, ``confusion_oof.png`` and ``confusion_test.png``.
    """
    from msfm.eval.classification import classification_report, save_confusion_png

    names = table.class_names
    lab = table.label_of()
    frames = [pd.read_csv(out / f"fold{d['fold']}" / FOLD_PREDICTIONS, dtype={SLIDE_ID: str}) for d in dones]
    preds = pd.concat(frames, ignore_index=True)
    pcols = [prob_column(c) for c in names]
    oof = preds[preds["split"] == "val"].drop(columns="split").reset_index(drop=True)
    y_oof = np.array([lab[s] for s in oof[SLIDE_ID]], dtype=np.int64)
    metrics: dict[str, Any] = {
        "task": table.task,
        "classes": list(names),
        "n_folds": len(dones),
        "folds": [{k: v for k, v in d.items()} for d in dones],
        "cv_val": summarize_folds([d["val"] for d in dones]),
        "oof": classification_report(y_oof, oof[pcols].to_numpy(), names),
    }
    atomic_write_text(out / "oof_predictions.csv", oof.to_csv(index=False))
    save_confusion_png(
        metrics["oof"]["confusion"], names, out / "confusion_oof.png", title=f"{table.task}: out-of-fold"
    )
    tests = preds[preds["split"] == "test"]
    if len(tests):
        # Ensemble: mean softmax over the fold models that held the slide out as test.
        grouped = tests.groupby(SLIDE_ID, sort=False)
        mean = grouped[pcols].mean()
        order = list(dict.fromkeys(tests[SLIDE_ID]))
        mean = mean.loc[order]
        proba = mean.to_numpy()
        idx = proba.argmax(axis=1)
        test = pd.DataFrame(
            {
                SLIDE_ID: order,
                "label": [names[lab[s]] for s in order],
                "pred": [names[i] for i in idx],
                "confidence": proba.max(axis=1),
            }
        )
        for c, col in enumerate(pcols):
            test[col] = proba[:, c]
        test["n_models"] = grouped.size().loc[order].to_numpy()
        y_test = np.array([lab[s] for s in order], dtype=np.int64)
        metrics["test_ensemble"] = classification_report(y_test, proba, names)
        metrics["test_folds"] = summarize_folds([d["test"] for d in dones if d.get("test")])
        atomic_write_text(out / "test_predictions.csv", test.to_csv(index=False))
        save_confusion_png(
            metrics["test_ensemble"]["confusion"],
            names,
            out / "confusion_test.png",
            title=f"{table.task}: test ensemble",
        )
    rows = []
    for d in dones:
        v = d["val"]
        rows.append(
            {
                "fold": d["fold"],
                "best_epoch": d["best_epoch"],
                "best_val_loss": d["best_val_loss"],
                "epochs_trained": d["epochs_trained"],
                "val_accuracy": v["accuracy"],
                "val_balanced_accuracy": v["balanced_accuracy"],
                "val_macro_f1": v["macro_f1"],
                "val_auc_macro": v["auc_macro"],
                "test_accuracy": d["test"]["accuracy"] if d.get("test") else math.nan,
            }
        )
    atomic_write_text(out / "fold_metrics.csv", pd.DataFrame(rows).to_csv(index=False))
    metrics = to_jsonable(metrics)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
