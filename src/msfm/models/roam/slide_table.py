"""The labelled slides of one task: a slide table read against a feature folder (:func:`read_slide_table`)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from msfm.data.slide_ids import check_slide_id
from msfm.errors import MsfmInputError
from msfm.models.roam.feature_store import resolve_feature_files
from msfm.models.roam.tables import SLIDE_ID, as_table, value_text

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = ["GROUP_CANDIDATES", "SlideTable", "read_slide_table"]

GROUP_CANDIDATES = ("case_id", "patient_id", "patient", "case")


@dataclass
class SlideTable:
    """The labelled slides of one task.

    Attributes:
        task: The label column.
        slide_ids: Slides with a label and a feature file, in table order.
        labels: Class index of each slide.
        class_names: Class names in index order.
        groups: Patient of each slide (None without a patient column).
        group_column: The patient column used.
        paths: Slide id -> feature file.
        label_map: Raw table value -> class index.
        n_unlabelled: Rows without a label for this task (empty cell, or a value outside ``label_map``).
        missing: Labelled slides left out for lack of a feature file (``skip_missing``).
    """

    task: str
    slide_ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray | None
    group_column: str | None
    paths: dict[str, Path]
    label_map: dict[str, int]
    n_unlabelled: int = 0
    missing: list[str] | None = None

    def digest(self) -> str:
        """SHA-256 of the (slide, class, patient) triples: changes when the labelled data change."""
        groups = self.groups if self.groups is not None else [""] * len(self.slide_ids)
        lines = sorted(
            f"{s}\t{self.class_names[y]}\t{g}" for s, y, g in zip(self.slide_ids, self.labels, groups)
        )
        return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()

    def label_of(self) -> dict[str, int]:
        """Slide id -> class index."""
        return dict(zip(self.slide_ids, self.labels.tolist()))


def _sort_classes(values: Sequence[str]) -> list[str]:
    def as_number(v: str) -> float | None:
        try:
            return float(v)
        except ValueError:
            return None

    if all(as_number(v) is not None for v in values):
        return sorted(values, key=lambda v: (as_number(v), v))
    return sorted(values)


def read_slide_table(
    slides: PathLike | pd.DataFrame,
    task: str,
    *,
    features_dir: PathLike,
    classes: Sequence[str] | None = None,
    label_map: Mapping[str, str] | None = None,
    slide_column: str = SLIDE_ID,
    group_column: str | None = "auto",
    skip_missing: bool = False,
) -> SlideTable:
    """Read the labelled slides of a task and find their feature files.

    Args:
        slides: CSV/TSV path or DataFrame with ``slide_column``, the ``task`` column and optionally a patient column.
            Values are read as text (``1`` and ``"1"`` are the same class); empty cells are unlabelled.
        task: Label column.
        features_dir: Folder of feature files.
        classes: Class order (default: sorted values).
        label_map: Raw value -> class name; values not in it are left out of the task.
        slide_column: Slide id column.
        group_column: Patient column, ``"auto"`` (first of case_id/patient_id/patient/case present) or None.
        skip_missing: Leave out slides without a feature file (warning) instead of raising.

    Returns:
        The table.

    Raises:
        MsfmInputError: Missing columns, repeated slide ids, fewer than two classes, labels outside ``classes``,
            missing feature files (the error lists the first 10 ids, the count and the folder searched).
    """
    df = as_table(slides, "slide table")
    cols = list(df.columns)
    for col, what in ((slide_column, "slide ids"), (task, "labels of the task")):
        if col not in df.columns:
            msg = f"The slide table has no column {col!r} ({what}); its columns are {cols[:30]}."
            raise MsfmInputError(msg)
    ids = [value_text(v) or "" for v in df[slide_column].tolist()]
    if any(not s for s in ids):
        msg = f"{sum(not s for s in ids)} rows have an empty {slide_column!r}; every row needs a slide id."
        raise MsfmInputError(msg)
    ids = [check_slide_id(s, f"slide table, row {i}") for i, s in enumerate(ids)]
    seen: set[str] = set()
    dup = sorted({s for s in ids if s in seen or seen.add(s)})
    if dup:
        msg = f"Slide ids repeat in the table: {dup[:10]}. Each slide must appear once."
        raise MsfmInputError(msg)
    if group_column == "auto":
        group_column = next((c for c in GROUP_CANDIDATES if c in df.columns), None)
    elif group_column is not None and group_column not in df.columns:
        msg = f"Patient column {group_column!r} is not in the slide table (columns {cols[:30]})."
        raise MsfmInputError(msg)

    raw = [value_text(v) for v in df[task].tolist()]
    names = raw
    if label_map:
        lm = {str(k): str(v) for k, v in label_map.items()}
        dropped = sorted({r for r in raw if r is not None and r not in lm})
        if dropped:
            logger.info("task %s: values %s are not in label_map and are left out", task, dropped[:20])
        names = [lm.get(r) if r is not None else None for r in raw]
    present = sorted({n for n in names if n is not None})
    if classes is not None:
        class_names = [str(c) for c in classes]
        unknown = sorted(set(present) - set(class_names))
        if unknown:
            msg = (
                f"Column {task!r} holds values {unknown[:10]} that are not among classes={class_names}. Add them "
                "to the classes, or map them with a label map (e.g. --label-map '3=tumour')."
            )
            raise MsfmInputError(msg)
    else:
        class_names = _sort_classes(present)
    if len(class_names) < 2:
        msg = (
            f"Column {task!r} has {len(class_names)} class(es) {class_names} among its labelled slides; a "
            "classifier needs at least two."
        )
        raise MsfmInputError(msg)
    index = {c: i for i, c in enumerate(class_names)}
    keep = [i for i, n in enumerate(names) if n is not None]
    labelled = [ids[i] for i in keep]
    paths, missing = resolve_feature_files(labelled, features_dir, skip_missing=skip_missing)
    keep = [i for i in keep if ids[i] in paths]
    if len(keep) < 2:
        msg = f"Only {len(keep)} labelled slide(s) with features for task {task!r}; training needs more."
        raise MsfmInputError(msg)
    groups = None
    if group_column is not None:
        gvals = [value_text(v) for v in df[group_column].tolist()]
        # A slide without a patient id is its own patient.
        groups = np.array(
            [gvals[i] if gvals[i] is not None else f"__slide__{ids[i]}" for i in keep], dtype=object
        )
    raw_to_index = {}
    for r, n in zip(raw, names):
        if r is not None and n is not None:
            raw_to_index[r] = index[n]
    table = SlideTable(
        task=task,
        slide_ids=[ids[i] for i in keep],
        labels=np.array([index[names[i]] for i in keep], dtype=np.int64),
        class_names=class_names,
        groups=groups,
        group_column=group_column,
        paths={ids[i]: paths[ids[i]] for i in keep},
        label_map=raw_to_index,
        n_unlabelled=len(ids) - len(labelled),
        missing=missing,
    )
    counts = np.bincount(table.labels, minlength=len(class_names))
    logger.info(
        "task %s: %d slides (%s), %d unlabelled, %d without features%s",
        task,
        len(table.slide_ids),
        ", ".join(f"{c}: {n}" for c, n in zip(class_names, counts)),
        table.n_unlabelled,
        len(missing),
        f", grouped by {group_column!r}" if group_column else "",
    )
    return table
