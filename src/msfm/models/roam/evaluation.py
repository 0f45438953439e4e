"""``msfm.roam.evaluate``: score slide predictions against the labels of a slide table.

Accuracy, balanced accuracy, macro-F1, one-vs-rest AUC per class and macro, and the confusion matrix (counts and
row-normalised), from the ``prob_<class>`` columns of ``predict`` output or the ``<stage>_prob_<class>`` columns of
one ``cascade`` stage. Slides without a prediction (a stage that did not run) or without a label are left out and
counted in ``n_skipped``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msfm.data.slide_ids import check_slide_ids
from msfm.errors import MsfmInputError
from msfm.models.roam.prediction import check_file_out
from msfm.models.roam.tables import SLIDE_ID, as_table, parse_label_map, value_text
from msfm.runtime.atomic import atomic_write_json
from msfm.runtime.jsonable import to_jsonable
from msfm.runtime.results import Result

__all__ = ["EvaluationResult", "evaluate"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class EvaluationResult(Result):
    """What :func:`evaluate` returns.

    Attributes:
        metrics: ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``auc`` (per class), ``auc_macro``,
            ``confusion`` (``counts``, ``normalized``), ``support``, ``notes`` and ``n_skipped`` (plain values).
        class_names: Classes scored, in the order of the probability columns.
        task: The label column.
        stage: The cascade stage scored (None for ``predict`` output).
    """

    metrics: dict[str, Any]
    class_names: list[str] = field(default_factory=list)
    task: str = ""
    stage: str | None = None


def _probability_columns(preds: Any, stage: str | None, what: str) -> tuple[list[str], list[str]]:
    prefix = f"{stage}_prob_" if stage else "prob_"
    pcols = [c for c in preds.columns if str(c).startswith(prefix)]
    if len(pcols) < 2:
        hint = "" if stage else " Pass stage=NAME (CLI --stage NAME) for cascade output."
        msg = f"{what} has no {prefix}<class> columns (found {list(preds.columns)[:20]}).{hint}"
        raise MsfmInputError(msg)
    return pcols, [c[len(prefix) :] for c in pcols]


def evaluate(
    data: Any,
    slides: Any,
    *,
    task: str,
    stage: str | None = None,
    label_map: str | Mapping[str, str] | None = None,
    out: PathLike | None = None,
    plot: PathLike | None = None,
    overwrite: bool = False,
) -> EvaluationResult:
    """Score predictions against the labels of a slide table.

    Args:
        data: Predictions: the result of ``predict``/``cascade``, its table, or a CSV path.
        slides: The labelled slide table (DataFrame or CSV path) with ``slide_id`` and the ``task`` column.
        task: Label column of ``slides``.
        stage: Cascade stage to score (its ``<stage>_prob_<class>`` columns); None for ``predict`` output.
        label_map: Raw value -> class name (``"2=tumour,3=tumour"`` or a mapping), as in training.
        out: Also write the metrics as JSON here.
        plot: Also draw the confusion matrix to this PNG.
        overwrite: Replace existing ``out``/``plot`` files.

    Returns:
        The metrics.

    Raises:
        MsfmInputError: Missing columns, invalid slide ids, no slide with both a prediction and a label, labels
            that are not classes of the predictions, existing outputs.
    """
    from msfm.eval.classification import classification_report, save_confusion_png

    for path in (out, plot):
        check_file_out(path, overwrite=overwrite)
    src_preds = str(data) if isinstance(data, str | os.PathLike) else "the predictions"
    src_labels = str(slides) if isinstance(slides, str | os.PathLike) else "the slide table"
    preds = as_table(data, "predictions")
    labels = as_table(slides, "slide table")
    for df, what, cols in ((preds, src_preds, (SLIDE_ID,)), (labels, src_labels, (SLIDE_ID, task))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            msg = f"{what} has no column(s) {missing}; its columns are {list(df.columns)[:30]}."
            raise MsfmInputError(msg)
    preds[SLIDE_ID] = check_slide_ids(preds[SLIDE_ID].tolist(), src_preds)
    labels[SLIDE_ID] = check_slide_ids(labels[SLIDE_ID].tolist(), src_labels)
    pcols, names = _probability_columns(preds, stage, src_preds)
    lm = parse_label_map(label_map)
    truth = {}
    for sid, raw in zip(labels[SLIDE_ID], labels[task]):
        v = value_text(raw)
        if v is not None and lm is not None:
            v = lm.get(v)
        if v is not None:
            truth[sid] = v
    proba = preds[pcols].astype(float)
    keep = proba.notna().all(axis=1).to_numpy() & preds[SLIDE_ID].map(lambda s: s in truth).to_numpy()
    if not keep.any():
        msg = f"No slide of {src_preds} has both a prediction and a label in column {task!r} of {src_labels}."
        raise MsfmInputError(msg)
    ids = preds.loc[keep, SLIDE_ID].tolist()
    unknown = sorted({truth[s] for s in ids} - set(names))
    if unknown:
        msg = (
            f"Labels {unknown} of column {task!r} are not classes of the predictions {names}. Map them with "
            "label_map (CLI --label-map, e.g. '3=tumour')."
        )
        raise MsfmInputError(msg)
    y = np.array([names.index(truth[s]) for s in ids], dtype=np.int64)
    report = classification_report(y, proba.to_numpy()[keep], names)
    report["n_skipped"] = int((~keep).sum())
    metrics = to_jsonable(report)
    if out is not None:
        atomic_write_json(out, metrics)
    if plot is not None:
        save_confusion_png(report["confusion"], names, plot, title=f"{stage or task}")
    return EvaluationResult(metrics, list(names), task, stage)
