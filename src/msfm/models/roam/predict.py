"""Slide prediction with trained ROAM models: fold ensembles and task cascades.

:func:`predict_slides` runs one model or a fold ensemble (a training run directory, whose ``fold*/best``
checkpoints are averaged: mean softmax over folds, as the released ROAM does) over feature files and returns one
row per slide with the class probabilities, the predicted class and its confidence.

:func:`cascade` chains tasks the way the ROAM paper's clinical workflow does: a stage runs only on the slides
selected by a condition on earlier stages' predictions, e.g. tumour detection on every slide, subtyping on the
slides predicted ``tumour``, then the markers (IDH, 1p/19q, MGMT) on the tumours::

    stages = [
        CascadeStage("detection", "runs/detection"),
        CascadeStage("subtyping", "runs/subtyping", when="detection==tumour"),
        CascadeStage("idh", "runs/idh", when="detection==tumour"),
        CascadeStage("grade_oligo", "runs/oligo_grade", when="subtyping==oligodendroglioma"),
    ]
    table = cascade(stages, "features/")

Condition syntax (``when``): ``STAGE==A`` (the earlier stage predicted ``A``), ``STAGE==A,B`` (``A`` or ``B``),
``STAGE!=A,B`` (neither), and several conditions joined by ``&`` (all must hold), e.g.
``detection==tumour&subtyping!=ependymoma``. A slide that an earlier stage did not reach never satisfies
``==`` and does not satisfy ``!=`` either (it has no prediction). Class names are compared as strings.

The output has, per stage in stage order, ``<stage>`` (the predicted class, ``""`` when the stage did not apply),
``<stage>_confidence`` and ``<stage>_prob_<class>`` (NaN when it did not apply), and a ``stages`` column
listing the stages that ran on the slide (``"detection>subtyping>idh"``). ``table.attrs["stage_order"]`` holds the
stage names in order.

The same syntax works on the command line (``msfm roam cascade --stage detection=RUN1 --stage
subtyping=RUN2:detection==tumour``) and in a YAML/JSON spec file (see :func:`read_cascade_spec`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from msfm.data.slide_ids import check_slide_ids
from msfm.data.slides import SLIDE_EXTENSIONS
from msfm.errors import MsfmInputError
from msfm.runtime.jsonable import to_jsonable

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "CascadeStage",
    "FeatureStore",
    "RoamEnsemble",
    "cascade",
    "load_ensemble",
    "parse_condition",
    "parse_stage",
    "predict_probabilities",
    "predict_slides",
    "prob_column",
    "read_cascade_spec",
    "resolve_feature_files",
    "slide_ids_from",
]

BEST_DIR = "best"
DONE_FILE = "done.json"
SLIDE_ID = "slide_id"
# Suffixes stripped when slides are given as file names (feature files and formats msfm does not read too).
_SLIDE_SUFFIXES = {*SLIDE_EXTENSIONS, ".czi", ".isyntax", ".h5"}


def prob_column(class_name: str, prefix: str = "") -> str:
    """Name of the probability column of a class (``prob_<class>``, or ``<prefix>_prob_<class>``)."""
    return f"{prefix}_prob_{class_name}" if prefix else f"prob_{class_name}"


# ---------------------------------------------------------------------------------------------------------------
# Feature files
# ---------------------------------------------------------------------------------------------------------------


def _format_missing(missing: Sequence[str], features_dir: Path) -> str:
    shown = ", ".join(missing[:10])
    more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
    return (
        f"{len(missing)} slide(s) have no feature file in {features_dir} (looked for <slide_id>.h5 there and in "
        f"its features/ subfolder): {shown}{more}."
    )


def resolve_feature_files(
    slide_ids: Sequence[str], features_dir: PathLike, *, skip_missing: bool = False
) -> tuple[dict[str, Path], list[str]]:
    """Find the feature file of each slide.

    A slide id that carries a slide-file suffix (``A01.svs``) also matches ``A01.h5``.

    Args:
        slide_ids: Slide ids.
        features_dir: Folder written by ``msfm roam preprocess`` (``DIR/features/<id>.h5``) or a folder of
            ``<id>.h5`` files.
        skip_missing: Drop slides without a file (with a warning) instead of raising.

    Returns:
        ``(paths, missing)``: slide id -> feature file for the slides found, and the ids without a file.

    Raises:
        MsfmInputError: If the folder does not exist, or files are missing and ``skip_missing`` is False (the
            message lists the first 10 missing ids, their count and the folder searched).
    """
    from msfm.models.roam.features import feature_path

    root = Path(features_dir)
    if not root.is_dir():
        msg = f"Features folder {root} does not exist. Pass the --out folder of `msfm roam preprocess`."
        raise MsfmInputError(msg)
    found: dict[str, Path] = {}
    missing: list[str] = []
    # Ids name files: one that leaves the folder (``../x``) is refused before any path is built from it.
    for sid in check_slide_ids(slide_ids):
        candidates = [sid]
        suffix = Path(sid).suffix.lower()
        if suffix in _SLIDE_SUFFIXES:
            candidates.append(sid[: -len(suffix)])
        for cand in candidates:
            path = Path(feature_path(root, cand))
            if path.is_file():
                found[sid] = path
                break
        else:
            missing.append(sid)
    if missing:
        text = _format_missing(missing, root)
        if not skip_missing:
            msg = f"{text} Extract their features with `msfm roam preprocess`, or pass --skip-missing to leave them out."
            raise MsfmInputError(msg)
        logger.warning("%s They are left out (--skip-missing).", text)
    return found, missing


def list_feature_slides(features_dir: PathLike) -> list[str]:
    """Slide ids of every ``*.h5`` feature file in a features folder (or its ``features/`` subfolder).

    Raises:
        MsfmInputError: If the folder holds no feature file.
    """
    root = Path(features_dir)
    for folder in (root / "features", root):
        files = sorted(folder.glob("*.h5")) if folder.is_dir() else []
        if files:
            return [f.stem for f in files]
    msg = f"No feature files (*.h5) in {root} or {root / 'features'}. Run `msfm roam preprocess` first."
    raise MsfmInputError(msg)


class FeatureStore:
    """Read ROI features per slide through the feature-file contract, caching them in memory up to a budget.

    Every file is checked against the expected encoder and feature dimension (the first file read sets them
    when they are not given), so features from two different encoders are never mixed.

    Args:
        paths: Slide id -> feature file.
        encoder: Expected encoder name (None: take the first file's).
        feature_dim: Expected feature dimension (None: take the first file's).
        cache_bytes: Keep slides in memory while their total size stays below this (0 disables).
    """

    def __init__(
        self,
        paths: Mapping[str, Path],
        *,
        encoder: str | None = None,
        feature_dim: int | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.paths = dict(paths)
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[str, np.ndarray] = {}
        self._cached_bytes = 0
        self.n_rois: dict[str, int] = {}
        self.attrs: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, slide_id: str) -> Any:
        """The :class:`~msfm.models.roam.features.SlideFeatures` of a slide (not cached)."""
        from msfm.models.roam.features import read_slide_features

        if slide_id not in self.paths:
            msg = f"Slide {slide_id!r} has no feature file in this store ({len(self.paths)} slides)."
            raise MsfmInputError(msg)
        sf = read_slide_features(self.paths[slide_id], encoder=self.encoder, feature_dim=self.feature_dim)
        feats = np.asarray(sf.features)
        if feats.ndim != 3 or feats.shape[0] == 0:
            msg = (
                f"Feature file {self.paths[slide_id]} of slide {slide_id!r} holds features of shape {feats.shape}; "
                "expected [n_roi >= 1, 84, d]. Re-run `msfm roam preprocess` for it or leave the slide out."
            )
            raise MsfmInputError(msg)
        self.n_rois[slide_id] = int(feats.shape[0])
        if self.attrs is None:
            self.attrs = dict(getattr(sf, "attrs", {}) or {})
            if self.encoder is None:
                enc = _attr_str(self.attrs.get("encoder"))
                self.encoder = None if enc in (None, "", "unknown") else enc
            if self.feature_dim is None:
                self.feature_dim = int(feats.shape[-1])
        return sf

    def get(self, slide_id: str) -> np.ndarray:
        """ROI features of a slide.

        Shape:
            returns float32 ``[n_roi, 84, d]``.
        """
        hit = self._cache.get(slide_id)
        if hit is not None:
            return hit
        feats = np.ascontiguousarray(self.read(slide_id).features, dtype=np.float32)
        if self._cached_bytes + feats.nbytes <= self.cache_bytes:
            self._cache[slide_id] = feats
            self._cached_bytes += feats.nbytes
        return feats

    def encoder_description(self) -> dict[str, Any]:
        """Encoder name, its ``describe()`` record (when the files carry one) and the feature dimension."""
        attrs = self.attrs or {}
        config = attrs.get("encoder_config")
        if isinstance(config, bytes):
            config = config.decode("utf-8")
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError:
                pass
        return {"name": self.encoder, "config": to_jsonable(config), "feature_dim": self.feature_dim}

    def preprocessing(self) -> dict[str, Any]:
        """The slide-processing parameters recorded in the feature files (mpp, ROI size, stain normalisation)."""
        keys = (
            "target_mpp",
            "roi_size",
            "patch_size",
            "tokens_per_roi",
            "stain_norm",
            "stain_target",
            "encoder",
        )
        attrs = self.attrs or {}
        out = {k: to_jsonable(attrs[k]) for k in keys if attrs.get(k) is not None}
        config = attrs.get("preprocess_config")
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError:
                config = None
        if isinstance(config, dict) and config:
            out["preprocess_config"] = to_jsonable(config)
        return out


def _attr_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Models and ensembles
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RoamEnsemble:
    """One or more ROAM models predicting the same task (the folds of a run).

    Attributes:
        models: The models (eval mode).
        class_names: Class names in logit order (identical for every model).
        task: Task name stored with the models (None if unknown).
        feature_dim: Input feature dimension.
        encoder: Encoder name the models were trained on (None if unknown).
        sources: Checkpoint directories.
        metas: ``meta.json`` of each checkpoint.
    """

    models: list[Any]
    class_names: list[str]
    task: str | None
    feature_dim: int
    encoder: str | None
    sources: list[Path]
    metas: list[dict[str, Any]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> RoamEnsemble:
        """Move every model to ``device``."""
        for m in self.models:
            m.to(device)
        return self


def _run_checkpoints(run: Path) -> list[Path]:
    folds = sorted(
        (p for p in run.glob("fold*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:])
    )
    if not folds:
        return []
    unfinished = [p.name for p in folds if not (p / DONE_FILE).is_file() or not (p / BEST_DIR).is_dir()]
    if unfinished:
        msg = (
            f"Run {run} is not finished: {unfinished} have no exported best model yet. Finish it by repeating the "
            "same `msfm roam train` command (it resumes), or pass the finished fold checkpoints (RUN/foldK/best)."
        )
        raise MsfmInputError(msg)
    return [p / BEST_DIR for p in folds]


def load_ensemble(
    source: PathLike | Sequence[PathLike], *, device: str | torch.device = "cpu"
) -> RoamEnsemble:
    """Load a training run's fold models, one checkpoint, or a list of checkpoints.

    Args:
        source: A run directory of ``msfm roam train`` (its ``fold*/best`` models), an msfm ROAM checkpoint
            directory, or a list of checkpoint directories.
        device: Where to put the models.

    Returns:
        The ensemble.

    Raises:
        MsfmInputError: If a run is unfinished or the models disagree on classes or feature dimension.
        CheckpointError: If a checkpoint is damaged or not a ROAM checkpoint.
    """
    from msfm.models.roam.checkpoint import load_model
    from msfm.runtime.checkpoint import is_checkpoint_dir

    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    dirs: list[Path] = []
    for item in items:
        p = Path(item)
        if is_checkpoint_dir(p):
            dirs.append(p)
            continue
        if p.is_dir():
            found = _run_checkpoints(p)
            if found:
                dirs.extend(found)
                continue
        msg = (
            f"{p} is neither an msfm ROAM checkpoint directory (model.safetensors + config.json + meta.json) nor "
            "a finished `msfm roam train` run directory (fold*/best)."
        )
        raise MsfmInputError(msg)
    if not dirs:
        msg = f"No model found in {items}."
        raise MsfmInputError(msg)
    models, metas = [], []
    for d in dirs:
        model, meta = load_model(d, map_location="cpu")
        models.append(model.to(device).eval())
        metas.append(meta)
    names = [_class_names(m, meta) for m, meta in zip(models, metas)]
    if any(n != names[0] for n in names):
        msg = f"The models disagree on the classes: {dict(zip(map(str, dirs), names))}. Ensemble models of one task only."
        raise MsfmInputError(msg)
    dims = {int(m.config.d_in) for m in models}
    if len(dims) != 1:
        msg = (
            f"The models expect different feature dimensions {sorted(dims)}; they cannot share feature files."
        )
        raise MsfmInputError(msg)
    extras = [meta.get("extra", {}) or {} for meta in metas]
    tasks = {e.get("task") for e in extras}
    encoders = {
        (e.get("encoder") or {}).get("name") if isinstance(e.get("encoder"), dict) else e.get("encoder")
        for e in extras
    }
    return RoamEnsemble(
        models=models,
        class_names=names[0],
        task=next(iter(tasks)) if len(tasks) == 1 else None,
        feature_dim=dims.pop(),
        encoder=next(iter(encoders)) if len(encoders) == 1 else None,
        sources=dirs,
        metas=metas,
    )


def _class_names(model: Any, meta: Mapping[str, Any]) -> list[str]:
    extra = meta.get("extra", {}) or {}
    names = extra.get("class_names") or model.config.class_names
    if names is None:
        return [str(i) for i in range(model.config.n_classes)]
    return [str(n) for n in names]


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def predict_probabilities(
    models: Sequence[Any],
    store: FeatureStore,
    slide_ids: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    roi_chunk: int | None = None,
) -> np.ndarray:
    """Softmax class probabilities of each model for each slide (one slide at a time, no padding).

    Args:
        models: ROAM models (put in eval mode here).
        store: Feature store holding the slides.
        slide_ids: Slides to predict.
        device: Device the models are on.
        roi_chunk: Encode at most this many ROIs at once (bounds memory on large slides).

    Returns:
        Probabilities.

    Shape:
        returns float64 ``[n_models, n_slides, C]``.
    """
    dev = _device(device)
    n_classes = int(models[0].config.n_classes)
    out = np.zeros((len(models), len(slide_ids), n_classes), dtype=np.float64)
    for m in models:
        m.eval()
    for j, sid in enumerate(slide_ids):
        x = torch.from_numpy(store.get(sid)).to(dev).unsqueeze(0)
        for i, m in enumerate(models):
            logits = m(x, roi_chunk=roi_chunk).logits.float()
            out[i, j] = torch.softmax(logits, dim=-1)[0].double().cpu().numpy()
    return out


def slide_ids_from(slides: Any, *, column: str = SLIDE_ID) -> list[str]:
    """Slide ids from a list, a DataFrame (``slide_id`` column) or a CSV path.

    Raises:
        MsfmInputError: If the table has no such column, the CSV does not exist, or ids repeat.
    """
    if isinstance(slides, str | os.PathLike):
        slides = read_table(Path(slides))
    if isinstance(slides, pd.DataFrame):
        if column not in slides.columns:
            msg = f"The slide table has no {column!r} column; its columns are {list(slides.columns)[:20]}."
            raise MsfmInputError(msg)
        ids = check_slide_ids(slides[column].tolist(), f"column {column!r}")
    else:
        ids = check_slide_ids(slides)
    dup = sorted(s for s, n in Counter(ids).items() if n > 1)
    if dup:
        msg = f"Slide ids repeat: {dup[:10]}. Each slide must appear once."
        raise MsfmInputError(msg)
    if any(not s for s in ids):
        msg = "Some slide ids are empty; fill the slide_id column."
        raise MsfmInputError(msg)
    return ids


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV slide table with every value as a string (empty cells -> NaN), so ``1`` stays ``"1"``.

    Raises:
        MsfmInputError: If the file does not exist or cannot be parsed.
    """
    if not path.is_file():
        msg = f"Table {path} does not exist."
        raise MsfmInputError(msg)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        msg = f"Cannot read the table {path}: {err}. Expected a CSV with a header row."
        raise MsfmInputError(msg) from err


def predict_slides(
    run_or_checkpoints: PathLike | Sequence[PathLike] | RoamEnsemble,
    features_dir: PathLike,
    slides: Any = None,
    *,
    device: str | torch.device = "auto",
    roi_chunk: int | None = None,
    skip_missing: bool = False,
    per_model: bool = False,
    cache_bytes: int = 0,
) -> pd.DataFrame:
    """Predict slides with one model or a fold ensemble (mean softmax over models).

    Args:
        run_or_checkpoints: A training run directory, a checkpoint directory, a list of checkpoint directories,
            or a loaded :class:`RoamEnsemble`.
        features_dir: Folder of feature files (``msfm roam preprocess`` output).
        slides: Slide ids (list), a table with a ``slide_id`` column (DataFrame or CSV path), or None for every
            feature file in ``features_dir``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        roi_chunk: Encode at most this many ROIs at once.
        skip_missing: Leave out slides without a feature file (warning) instead of raising.
        per_model: Also add ``m<i>_prob_<class>`` columns with each model's probabilities.
        cache_bytes: Memory budget for caching features (only useful when predicting twice).

    Returns:
        One row per slide: ``slide_id``, ``pred`` (class name), ``confidence`` (its probability), ``prob_<class>``
        per class, ``n_rois``. ``attrs`` holds ``class_names``, ``task`` and ``n_models``.

    Raises:
        MsfmInputError: Missing feature files (unless ``skip_missing``), features from another encoder or of
            another dimension, an unfinished run.
    """
    ens = (
        run_or_checkpoints
        if isinstance(run_or_checkpoints, RoamEnsemble)
        else load_ensemble(run_or_checkpoints, device="cpu")
    )
    dev = _device(device)
    ens.to(dev)
    ids = list_feature_slides(features_dir) if slides is None else slide_ids_from(slides)
    paths, _ = resolve_feature_files(ids, features_dir, skip_missing=skip_missing)
    kept = [s for s in ids if s in paths]
    store = FeatureStore(paths, encoder=ens.encoder, feature_dim=ens.feature_dim, cache_bytes=cache_bytes)
    probs = predict_probabilities(ens.models, store, kept, device=dev, roi_chunk=roi_chunk)
    table = probability_table(kept, probs.mean(axis=0), ens.class_names)
    if per_model:
        for i in range(probs.shape[0]):
            for c, name in enumerate(ens.class_names):
                table[prob_column(name, f"m{i}")] = probs[i, :, c]
    table["n_rois"] = [store.n_rois.get(s, 0) for s in kept]
    table.attrs.update({"class_names": ens.class_names, "task": ens.task, "n_models": len(ens.models)})
    return table


def probability_table(
    slide_ids: Sequence[str], proba: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """``slide_id, pred, confidence, prob_<class>...`` from probabilities.

    Shape:
        proba: ``[n_slides, C]``.
    """
    proba = np.asarray(proba, dtype=np.float64).reshape(len(slide_ids), len(class_names))
    idx = proba.argmax(axis=1) if len(slide_ids) else np.zeros(0, dtype=int)
    table = pd.DataFrame({SLIDE_ID: list(slide_ids)})
    table["pred"] = [str(class_names[i]) for i in idx]
    table["confidence"] = proba.max(axis=1) if len(slide_ids) else np.zeros(0)
    for c, name in enumerate(class_names):
        table[prob_column(str(name))] = proba[:, c]
    return table


# ---------------------------------------------------------------------------------------------------------------
# Cascade
# ---------------------------------------------------------------------------------------------------------------

_COND_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(==|!=)\s*(.+?)\s*$")
_NAME_RE = re.compile(r"^[A-Za-z_][\w.\-]*$")


@dataclass(frozen=True)
class Condition:
    """``stage == any of values`` (``negate=False``) or ``stage != all of values`` (``negate=True``)."""

    stage: str
    values: tuple[str, ...]
    negate: bool = False

    def __str__(self) -> str:
        return f"{self.stage}{'!=' if self.negate else '=='}{','.join(self.values)}"


def parse_condition(text: str | None) -> list[Condition]:
    """Parse ``"detection==tumour&subtyping!=ependymoma"`` into conditions (all must hold).

    Raises:
        MsfmInputError: On text that is not ``STAGE==V[,V...]`` or ``STAGE!=V[,V...]`` joined by ``&``.
    """
    if text is None or not str(text).strip():
        return []
    out = []
    for part in str(text).split("&"):
        m = _COND_RE.match(part)
        values = tuple(v.strip() for v in m.group(3).split(",")) if m else ()
        if m is None or not all(values):
            msg = (
                f"Cannot parse the stage condition {part.strip()!r} (in {text!r}); expected STAGE==CLASS, "
                "STAGE==A,B (any of), STAGE!=A,B (none of), joined by '&', e.g. 'detection==tumour'."
            )
            raise MsfmInputError(msg)
        out.append(Condition(m.group(1), values, m.group(2) == "!="))
    return out


@dataclass(frozen=True)
class CascadeStage:
    """One task of a cascade.

    Attributes:
        name: Stage name (the output column); letters, digits, ``_``, ``-``, ``.``.
        source: A run directory, a checkpoint directory or a list of checkpoint directories.
        when: Condition on earlier stages selecting the slides this stage runs on (None: every slide). See the
            module docstring for the syntax.
        features: Features folder for this stage when its models use another encoder (None: the cascade's).
    """

    name: str
    source: Any
    when: str | None = None
    features: str | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name) or self.name in (SLIDE_ID, "stages"):
            msg = (
                f"Stage name {self.name!r} is not usable; use letters, digits, '_', '-' or '.', starting with a "
                f"letter (and not {SLIDE_ID!r} or 'stages')."
            )
            raise MsfmInputError(msg)
        parse_condition(self.when)


def parse_stage(text: str) -> CascadeStage:
    """Parse the command-line form ``NAME=SOURCE[:CONDITION]``.

    ``SOURCE`` is a run or checkpoint directory; several checkpoints can be joined with ``+``. The condition
    follows the last ``:`` whose remainder parses as a condition, so paths containing ``:`` still work.

    Example:
        >>> parse_stage("subtyping=runs/sub:detection==tumour")
        CascadeStage(name='subtyping', source='runs/sub', when='detection==tumour', features=None)

    Raises:
        MsfmInputError: If the text has no ``=`` or the name/condition is invalid.
    """
    if "=" not in text or text.startswith("="):
        msg = f"--stage {text!r}: expected NAME=RUN_DIR[:CONDITION], e.g. 'subtyping=runs/sub:detection==tumour'."
        raise MsfmInputError(msg)
    name, rest = text.split("=", 1)
    source, when = rest, None
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if _COND_RE.match(tail.split("&")[0]) and head:
            source, when = head, tail
    if not source:
        msg = f"--stage {text!r} names no run or checkpoint directory."
        raise MsfmInputError(msg)
    src: Any = source.split("+") if "+" in source else source
    return CascadeStage(name.strip(), src, when)


def read_cascade_spec(path: PathLike) -> list[CascadeStage]:
    """Read stages from YAML/JSON: ``{"stages": [{"name", "run" | "checkpoints", "when", "features"}, ...]}``.

    Example YAML::

        stages:
          - {name: detection, run: runs/detection}
          - {name: subtyping, run: runs/subtyping, when: "detection==tumour"}
          - {name: idh, checkpoints: [ckpt/idh_f0, ckpt/idh_f1], when: "detection==tumour"}

    Relative paths are taken relative to the spec file's folder.

    Raises:
        MsfmInputError: If the file is missing, unparsable or a stage lacks a name or a source.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        msg = f"Cascade spec {p} does not exist."
        raise MsfmInputError(msg)
    try:
        doc = (
            yaml.safe_load(p.read_text())
            if p.suffix.lower() in (".yaml", ".yml")
            else json.loads(p.read_text())
        )
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        msg = f"Cannot parse the cascade spec {p}: {err}"
        raise MsfmInputError(msg) from err
    entries = doc.get("stages") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        msg = f"Cascade spec {p} must hold a non-empty list 'stages' of {{name, run, when}} entries."
        raise MsfmInputError(msg)

    def rel(v: Any) -> str:
        q = Path(str(v))
        return str(q if q.is_absolute() else p.parent / q)

    stages = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "name" not in e or not ({"run", "checkpoints", "source"} & set(e)):
            msg = f"Stage {i} of {p} needs 'name' and 'run' (or 'checkpoints'); got {e!r}."
            raise MsfmInputError(msg)
        unknown = set(e) - {"name", "run", "checkpoints", "source", "when", "features"}
        if unknown:
            msg = f"Stage {e['name']!r} of {p} has unknown keys {sorted(unknown)}."
            raise MsfmInputError(msg)
        src = e.get("run", e.get("source", e.get("checkpoints")))
        src = [rel(s) for s in src] if isinstance(src, list) else rel(src)
        feats = rel(e["features"]) if e.get("features") else None
        stages.append(CascadeStage(str(e["name"]), src, e.get("when"), feats))
    return stages


def _selected(table: pd.DataFrame, conditions: Sequence[Condition]) -> np.ndarray:
    keep = np.ones(len(table), dtype=bool)
    for cond in conditions:
        col = table[cond.stage].astype(str)
        ran = col != ""
        hit = col.isin(cond.values).to_numpy()
        keep &= ran.to_numpy() & (~hit if cond.negate else hit)
    return keep


def cascade(
    stages: Sequence[CascadeStage],
    features_dir: PathLike,
    slides: Any = None,
    *,
    device: str | torch.device = "auto",
    roi_chunk: int | None = None,
    skip_missing: bool = False,
) -> pd.DataFrame:
    """Run tasks in order, each on the slides its condition selects (see the module docstring).

    Args:
        stages: The stages, in order; a condition may only name earlier stages.
        features_dir: Folder of feature files used by every stage without its own ``features``.
        slides: Slide ids, a table with ``slide_id`` or a CSV path; None for every feature file.
        device: Device for the models.
        roi_chunk: Encode at most this many ROIs at once.
        skip_missing: Leave out slides without a feature file instead of raising.

    Returns:
        One row per slide, columns per stage (see the module docstring); ``attrs["stage_order"]`` and
        ``attrs["stages"]`` (name, source, condition, classes of each stage).

    Raises:
        MsfmInputError: Duplicate stage names, a condition naming a later/unknown stage or a class the stage
            cannot predict, missing feature files.
    """
    if not stages:
        msg = "cascade needs at least one stage."
        raise MsfmInputError(msg)
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        msg = f"Stage names repeat: {dup}. Give each stage its own name."
        raise MsfmInputError(msg)
    ids = list_feature_slides(features_dir) if slides is None else slide_ids_from(slides)
    if skip_missing:
        found, _ = resolve_feature_files(ids, features_dir, skip_missing=True)
        ids = [s for s in ids if s in found]
    table = pd.DataFrame({SLIDE_ID: ids})
    applied: list[list[str]] = [[] for _ in ids]
    classes: dict[str, list[str]] = {}
    info = []
    dev = _device(device)
    for i, stage in enumerate(stages):
        conds = parse_condition(stage.when)
        for cond in conds:
            if cond.stage not in names[:i]:
                where = "a later stage" if cond.stage in names else "no stage"
                msg = (
                    f"Stage {stage.name!r}: its condition {stage.when!r} names {cond.stage!r}, which is {where}. "
                    f"Conditions may only use earlier stages: {names[:i]}."
                )
                raise MsfmInputError(msg)
            unknown = [v for v in cond.values if v not in classes[cond.stage]]
            if unknown:
                msg = (
                    f"Stage {stage.name!r}: condition {stage.when!r} uses {unknown}, which stage {cond.stage!r} never "
                    f"predicts; its classes are {classes[cond.stage]}."
                )
                raise MsfmInputError(msg)
        ens = load_ensemble(stage.source, device="cpu")
        classes[stage.name] = list(ens.class_names)
        mask = _selected(table, conds)
        chosen = [s for s, m in zip(ids, mask) if m]
        logger.info(
            "cascade stage %s: %d of %d slides (%s)", stage.name, len(chosen), len(ids), stage.when or "all"
        )
        pred = (
            predict_slides(
                ens,
                stage.features or features_dir,
                chosen,
                device=dev,
                roi_chunk=roi_chunk,
                skip_missing=skip_missing,
            )
            if chosen
            else probability_table([], np.zeros((0, len(ens.class_names))), ens.class_names)
        )
        by_id = pred.set_index(SLIDE_ID)
        col = [str(by_id.at[s, "pred"]) if s in by_id.index else "" for s in ids]
        table[stage.name] = col
        table[f"{stage.name}_confidence"] = [
            float(by_id.at[s, "confidence"]) if s in by_id.index else math.nan for s in ids
        ]
        for name in ens.class_names:
            pc = prob_column(name)
            table[prob_column(name, stage.name)] = [
                float(by_id.at[s, pc]) if s in by_id.index else math.nan for s in ids
            ]
        for j, s in enumerate(ids):
            if s in by_id.index:
                applied[j].append(stage.name)
        info.append(
            {
                "name": stage.name,
                "source": [str(p) for p in ens.sources],
                "when": stage.when,
                "classes": list(ens.class_names),
                "task": ens.task,
                "n_slides": len(chosen),
            }
        )
        ens.to("cpu")
    table["stages"] = [">".join(a) for a in applied]
    table.attrs["stage_order"] = names
    table.attrs["stages"] = info
    return table


def stage_names(stages: Iterable[CascadeStage]) -> list[str]:
    """Names of the stages in order."""
    return [s.name for s in stages]
