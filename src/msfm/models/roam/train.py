"""ROAM slide-classifier training with K-fold cross-validation, through the shared Lightning engine.

``train(slides, features, out, config)`` reads a slide table (``slide_id``, an optional patient column, one
column per task), finds each slide's feature file, splits the labelled slides into stratified (and, with a
patient column, patient-grouped) folds with an optional held-out test set, and trains one model per fold the way
the released ROAM does (see ``RoamTrainConfig`` for every setting):

* loss ``CE(slide logits) + roi_weight * top-k instance CE``, averaged over the slides of a batch of 4 (the
  reference's "sum of 4 per-slide losses / 4"; slides are padded into one batch, the model skips the padding);
* ROI dropout (keep a random 80% of the ROIs of a slide with >= 16 of them) and a class-balanced sampler
  (weight ``N / N_class`` per slide of the training fold, drawn with replacement);
* AdamW (lr 2e-4, weight decay 1e-5), linear warm-up over 5 epochs, then constant;
* up to 200 epochs; the model with the lowest validation loss from epoch 5 on is kept; training stops when more
  than 20 epochs pass without improvement once epoch 20 is reached (epochs count from 0).

Run directory::

    RUN/
      run.json                 # config, classes, label mapping, encoder, table digest (resume guard)
      splits/fold{k}.csv       # slide_id, split (train|val|test), label; reused when present
      fold{k}/checkpoints/last.ckpt, fold{k}/metrics.csv, fold{k}/config.json   # engine contract
      fold{k}/best/            # msfm ROAM checkpoint of the fold's best epoch (class names, task, encoder)
      fold{k}/predictions.csv  # the best model's val (and test) probabilities
      fold{k}/done.json        # written last: the fold is finished and is skipped on resume
      oof_predictions.csv      # out-of-fold (validation) predictions of every fold
      test_predictions.csv     # test slides: mean softmax over the folds (ensemble)
      metrics.json, fold_metrics.csv, confusion_oof.png, confusion_test.png

Repeating the same call after a crash or a kill resumes: finished folds are skipped and the running fold
continues from its ``last.ckpt`` (written at every epoch end) with the same data order, ROI subsets and dropout
draws as an uninterrupted run. A different config for an existing run directory is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from msfm.data.slide_ids import check_slide_id
from msfm.engine.objective import LossOutput
from msfm.errors import MsfmInputError
from msfm.models.roam.predict import (
    BEST_DIR,
    DONE_FILE,
    SLIDE_ID,
    FeatureStore,
    predict_probabilities,
    prob_column,
    read_table,
    resolve_feature_files,
)
from msfm.runtime.atomic import atomic_write_json, atomic_write_text
from msfm.runtime.config import read_config_file as _read_config_file

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "BalancedEpochSampler",
    "RoamRunResult",
    "RoamTrainConfig",
    "SlideBagDataset",
    "SlideTable",
    "collate_slides",
    "make_splits",
    "parse_devices",
    "parse_label_map",
    "read_config_file",
    "read_slide_table",
    "read_splits",
    "roam_objective",
    "sample_weights",
    "train",
    "trainer_options",
    "write_splits",
]

RUN_FILE = "run.json"
SPLITS_DIR = "splits"
FOLD_PREDICTIONS = "predictions.csv"
GROUP_CANDIDATES = ("case_id", "patient_id", "patient", "case")
#: Settings that may change between a run and its resumption (hardware, speed, verbosity).
RUNTIME_FIELDS = frozenset(
    {
        "accelerator",
        "devices",
        "strategy",
        "num_nodes",
        "precision",
        "num_workers",
        "progress_bar",
        "cache_gb",
        "roi_chunk",
        "skip_missing",
        "checkpoint_every_n_epochs",
    }
)


class RoamTrainConfig(BaseModel):
    """Every setting of a ROAM training run (stored in ``RUN/run.json``); defaults follow the released code.

    Epochs are counted from 0 (the first epoch is epoch 0).
    """

    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., min_length=1, description="Column of the slide table holding the labels.")
    classes: list[str] | None = Field(
        None,
        description="Class names in logit order (default: sorted label values; numbers sort numerically).",
    )
    label_map: dict[str, str] | None = Field(
        None,
        description=(
            "Raw table value -> class name (e.g. {'2': 'tumour', '3': 'tumour'}); values not in the map are left "
            "out of the task."
        ),
    )
    slide_column: str = Field(SLIDE_ID, description="Column with the slide ids (feature file <id>.h5).")
    group_column: str | None = Field(
        "auto",
        description=(
            "Patient column for grouped splits: 'auto' uses the first of case_id/patient_id/patient/case that "
            "exists, None disables grouping."
        ),
    )
    model: str = Field("roam-subtyping", description="Model preset (msfm.registry), e.g. roam-tiny.")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="RoamConfig fields to change.")
    init_from: str | None = Field(
        None,
        description="Start from this msfm ROAM checkpoint (heads whose shape differs are re-initialised).",
    )
    folds: int = Field(5, ge=2, description="Cross-validation folds.")
    test_frac: float = Field(
        0.0, ge=0.0, lt=0.9, description="Fraction of slides (patients) held out for test."
    )
    seed: int = Field(1, ge=0, description="Seeds splits, model init, sampling, ROI dropout and dropout.")
    batch_size: int = Field(4, ge=1, description="Slides per optimiser step (the loss is their mean).")
    roi_weight: float = Field(1.0, ge=0.0, description="Weight of the top-k instance loss.")
    roi_keep_fraction: float = Field(0.8, gt=0.0, le=1.0, description="ROI dropout: fraction of ROIs kept.")
    roi_dropout_min: int = Field(
        16, ge=1, description="ROI dropout applies to slides with at least this many ROIs."
    )
    max_train_rois: int | None = Field(
        None, ge=1, description="Cap on ROIs per training slide (random subset)."
    )
    balanced_sampling: bool = Field(
        True, description="Class-balanced sampling with replacement (N / N_class)."
    )
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    warmup_epochs: int = Field(5, ge=0, description="Linear learning-rate warm-up, then constant.")
    max_epochs: int = Field(200, ge=1)
    best_from_epoch: int = Field(
        5, ge=0, description="Only epochs >= this are candidates for the best model."
    )
    early_stopping: bool = True
    patience: int = Field(
        20, ge=0, description="Stop when more than this many epochs pass without improvement ..."
    )
    stop_epoch: int = Field(20, ge=0, description="... and the epoch is at least this.")
    gradient_clip: float | None = Field(
        None, gt=0.0, description="Gradient-norm clip (the release uses none)."
    )
    accelerator: str = "auto"
    devices: Literal["auto"] | int | list[int] = "auto"
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: str = "32-true"
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes reading feature files.")
    cache_gb: float = Field(
        4.0, ge=0.0, description="Keep slide features in memory up to this many GiB (per DataLoader worker)."
    )
    roi_chunk: int | None = Field(
        None, ge=1, description="Encode at most this many ROIs at once when predicting."
    )
    checkpoint_every_n_epochs: int = Field(
        1, ge=1, description="How often last.ckpt is written (resume point)."
    )
    progress_bar: bool = True
    skip_missing: bool = Field(
        False, description="Leave out slides without a feature file instead of failing."
    )

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            msg = f"classes must list at least two distinct names; got {value}."
            raise ValueError(msg)
        return value

    @classmethod
    def from_file(cls, path: PathLike) -> RoamTrainConfig:
        """Read a YAML or JSON file with these fields.

        Raises:
            MsfmInputError: If the file is missing or invalid.
        """
        return cls.parse(read_config_file(path))

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> RoamTrainConfig:
        """Validate a mapping, turning pydantic errors into :class:`MsfmInputError`."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            msg = f"Invalid ROAM training settings: {err}"
            raise MsfmInputError(msg) from err

    def with_overrides(self, overrides: Mapping[str, Any]) -> RoamTrainConfig:
        """A copy with some fields replaced (None values are ignored)."""
        data = self.model_dump()
        unknown = sorted(set(overrides) - set(data))
        if unknown:
            msg = f"Unknown ROAM training setting(s) {unknown}; known: {sorted(data)}."
            raise MsfmInputError(msg)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return self.parse(data)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that define the run (everything but hardware and speed options)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}


