"""Slide-level classification metrics from class probabilities (pure numpy / scikit-learn).

:func:`classification_report` scores a probabilistic classifier the way ROAM/CLAM papers report it: accuracy,
balanced accuracy, macro F1, per-class precision/recall/F1, one-vs-rest ROC AUC per class and their macro mean
(binary tasks: the AUC of the positive class), and the confusion matrix as counts and row-normalised. Classes
that never occur in ``y_true`` (a rare class missing from a fold) do not crash anything: their AUC is NaN and a
note says why. :func:`save_confusion_png` draws the matrix (matplotlib Agg, atomic write) and :func:`to_jsonable`
turns a report into strict JSON (NaN -> null).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError
from msfm.runtime.jsonable import to_jsonable

__all__ = ["classification_report", "one_vs_rest_auc", "save_confusion_png", "to_jsonable"]


def _check_inputs(y_true: Any, proba: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    n_classes = len(class_names)
    if n_classes < 2:
        msg = f"class_names must list at least two classes; got {list(class_names)}."
        raise MsfmInputError(msg)
    if y.ndim != 1:
        msg = f"y_true must be 1-D (one class index per slide); got shape {y.shape}."
        raise MsfmInputError(msg)
    if p.ndim != 2 or p.shape != (y.shape[0], n_classes):
        msg = (
            f"proba must have shape [n_slides, n_classes] = {(y.shape[0], n_classes)}; got {p.shape}. Its columns "
            "must follow class_names."
        )
        raise MsfmInputError(msg)
    if y.shape[0] == 0:
        msg = "No slides to score (y_true is empty)."
        raise MsfmInputError(msg)
    if not np.issubdtype(y.dtype, np.integer):
        msg = f"y_true must hold integer class indices (0..{n_classes - 1}); got dtype {y.dtype}."
        raise MsfmInputError(msg)
    bad = np.unique(y[(y < 0) | (y >= n_classes)])
    if bad.size:
        msg = (
            f"y_true holds class indices {bad[:5].tolist()} outside 0..{n_classes - 1} ({list(class_names)})."
        )
        raise MsfmInputError(msg)
    if not np.isfinite(p).all():
        msg = "proba holds NaN or infinite values; pass the probabilities of slides that were predicted."
        raise MsfmInputError(msg)
    return y.astype(np.int64), p


def one_vs_rest_auc(
    y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, float], list[str]]:
    """ROC AUC of each class against the rest.

    Args:
        y_true: Class indices.
        proba: Class probabilities (columns in ``class_names`` order).
        class_names: Class names.

    Returns:
        ``(auc, notes)``: class name -> AUC (NaN when the class is absent from ``y_true`` or is the only class
        present, since an ROC curve needs positives and negatives), and one note per undefined AUC.

    Shape:
        y_true: ``[n]``; proba: ``[n, C]``.
    """
    from sklearn.metrics import roc_auc_score

    y, p = _check_inputs(y_true, proba, class_names)
    out: dict[str, float] = {}
    notes: list[str] = []
    for c, name in enumerate(class_names):
        positives = int((y == c).sum())
        if positives == 0 or positives == y.shape[0]:
            out[str(name)] = math.nan
            why = "no slide of this class" if positives == 0 else "every slide is of this class"
            notes.append(f"AUC of class {name!r} is undefined ({why} among the {y.shape[0]} scored slides).")
            continue
        out[str(name)] = float(roc_auc_score(y == c, p[:, c]))
    return out, notes


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    *,
    y_pred: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Score class probabilities against true classes.

    Args:
        y_true: True class indices (0-based, in ``class_names`` order).
        proba: Predicted class probabilities; rows need not sum exactly to 1.
        class_names: Class names, one per column of ``proba``.
        y_pred: Predicted class indices; default ``argmax(proba)``.

    Returns:
        A dict with ``n``, ``classes``, ``support`` (slides per true class), ``accuracy``, ``balanced_accuracy``
        (mean recall over classes present in ``y_true``), ``macro_f1`` (over classes present in ``y_true``, so a
        class absent from the data does not count as an F1 of 0), ``per_class`` (precision/recall/F1/support per
        class), ``auc`` (class -> one-vs-rest AUC, NaN when undefined), ``auc_macro`` (mean of the defined
        per-class AUCs; for two classes the AUC of the positive class, ``class_names[1]``), ``confusion``
        (``counts`` and ``normalized``: rows true class, columns predicted, rows of absent classes NaN) and
        ``notes`` (why a value is undefined).

    Raises:
        MsfmInputError: On misaligned shapes, class indices out of range or non-finite probabilities.

    Shape:
        y_true: ``[n]``; proba: ``[n, C]``; y_pred: ``[n]``.

    Example:
        >>> r = classification_report([0, 1, 1], np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]), ["a", "b"])
        >>> round(r["accuracy"], 3), r["auc_macro"]
        (0.667, 1.0)
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y, p = _check_inputs(y_true, proba, class_names)
    names = [str(c) for c in class_names]
    n_classes = len(names)
    pred = np.asarray(y_pred, dtype=np.int64) if y_pred is not None else p.argmax(axis=1)
    if pred.shape != y.shape:
        msg = f"y_pred has shape {pred.shape} but y_true has {y.shape}; give one prediction per slide."
        raise MsfmInputError(msg)
    labels = list(range(n_classes))
    counts = confusion_matrix(y, pred, labels=labels)
    support = counts.sum(axis=1)
    present = [c for c in labels if support[c] > 0]
    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.where(support[:, None] > 0, counts / np.maximum(support[:, None], 1), np.nan)
    notes: list[str] = []
    absent = [names[c] for c in labels if support[c] == 0]
    if absent:
        notes.append(
            f"Classes {absent} do not occur among the {y.shape[0]} scored slides: they are left out of the "
            "balanced accuracy and macro F1, and their confusion rows are NaN."
        )
    auc, auc_notes = one_vs_rest_auc(y, p, names)
    notes.extend(auc_notes)
    if n_classes == 2:
        auc_macro = auc[names[1]]
    else:
        defined = [v for v in auc.values() if not math.isnan(v)]
        auc_macro = float(np.mean(defined)) if defined else math.nan
        if defined and len(defined) < n_classes:
            notes.append(f"auc_macro averages the {len(defined)} classes whose AUC is defined.")
    return {
        "n": int(y.shape[0]),
        "classes": names,
        "support": {names[c]: int(support[c]) for c in labels},
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean([rec[c] for c in present])),
        "macro_f1": float(np.mean([f1[c] for c in present])),
        "per_class": {
            names[c]: {
                "precision": float(prec[c]),
                "recall": float(rec[c]) if support[c] > 0 else math.nan,
                "f1": float(f1[c]) if support[c] > 0 else math.nan,
                "support": int(support[c]),
            }
            for c in labels
        },
        "auc": auc,
        "auc_macro": auc_macro,
        "confusion": {"counts": counts.astype(int).tolist(), "normalized": normalized.tolist()},
        "notes": notes,
    }


def save_confusion_png(
    confusion: Mapping[str, Any],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Draw the confusion matrix (counts and row-normalised side by side) to a PNG, atomically.

    Args:
        confusion: ``report["confusion"]`` from :func:`classification_report`.
        class_names: Class names (axis labels).
        path: PNG path; its folder must exist.
        title: Figure title.

    Returns:
        The written path.

    Shape:
        ``confusion["counts"]`` and ``confusion["normalized"]``: ``[C, C]``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from msfm.runtime.atomic import atomic_write

    counts = np.asarray(confusion["counts"], dtype=float)
    norm = np.asarray(
        [[math.nan if v is None else v for v in row] for row in confusion["normalized"]], dtype=float
    )
    names = [str(c) for c in class_names]
    size = max(3.2, 0.55 * len(names) + 2.2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.0, size))
    panels = ((counts, "counts", "{:.0f}"), (norm, "row-normalised", "{:.2f}"))
    for ax, (mat, label, fmt) in zip(axes, panels):
        shown = np.ma.masked_invalid(mat)
        vmax = 1.0 if label != "counts" else max(1.0, float(np.nanmax(mat)) if mat.size else 1.0)
        im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat[i, j]
                text = "–" if math.isnan(v) else fmt.format(v)
                dark = not math.isnan(v) and v > 0.6 * vmax
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    target = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # glyph warnings for unusual class names
        with atomic_write(target, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    return target
