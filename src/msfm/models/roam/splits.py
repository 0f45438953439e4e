"""Cross-validation splits of a ROAM run: stratified (patient-grouped) K folds with an optional held-out test set,
written as ``RUN/splits/fold{k}.csv`` and read back (also CLAM's ``splits_{k}.csv``)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msfm.errors import MsfmInputError
from msfm.models.roam.slide_table import SlideTable
from msfm.models.roam.tables import SLIDE_ID, read_table
from msfm.runtime.atomic import atomic_write_text

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = ["make_splits", "read_splits", "split_files", "write_splits"]


def make_splits(
    slide_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    folds: int = 5,
    test_frac: float = 0.0,
    seed: int = 1,
) -> list[pd.DataFrame]:
    """Stratified K-fold splits (patient-grouped when ``groups`` is given) with an optional held-out test set.

    The test set (about ``test_frac`` of the slides; with groups, of the patients) is drawn first, stratified,
    and is the same in every fold; the rest is split into ``folds`` train/validation folds
    (``StratifiedKFold``, or ``StratifiedGroupKFold`` so that no patient is in two parts).

    Args:
        slide_ids: Slide ids.
        labels: Class index per slide.
        groups: Patient per slide, or None.
        folds: Number of folds (>= 2).
        test_frac: Test fraction in [0, 0.9).
        seed: Shuffling seed.

    Returns:
        One DataFrame per fold with ``slide_id`` and ``split`` (``train``/``val``/``test``), in input order.

    Raises:
        MsfmInputError: Too few slides or patients for the requested folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

    ids = np.asarray(list(slide_ids), dtype=object)
    y = np.asarray(labels, dtype=np.int64)
    g = None if groups is None else np.asarray(groups, dtype=object)
    n = ids.shape[0]
    idx = np.arange(n)
    test = np.zeros(n, dtype=bool)
    with warnings.catch_warnings():
        # "The least populated class has only 1 member": expected for rare classes; the fold just lacks it.
        warnings.simplefilter("ignore", UserWarning)
        if test_frac > 0:
            if g is not None:
                n_splits = max(2, round(1.0 / test_frac))
                if np.unique(g).size < n_splits:
                    msg = f"{np.unique(g).size} patients are too few to hold out a test fraction of {test_frac}."
                    raise MsfmInputError(msg)
                sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                _, test_idx = next(sgkf.split(idx, y, g))
            else:
                try:
                    _, test_idx = train_test_split(idx, test_size=test_frac, stratify=y, random_state=seed)
                except ValueError:  # a class with one slide cannot be stratified
                    _, test_idx = train_test_split(idx, test_size=test_frac, random_state=seed)
            test[test_idx] = True
        rest = idx[~test]
        units = rest.size if g is None else np.unique(g[rest]).size
        if units < folds:
            what = "slides" if g is None else "patients"
            msg = (
                f"{units} {what} remain for cross-validation, fewer than folds={folds}. Use fewer folds or a "
                "smaller test fraction."
            )
            raise MsfmInputError(msg)
        if g is None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = splitter.split(rest, y[rest])
        else:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = splitter.split(rest, y[rest], g[rest])
        out = []
        for _, val_pos in parts:
            split = np.where(test, "test", "train").astype(object)
            split[rest[val_pos]] = "val"
            out.append(pd.DataFrame({SLIDE_ID: ids, "split": split}))
    return out


def write_splits(
    splits: Sequence[pd.DataFrame], folder: PathLike, *, table: SlideTable | None = None
) -> Path:
    """Write ``fold{k}.csv`` files (``slide_id, split[, label]``) atomically.

    Returns:
        The folder.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for k, df in enumerate(splits):
        out = df[[SLIDE_ID, "split"]].copy()
        if table is not None:
            lab = table.label_of()
            out["label"] = [table.class_names[lab[s]] if s in lab else "" for s in out[SLIDE_ID]]
        atomic_write_text(root / f"fold{k}.csv", out.to_csv(index=False))
    return root


def split_files(folder: Path) -> list[Path]:
    files = []
    for p in folder.glob("*.csv"):
        stem = p.stem
        for prefix in ("fold", "splits_", "split_", "split"):
            if stem.startswith(prefix) and stem[len(prefix) :].isdigit():
                files.append((int(stem[len(prefix) :]), p))
                break
    files.sort()
    return [p for _, p in files]


def read_splits(folder: PathLike, table: SlideTable, *, skip_missing: bool = False) -> list[pd.DataFrame]:
    """Read split files: ``fold{k}.csv`` with ``slide_id, split`` columns, or CLAM's ``splits_{k}.csv`` with
    ``train, val, test`` columns of slide ids.

    Args:
        folder: Folder with the files.
        table: The slide table (labels come from it, not from the files).
        skip_missing: Drop listed slides that are not in the table (warning) instead of raising.

    Returns:
        One DataFrame per fold (``slide_id``, ``split``), restricted to slides of the table.

    Raises:
        MsfmInputError: No split files, unknown slide ids, a slide in two parts of a fold, or a fold without
            training or validation slides.
    """
    root = Path(folder)
    files = split_files(root) if root.is_dir() else []
    if not files:
        msg = f"No split files in {root}; expected fold0.csv, fold1.csv, ... (slide_id, split) or CLAM splits_0.csv ..."
        raise MsfmInputError(msg)
    known = set(table.slide_ids)
    out = []
    for f in files:
        df = read_table(f)
        if SLIDE_ID in df.columns and "split" in df.columns:
            long = df[[SLIDE_ID, "split"]].dropna()
        elif {"train", "val"} <= set(df.columns):
            parts = [
                pd.DataFrame({SLIDE_ID: df[c].dropna().astype(str).str.strip(), "split": c})
                for c in ("train", "val", "test")
                if c in df.columns
            ]
            long = pd.concat(parts, ignore_index=True)
        else:
            msg = f"Split file {f} needs columns slide_id and split, or train, val[, test]; got {list(df.columns)}."
            raise MsfmInputError(msg)
        long = long.assign(
            split=long["split"].str.strip().str.lower(), **{SLIDE_ID: long[SLIDE_ID].str.strip()}
        )
        bad_split = sorted(set(long["split"]) - {"train", "val", "test"})
        if bad_split:
            msg = f"Split file {f} has split values {bad_split}; expected train, val or test."
            raise MsfmInputError(msg)
        dup = long[SLIDE_ID][long[SLIDE_ID].duplicated()].tolist()
        if dup:
            msg = f"Split file {f} lists slides more than once (e.g. in train and val): {dup[:10]}."
            raise MsfmInputError(msg)
        unknown = [s for s in long[SLIDE_ID] if s not in known]
        if unknown:
            text = (
                f"Split file {f} lists {len(unknown)} slide(s) that are not labelled slides with features of task "
                f"{table.task!r}: {unknown[:10]}"
            )
            if not skip_missing:
                msg = text + ". Fix the split files or the table, or pass --skip-missing to leave them out."
                raise MsfmInputError(msg)
            logger.warning("%s; they are left out", text)
            long = long[long[SLIDE_ID].isin(known)]
        for part in ("train", "val"):
            if not (long["split"] == part).any():
                msg = f"Split file {f} has no {part} slides (after leaving out unknown ones)."
                raise MsfmInputError(msg)
        out.append(long.reset_index(drop=True))
    unused = known - set().union(*(set(d[SLIDE_ID]) for d in out))
    if unused:
        logger.warning(
            "%d labelled slides are in no split file and are not used: %s", len(unused), sorted(unused)[:10]
        )
    return out