def read_config_file(path: PathLike) -> dict[str, Any]:
    """The mapping in a YAML/JSON settings file, not yet validated (the command line adds fields such as ``task``).

    Raises:
        MsfmInputError: If the file is missing, unparsable or not a mapping.
    """
    return _read_config_file(path, what="RoamTrainConfig")


# ---------------------------------------------------------------------------------------------------------------
# Slide table
# ---------------------------------------------------------------------------------------------------------------


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


def _value_text(value: Any) -> str | None:
    """A table cell as label text: None for empty/NaN, integral floats without '.0' (pandas int columns with gaps)."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def _sort_classes(values: Sequence[str]) -> list[str]:
    def as_number(v: str) -> float | None:
        try:
            return float(v)
        except ValueError:
            return None

    if all(as_number(v) is not None for v in values):
        return sorted(values, key=lambda v: (as_number(v), v))
    return sorted(values)


def parse_label_map(text: str) -> dict[str, str]:
    """Parse ``"0=normal,1=gliosis,2=tumour,3=tumour"`` (raw value = class name).

    Raises:
        MsfmInputError: On a part without ``=``.
    """
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            msg = f"--label-map {text!r}: expected VALUE=CLASS pairs separated by commas, e.g. '2=tumour,3=tumour'."
            raise MsfmInputError(msg)
        raw, name = (s.strip() for s in part.split("=", 1))
        out[raw] = name
    return out


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
    df = read_table(Path(slides)) if isinstance(slides, str | os.PathLike) else slides.copy()
    cols = list(df.columns)
    for col, what in ((slide_column, "slide ids"), (task, "labels of the task")):
        if col not in df.columns:
            msg = f"The slide table has no column {col!r} ({what}); its columns are {cols[:30]}."
            raise MsfmInputError(msg)
    ids = [_value_text(v) or "" for v in df[slide_column].tolist()]
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

    raw = [_value_text(v) for v in df[task].tolist()]
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
        gvals = [_value_text(v) for v in df[group_column].tolist()]
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


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------


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


def _split_files(folder: Path) -> list[Path]:
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
    files = _split_files(root) if root.is_dir() else []
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


# ---------------------------------------------------------------------------------------------------------------
# Data: sampler, dataset, collate, objective
# ---------------------------------------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A 63-bit seed from several non-negative integers (independent streams per (seed, fold, epoch, ...))."""
    return int(
        np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
        >> 1
    )


def sample_weights(labels: Sequence[int] | np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Per-slide sampling weights ``N / N_class`` (the class-balanced sampler of ROAM and CLAM).

    Shape:
        labels: ``[N]`` -> float64 ``[N]``.
    """
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=n_classes or 0).astype(np.float64)
    return y.shape[0] / counts[y]


class BalancedEpochSampler(torch.utils.data.Sampler):
    """Draws ``N`` training slides per epoch, class-balanced with replacement (or a plain shuffle).

    The draw of epoch ``e`` depends only on ``(seed, e)`` (Lightning calls :meth:`set_epoch`), so a resumed run
    sees the same slides in the same order. Under DDP each rank takes every ``world``-th position. Items are
    ``(index, epoch, position)`` tuples: the dataset derives the ROI-dropout subset from them.

    Args:
        labels: Class index of each training slide.
        seed: Base seed.
        balanced: Weights ``N / N_class`` with replacement; False: a permutation.
        num_replicas: Ranks (None: from ``torch.distributed`` when initialised, else 1).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        seed: int,
        balanced: bool = True,
        num_replicas: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.weights = torch.as_tensor(sample_weights(self.labels), dtype=torch.float64)
        self.seed = int(seed)
        self.balanced = balanced
        self.num_replicas = num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of an epoch."""
        self.epoch = int(epoch)

    def _world(self) -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return (self.num_replicas or 1), 0

    def __len__(self) -> int:
        world = self.num_replicas or self._world()[0]
        return math.ceil(self.labels.shape[0] / world)

    def __iter__(self):
        n = self.labels.shape[0]
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        if self.balanced:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        world, rank = self._world()
        total = math.ceil(n / world) * world
        for pos in range(rank, total, world):
            yield int(order[pos % n]), self.epoch, pos


class SlideBagDataset(torch.utils.data.Dataset):
    """One item per slide: its ROI features, label and id; training items get ROI dropout.

    Args:
        store: Feature store.
        slide_ids: Slides.
        labels: Class index per slide.
        train: Apply ROI dropout / the ROI cap (deterministic in ``(seed, epoch, position)``).
        keep_fraction: Fraction of ROIs kept by ROI dropout.
        min_rois: ROI dropout applies from this many ROIs.
        max_rois: Cap on ROIs per item (random subset).
        seed: Base seed.
    """

    def __init__(
        self,
        store: FeatureStore,
        slide_ids: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        *,
        train: bool = False,
        keep_fraction: float = 1.0,
        min_rois: int = 16,
        max_rois: int | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.slide_ids = list(slide_ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.train = train
        self.keep_fraction = keep_fraction
        self.min_rois = min_rois
        self.max_rois = max_rois
        self.seed = seed

    def __len__(self) -> int:
        return len(self.slide_ids)

    def n_kept(self, n: int) -> int:
        """ROIs a training item keeps out of ``n``."""
        keep = n
        if self.keep_fraction < 1.0 and n >= self.min_rois:
            keep = max(1, int(n * self.keep_fraction))
        if self.max_rois is not None:
            keep = min(keep, self.max_rois)
        return keep

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, Any]:
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        sid = self.slide_ids[index]
        feats = self.store.get(sid)
        if self.train:
            n = feats.shape[0]
            keep = self.n_kept(n)
            if keep < n:
                rng = np.random.default_rng([self.seed, epoch, position])
                feats = feats[np.sort(rng.choice(n, keep, replace=False))]
        return {"features": torch.from_numpy(feats), "label": int(self.labels[index]), "slide_id": sid}


def collate_slides(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pad slides to the largest ROI count of the batch.

    Returns:
        ``features`` float ``[B, K, 84, d]`` (zeros on padding), ``roi_mask`` bool ``[B, K]``, ``labels`` long
        ``[B]``, ``slide_ids`` list of str.
    """
    k = max(int(it["features"].shape[0]) for it in items)
    first = items[0]["features"]
    feats = first.new_zeros((len(items), k, *first.shape[1:]))
    mask = torch.zeros(len(items), k, dtype=torch.bool)
    for i, it in enumerate(items):
        n = int(it["features"].shape[0])
        feats[i, :n] = it["features"]
        mask[i, :n] = True
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    return {
        "features": feats,
        "roi_mask": mask,
        "labels": labels,
        "slide_ids": [it["slide_id"] for it in items],
    }


def roam_objective(
    model: torch.nn.Module, batch: Mapping[str, Any], *, roi_weight: float = 1.0
) -> LossOutput:
    """ROAM's loss on a batch of slides.

    Training: ``mean_b CE(logits_b, y_b) + roi_weight * mean_b instance_loss_b`` (the reference's sum over the
    slides of a batch divided by the batch size). Evaluation (the validation loss used to pick the best epoch):
    the slide CE only.

    Args:
        model: A :class:`msfm.models.roam.Roam`.
        batch: Output of :func:`collate_slides`.
        roi_weight: Weight of the instance loss.

    Returns:
        The loss with components ``slide_ce``, ``instance`` (training) and ``acc``.
    """
    labels = batch["labels"]
    use_instance = model.training and roi_weight > 0
    out = model(batch["features"], batch["roi_mask"], labels=labels if use_instance else None)
    logits = out.logits.float()
    ce = F.cross_entropy(logits, labels)
    loss = ce
    components: dict[str, torch.Tensor] = {
        "slide_ce": ce.detach(),
        "acc": (logits.argmax(-1) == labels).float().mean().detach(),
    }
    if use_instance and out.instance_loss is not None:
        inst = out.instance_loss.float()
        loss = ce + roi_weight * inst
        components["instance"] = inst.detach()
    return LossOutput(loss=loss, components=components, n=int(labels.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# Best-epoch tracking, early stopping, per-epoch resume checkpoints
# ---------------------------------------------------------------------------------------------------------------


class _FoldMonitor(Callback):
    """Keeps the best-validation-loss model, stops early, and writes ``last.ckpt`` at epoch ends.

    Its state (best loss and epoch, epochs without improvement, whether training stopped) travels in the
    Lightning checkpoint, so a resumed fold continues the same bookkeeping.
    """

    def __init__(
        self,
        *,
        export: Callable[[torch.nn.Module, int, float], None],
        ckpt_path: Path,
        best_from_epoch: int,
        early_stopping: bool,
        patience: int,
        stop_epoch: int,
        max_epochs: int,
        every_n_epochs: int,
    ) -> None:
        super().__init__()
        self.export = export
        self.ckpt_path = ckpt_path
        # A run shorter than best_from_epoch still gets a best model: its last epoch.
        self.best_from_epoch = min(best_from_epoch, max_epochs - 1)
        self.early_stopping = early_stopping
        self.patience = patience
        self.stop_epoch = stop_epoch
        self.every_n_epochs = every_n_epochs
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped = False
        self.epochs_done = 0
        self.val_losses: list[float] = []

    @property
    def state_key(self) -> str:
        return "msfm_roam_fold_monitor"

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": float(self.best_loss),
            "best_epoch": int(self.best_epoch),
            "bad_epochs": int(self.bad_epochs),
            "stopped": bool(self.stopped),
            "epochs_done": int(self.epochs_done),
            "val_losses": [float(v) for v in self.val_losses],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_loss = float(state_dict["best_loss"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.bad_epochs = int(state_dict["bad_epochs"])
        self.stopped = bool(state_dict["stopped"])
        self.epochs_done = int(state_dict.get("epochs_done", 0))
        self.val_losses = [float(v) for v in state_dict.get("val_losses", [])]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Resuming a fold that had already stopped early: nothing more to train.
        if self.stopped:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch)
        value = trainer.callback_metrics.get("val/loss")
        loss = float(value) if value is not None else math.nan
        self.val_losses.append(loss)
        self.epochs_done = epoch + 1
        if epoch >= self.best_from_epoch:
            if loss < self.best_loss:  # NaN never improves
                self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
                if trainer.is_global_zero:
                    self.export(pl_module.model, epoch, loss)
            else:
                self.bad_epochs += 1
        if self.early_stopping and self.bad_epochs > self.patience and epoch >= self.stop_epoch:
            logger.info(
                "early stop at epoch %d (best %.4f at epoch %d)", epoch, self.best_loss, self.best_epoch
            )
            self.stopped = True
            trainer.should_stop = True
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs == 0 or self.stopped or last:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)


# ---------------------------------------------------------------------------------------------------------------
# Training driver
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RoamRunResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: The run directory.
        metrics: Contents of ``metrics.json``.
        oof: Out-of-fold validation predictions.
        test: Ensemble test predictions (None without a test set).
        checkpoints: ``fold*/best`` checkpoint directories.
        class_names: Class names in logit order.
    """

    run_dir: Path
    metrics: dict[str, Any]
    oof: pd.DataFrame
    test: pd.DataFrame | None
    checkpoints: list[Path]
    class_names: list[str]


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _scan_features(table: SlideTable) -> tuple[str | None, int]:
    """Check every feature file's header (encoder, dimension, ROI count) before any training starts."""
    from msfm.models.roam.features import read_feature_attrs

    encoders: dict[str, list[str]] = {}
    dims: dict[int, list[str]] = {}
    empty: list[str] = []
    for sid in table.slide_ids:
        attrs = read_feature_attrs(table.paths[sid])
        if not attrs.get("n_roi"):
            empty.append(sid)
            continue
        dims.setdefault(int(attrs["feature_dim"]), []).append(sid)
        enc = attrs.get("encoder")
        if enc and enc != "unknown":
            encoders.setdefault(str(enc), []).append(sid)
    if empty:
        msg = (
            f"{len(empty)} feature file(s) hold no ROI features of shape [n >= 1, 84, d]: {empty[:10]}. Leave these "
            "slides out of the table (no tissue was found) or re-run `msfm roam preprocess` for them."
        )
        raise MsfmInputError(msg)
    if len(encoders) > 1 or len(dims) > 1:
        enc_txt = {k: v[:3] for k, v in encoders.items()}
        dim_txt = {k: v[:3] for k, v in dims.items()}
        msg = (
            f"The feature files come from different encoders/dimensions (encoders {enc_txt}, dims {dim_txt}). All "
            "slides of a task must be embedded by the same encoder; re-extract the odd ones."
        )
        raise MsfmInputError(msg)
    return (next(iter(encoders)) if encoders else None), (next(iter(dims)) if dims else 0)


def _prepare_run_dir(out: Path, record: dict[str, Any], *, overwrite: bool) -> bool:
    """Create or check the run directory; returns True when resuming an existing run."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{run_file} is unreadable ({err}); remove the run directory or pass another --out."
            raise MsfmInputError(msg) from err
        keys = ("config", "task", "classes", "table_digest", "encoder", "feature_dim")
        diff = [k for k in keys if old.get(k) != record.get(k)]
        if not diff:
            logger.info("resuming the run in %s", out)
            return True
        details = []
        for k in diff:
            if k == "config":
                a, b = old.get("config") or {}, record["config"]
                changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
                details.append(f"config fields {changed}")
            else:
                details.append(f"{k} ({old.get(k)!r} -> {record.get(k)!r})")
        if not overwrite:
            msg = (
                f"{out} holds a ROAM run with different settings: {'; '.join(details)}. Repeat the original command "
                "to resume it, choose another --out, or pass --overwrite to discard that run."
            )
            raise MsfmInputError(msg)
        logger.warning("discarding the run in %s (--overwrite): %s", out, "; ".join(details))
        shutil.rmtree(out)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        msg = (
            f"--out {out} exists and is not a ROAM run directory (no {RUN_FILE}). Choose a new or empty folder; "
            "msfm does not delete folders it did not create."
        )
        raise MsfmInputError(msg)
    out.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        atomic_write_json(run_file, record)
    return False


def _load_or_make_splits(
    out: Path, table: SlideTable, config: RoamTrainConfig, splits: PathLike | None
) -> list[pd.DataFrame]:
    own = out / SPLITS_DIR
    if _split_files(own) if own.is_dir() else []:
        folds = read_splits(own, table, skip_missing=config.skip_missing)
        if splits is not None:
            given = read_splits(Path(splits), table, skip_missing=config.skip_missing)
            same = len(given) == len(folds) and all(
                a.sort_values(SLIDE_ID)
                .reset_index(drop=True)
                .equals(b.sort_values(SLIDE_ID).reset_index(drop=True))
                for a, b in zip(given, folds)
            )
            if not same:
                msg = f"--splits {splits} differ from the splits this run already uses ({own}); use a new --out."
                raise MsfmInputError(msg)
        logger.info("using the %d existing split files in %s", len(folds), own)
        return folds
    if splits is not None:
        folds = read_splits(Path(splits), table, skip_missing=config.skip_missing)
        logger.info("using %d user-provided folds from %s", len(folds), splits)
    else:
        folds = make_splits(
            table.slide_ids,
            table.labels,
            table.groups,
            folds=config.folds,
            test_frac=config.test_frac,
            seed=config.seed,
        )
    if _is_rank_zero():
        write_splits(folds, own, table=table)
    return folds


def _build_model(config: RoamTrainConfig, table: SlideTable, d_in: int, seed: int) -> Any:
    from msfm.models.roam.checkpoint import load_model
    from msfm.models.roam.config import RoamConfig
    from msfm.models.roam.model import Roam
    from msfm.registry import preset_config

    fixed = {"d_in": d_in, "n_classes": len(table.class_names), "class_names": tuple(table.class_names)}
    clash = {k: v for k, v in config.model_overrides.items() if k in fixed and v != fixed[k]}
    if clash:
        msg = f"model_overrides {clash} contradict the data (features are {d_in}-d, {fixed['n_classes']} classes)."
        raise MsfmInputError(msg)
    torch.manual_seed(seed)
    if config.init_from is None:
        return Roam(preset_config(config.model, family="roam", **{**config.model_overrides, **fixed}))
    base, _ = load_model(config.init_from)
    if base.config.d_in != d_in:
        msg = (
            f"init_from {config.init_from} expects {base.config.d_in}-d features but the feature files are {d_in}-d "
            "(another encoder). Use features from the checkpoint's encoder."
        )
        raise MsfmInputError(msg)
    allowed = {"dropout", "mil_dropout", "emb_dropout", "topk"}
    bad = sorted(set(config.model_overrides) - allowed - set(fixed))
    if bad:
        msg = f"With init_from, model_overrides may only change {sorted(allowed)}; got {bad}."
        raise MsfmInputError(msg)
    try:
        cfg = RoamConfig(**{**base.config.model_dump(), **config.model_overrides, **fixed})
    except ValidationError as err:
        msg = f"Invalid model settings with init_from: {err}"
        raise MsfmInputError(msg) from err
    model = Roam(cfg)
    own = model.state_dict()
    loaded = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    fresh = sorted(set(own) - set(loaded))
    model.load_state_dict(loaded, strict=False)
    if fresh:
        logger.info("init_from: %d tensors re-initialised (new class count): %s", len(fresh), fresh[:8])
    return model


def parse_devices(value: Any) -> Any:
    """``"2"`` -> 2, ``"0,1"`` -> [0, 1]; other values unchanged (command-line device lists)."""
    if isinstance(value, str) and value != "auto":
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        if value.lstrip("-").isdigit():
            return int(value)
    return value


def trainer_options(config: RoamTrainConfig, *, seed: int = 0) -> Any:
    """The engine's :class:`~msfm.engine.trainer.TrainerOptions` for a fold of this run.

    Raises:
        MsfmInputError: If the hardware settings (accelerator, devices, strategy, precision) are invalid.
    """
    from msfm.engine.trainer import TrainerOptions

    try:
        return TrainerOptions(
            accelerator=config.accelerator,
            devices=parse_devices(config.devices),
            strategy=config.strategy,
            num_nodes=config.num_nodes,
            precision=config.precision,
            max_epochs=config.max_epochs,
            seed=seed,
            gradient_clip=config.gradient_clip,
            # Resume points are written by _FoldMonitor at epoch ends; the engine's step-based saves are not needed.
            checkpoint_every_n_steps=10**12,
            progress_bar=config.progress_bar,
            model_summary=False,
        )
    except ValidationError as err:
        msg = f"Invalid hardware settings for ROAM training: {err}"
        raise MsfmInputError(msg) from err


def _fold_frame(
    ids: Sequence[str], split: str, probs: np.ndarray, table: SlideTable, fold: int
) -> pd.DataFrame:
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


def _train_fold(
    k: int,
    split: pd.DataFrame,
    *,
    out: Path,
    table: SlideTable,
    store: FeatureStore,
    config: RoamTrainConfig,
    encoder: dict[str, Any],
    callbacks: Sequence[Callback],
) -> dict[str, Any] | None:
    from msfm.engine.module import MsfmLightningModule, OptimConfig
    from msfm.engine.trainer import build_trainer, fit
    from msfm.eval.classification import classification_report
    from msfm.models.roam.checkpoint import load_model, save_model

    fold_dir = out / f"fold{k}"
    best_dir = fold_dir / BEST_DIR
    lab = table.label_of()
    parts = {p: [s for s in split.loc[split["split"] == p, SLIDE_ID]] for p in ("train", "val", "test")}
    y_train = np.array([lab[s] for s in parts["train"]], dtype=np.int64)
    y_val = np.array([lab[s] for s in parts["val"]], dtype=np.int64)
    absent = [table.class_names[c] for c in range(len(table.class_names)) if not (y_train == c).any()]
    if absent:
        logger.warning("fold %d: no training slide of class(es) %s", k, absent)
    fold_seed = _mix(config.seed, k)
    d_in = int(encoder["feature_dim"])
    model = _build_model(config, table, d_in, fold_seed)

    opts = trainer_options(config, seed=fold_seed % 2**31)
    extra = {
        "task": table.task,
        "class_names": list(table.class_names),
        "label_map": dict(table.label_map),
        "encoder": encoder,
        "feature_dim": d_in,
        "fold": k,
        "n_train": len(parts["train"]),
        "n_val": len(parts["val"]),
        "train_config": config.model_dump(mode="json"),
        "source": "msfm-roam-train",
    }
    preprocessing = store.preprocessing() or None

    def export(net: torch.nn.Module, epoch: int, loss: float) -> None:
        save_model(
            net, best_dir, extra={**extra, "epoch": epoch, "val_loss": loss}, preprocessing=preprocessing
        )

    monitor = _FoldMonitor(
        export=export,
        ckpt_path=fold_dir / "checkpoints" / "last.ckpt",
        best_from_epoch=config.best_from_epoch,
        early_stopping=config.early_stopping,
        patience=config.patience,
        stop_epoch=config.stop_epoch,
        max_epochs=config.max_epochs,
        every_n_epochs=config.checkpoint_every_n_epochs,
    )
    trainer = build_trainer(
        opts,
        fold_dir,
        callbacks=[monitor, *callbacks],
        trainer_kwargs={
            "use_distributed_sampler": False,
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": 1,
        },
    )
    world = int(getattr(trainer, "world_size", 1) or 1)
    sampler = BalancedEpochSampler(
        y_train, seed=_mix(config.seed, k, 1), balanced=config.balanced_sampling, num_replicas=world
    )
    train_ds = SlideBagDataset(
        store,
        parts["train"],
        y_train,
        train=True,
        keep_fraction=config.roi_keep_fraction,
        min_rois=config.roi_dropout_min,
        max_rois=config.max_train_rois,
        seed=_mix(config.seed, k, 2),
    )
    val_ds = SlideBagDataset(store, parts["val"], y_val)
    pin = torch.cuda.is_available() and config.accelerator not in ("cpu",)
    loader_kw = {
        "batch_size": config.batch_size,
        "collate_fn": collate_slides,
        "num_workers": config.num_workers,
        "persistent_workers": config.num_workers > 0,
        "pin_memory": pin,
    }
    # Own generators: creating the iterators draws nothing from the global RNG that the engine restores on resume.
    train_loader = torch.utils.data.DataLoader(
        train_ds, sampler=sampler, generator=torch.Generator().manual_seed(fold_seed % 2**63), **loader_kw
    )
    val_loader = torch.utils.data.DataLoader(
        val_ds, shuffle=False, generator=torch.Generator().manual_seed(fold_seed % 2**63), **loader_kw
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    trainer.log_every_n_steps = max(1, min(50, steps_per_epoch))
    optim = OptimConfig(
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_epochs * steps_per_epoch,
        schedule="constant",
    )
    module = MsfmLightningModule(
        model, lambda m, b: roam_objective(m, b, roi_weight=config.roi_weight), optim
    )
    logger.info(
        "fold %d: %d train / %d val / %d test slides, %d steps per epoch",
        k,
        len(parts["train"]),
        len(parts["val"]),
        len(parts["test"]),
        steps_per_epoch,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches.*")
        fit(
            trainer,
            module,
            train_loader,
            fold_dir,
            val_dataloaders=val_loader,
            run_config={"fold": k, "roam": config.model_dump(mode="json"), "n_train": len(parts["train"])},
        )
    device = trainer.strategy.root_device
    if not trainer.is_global_zero or not _is_rank_zero():
        return None
    if monitor.best_epoch < 0 or not best_dir.is_dir():
        # No finite validation loss at any eligible epoch (diverged): keep the final weights, say so.
        logger.warning("fold %d: no epoch improved the validation loss; exporting the final model", k)
        export(module.model, int(monitor.epochs_done) - 1, float("nan"))
    best, meta = load_model(best_dir)
    best.to(device)
    ids = parts["val"] + parts["test"]
    probs = predict_probabilities([best], store, ids, device=device, roi_chunk=config.roi_chunk)[0]
    n_val = len(parts["val"])
    frames = [_fold_frame(parts["val"], "val", probs[:n_val], table, k)]
    if parts["test"]:
        frames.append(_fold_frame(parts["test"], "test", probs[n_val:], table, k))
    preds = pd.concat(frames, ignore_index=True)
    atomic_write_text(fold_dir / FOLD_PREDICTIONS, preds.to_csv(index=False))
    val_report = classification_report(y_val, probs[:n_val], table.class_names)
    test_report = None
    if parts["test"]:
        y_test = np.array([lab[s] for s in parts["test"]], dtype=np.int64)
        test_report = classification_report(y_test, probs[n_val:], table.class_names)
    done = {
        "fold": k,
        "best_epoch": int(meta.get("extra", {}).get("epoch", monitor.best_epoch)),
        "best_val_loss": float(monitor.best_loss),
        "epochs_trained": int(monitor.epochs_done),
        "stopped_early": bool(monitor.stopped),
        "n_train": len(parts["train"]),
        "n_val": n_val,
        "n_test": len(parts["test"]),
        "classes_missing_in_train": absent,
        "val": val_report,
        "test": test_report,
    }
    from msfm.eval.classification import to_jsonable

    atomic_write_json(fold_dir / DONE_FILE, to_jsonable(done))
    best.to("cpu")
    return done


def _summary(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
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


def _aggregate(out: Path, table: SlideTable, dones: list[dict[str, Any]]) -> RoamRunResult:
    from msfm.eval.classification import classification_report, save_confusion_png, to_jsonable

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
        "cv_val": _summary([d["val"] for d in dones]),
        "oof": classification_report(y_oof, oof[pcols].to_numpy(), names),
    }
    atomic_write_text(out / "oof_predictions.csv", oof.to_csv(index=False))
    save_confusion_png(
        metrics["oof"]["confusion"], names, out / "confusion_oof.png", title=f"{table.task}: out-of-fold"
    )
    test = None
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
        metrics["test_folds"] = _summary([d["test"] for d in dones if d.get("test")])
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
    return RoamRunResult(
        run_dir=out,
        metrics=metrics,
        oof=oof,
        test=test,
        checkpoints=[out / f"fold{d['fold']}" / BEST_DIR for d in dones],
        class_names=list(names),
    )


def train(
    slides: PathLike | pd.DataFrame,
    features_dir: PathLike,
    out: PathLike,
    config: RoamTrainConfig,
    *,
    splits: PathLike | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> RoamRunResult:
    """Cross-validated ROAM training of one task (see the module docstring for the recipe and the files).

    Args:
        slides: Slide table (CSV/TSV path or DataFrame).
        features_dir: Folder of feature files (``msfm roam preprocess --out``).
        out: Run directory; an existing run with the same settings is resumed.
        config: Training settings (``config.task`` names the label column).
        splits: Folder of user split files (``fold{k}.csv`` with ``slide_id, split``, or CLAM ``splits_{k}.csv``);
            None makes stratified (patient-grouped) folds.
        overwrite: Discard an existing run with different settings instead of refusing.
        callbacks: Extra Lightning callbacks for every fold.

    Returns:
        The run result (metrics, out-of-fold and test predictions, checkpoints).

    Raises:
        MsfmInputError: Bad table or splits, missing feature files, features of mixed encoders, or an existing run
            with different settings.
    """
    out = Path(out)
    trainer_options(config)  # bad accelerator/precision/strategy fail here, before any file is written
    table = read_slide_table(
        slides,
        config.task,
        features_dir=features_dir,
        classes=config.classes,
        label_map=config.label_map,
        slide_column=config.slide_column,
        group_column=config.group_column,
        skip_missing=config.skip_missing,
    )
    enc_name, dim = _scan_features(table)
    store = FeatureStore(table.paths, encoder=enc_name, cache_bytes=int(config.cache_gb * 2**30))
    store.get(table.slide_ids[0])  # reads the attributes and checks the first file through the contract
    encoder = store.encoder_description()
    if dim and dim != encoder["feature_dim"]:
        msg = f"Feature dimension mismatch: headers say {dim}, the reader returned {encoder['feature_dim']}."
        raise MsfmInputError(msg)
    record = {
        "kind": "msfm-roam-train",
        "config": config.fingerprint(),
        "task": table.task,
        "classes": list(table.class_names),
        "label_map": dict(table.label_map),
        "group_column": table.group_column,
        "table_digest": table.digest(),
        "n_slides": len(table.slide_ids),
        "encoder": encoder["name"],
        "feature_dim": int(encoder["feature_dim"]),
        "features_dir": str(features_dir),
    }
    _prepare_run_dir(out, record, overwrite=overwrite)
    folds = _load_or_make_splits(out, table, config, splits)
    dones: list[dict[str, Any]] = []
    for k, split in enumerate(folds):
        fold_dir = out / f"fold{k}"
        done_file = fold_dir / DONE_FILE
        if done_file.is_file() and (fold_dir / BEST_DIR).is_dir():
            logger.info("fold %d is finished; skipping it", k)
            dones.append(json.loads(done_file.read_text()))
            continue
        done = _train_fold(
            k, split, out=out, table=table, store=store, config=config, encoder=encoder, callbacks=callbacks
        )
        if done is not None:
            dones.append(done)
    if not _is_rank_zero():
        return RoamRunResult(out, {}, pd.DataFrame(), None, [], list(table.class_names))
    result = _aggregate(out, table, dones)
    oof = result.metrics["oof"]
    logger.info(
        "%s: out-of-fold accuracy %.3f, balanced accuracy %.3f, macro AUC %s",
        table.task,
        oof["accuracy"],
        oof["balanced_accuracy"],
        oof["auc_macro"],
    )
    return result
