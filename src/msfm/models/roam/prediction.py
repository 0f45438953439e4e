"""``msfm.roam.predict``: class probabilities of slides from one model or a fold ensemble (mean softmax over folds).

One row per slide: ``slide_id``, ``pred`` (class name), ``confidence`` (its probability), ``prob_<class>`` per
class and ``n_rois``; with ``per_model=True`` also ``m<i>_prob_<class>`` per fold model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from msfm.errors import MsfmInputError
from msfm.models.roam.ensemble import ensemble_for
from msfm.models.roam.feature_store import (
    FeatureStore,
    list_feature_slides,
    resolve_feature_files,
    training_geometry,
)
from msfm.models.roam.tables import SLIDE_ID, prob_column, slide_ids_from
from msfm.runtime.atomic import atomic_write_text, check_output_free
from msfm.runtime.devices import autocast_context, resolve_device
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.runtime.progress import progress_bar
from msfm.runtime.results import Result

__all__ = [
    "SlidePredictions",
    "check_file_out",
    "predict",
    "predict_probabilities",
    "probability_table",
    "write_csv",
]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class SlidePredictions(Result):
    """What :func:`predict` returns.

    Attributes:
        table: One row per slide: ``slide_id``, ``pred``, ``confidence``, ``prob_<class>``, ``n_rois`` (and
            ``m<i>_prob_<class>`` with ``per_model``).
        class_names: Class names in logit order.
        task: Task name stored with the models (None if unknown).
        n_models: Models averaged.
        precision: ``{"requested", "chosen", "reason"}`` of the run (see
            :func:`msfm.runtime.precision.resolve_precision`).
    """

    table: pd.DataFrame
    class_names: list[str] = field(default_factory=list)
    task: str | None = None
    n_models: int = 1
    precision: dict[str, str] = field(default_factory=dict)


@torch.inference_mode()
def predict_probabilities(
    models: Sequence[Any],
    store: FeatureStore,
    slide_ids: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    roi_chunk: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Softmax class probabilities of each model for each slide (one slide at a time, no padding).

    Args:
        models: ROAM models (put in eval mode here), e.g. ``RoamEnsemble.models``.
        store: Feature store holding the slides.
        slide_ids: Slides to predict.
        device: Device the models are on.
        roi_chunk: Encode at most this many ROIs at once (bounds memory on large slides).
        progress: Show a progress bar over the slides.

    Returns:
        Probabilities.

    Shape:
        returns float64 ``[n_models, n_slides, C]``.
    """
    dev = resolve_device(device)
    n_classes = int(models[0].config.n_classes)
    out = np.zeros((len(models), len(slide_ids), n_classes), dtype=np.float64)
    for m in models:
        m.eval()
    with progress_bar(len(slide_ids), "roam predict", enabled=progress, unit="slide") as bar:
        for j, sid in enumerate(slide_ids):
            x = torch.from_numpy(store.get(sid)).to(dev).unsqueeze(0)
            for i, m in enumerate(models):
                logits = m(x, roi_chunk=roi_chunk).logits.float()
                out[i, j] = torch.softmax(logits, dim=-1)[0].double().cpu().numpy()
            bar.update(1)
    return out


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


def check_file_out(out: PathLike | None, *, overwrite: bool) -> Path | None:
    """An output file path, refused when it exists (without ``overwrite``) or its folder is missing."""
    if out is None:
        return None
    path = check_output_free(out, overwrite=overwrite)
    if not path.parent.is_dir():
        msg = f"Cannot write {path}: the folder {path.parent} does not exist. Create it first."
        raise MsfmInputError(msg)
    return path


def write_csv(table: pd.DataFrame, out: PathLike) -> Path:
    """Write a table as CSV (no index), atomically."""
    return atomic_write_text(out, table.to_csv(index=False))


def predict(
    data: PathLike,
    checkpoint: Any,
    *,
    slides: Any = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    roi_chunk: int | None = None,
    skip_missing: bool = False,
    per_model: bool = False,
    cache_bytes: int = 0,
    out: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SlidePredictions:
    """Predict slides with one model or a fold ensemble (mean softmax over the models).

    Args:
        data: Feature folder (``msfm roam preprocess`` output, or its ``features/`` folder).
        checkpoint: A run directory or ``TrainResult`` (its fold ensemble), a checkpoint directory, a list of them,
            or a ``Loaded`` (see :func:`msfm.roam.load`).
        slides: Slide ids (list), a table with a ``slide_id`` column (DataFrame or CSV path), or None for every
            feature file in ``data``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        precision: ``"auto"`` (bf16 autocast where the device computes it fast, else fp32; see
            :func:`msfm.runtime.precision.resolve_precision`), ``"32"``, ``"bf16"`` or ``"16"``. The choice is
            recorded in ``.precision`` and ``table.attrs["precision"]``.
        roi_chunk: Encode at most this many ROIs at once.
        skip_missing: Leave out slides without a feature file (warning) instead of raising.
        per_model: Also add ``m<i>_prob_<class>`` columns with each model's probabilities.
        cache_bytes: Memory budget for caching features (only useful when predicting twice).
        out: Also write the table to this CSV (refused if it exists, unless ``overwrite``).
        overwrite: Replace an existing ``out``.
        progress: Show a progress bar over the slides.

    Returns:
        The predictions (``.table``; the same class names, task and model count as fields and in
        ``table.attrs``).

    Raises:
        MsfmInputError: Missing feature files (unless ``skip_missing``), features from another encoder or of
            another dimension, features of another ROI geometry (ROI size, patch size or µm per pixel) than the
            model's training features, an unfinished run, an existing ``out``. Files that do not record their
            geometry are used with a ``UserWarning``.
    """
    out_path = check_file_out(out, overwrite=overwrite)
    canonical_precision(precision)
    dev = resolve_device(device)
    choice = resolve_precision(precision, dev)
    ids = list_feature_slides(data) if slides is None else slide_ids_from(slides)
    paths, _ = resolve_feature_files(ids, data, skip_missing=skip_missing)
    ens = ensemble_for(checkpoint, device=dev)
    kept = [s for s in ids if s in paths]
    store = FeatureStore(
        paths,
        encoder=ens.encoder,
        feature_dim=ens.feature_dim,
        cache_bytes=cache_bytes,
        geometry=training_geometry(ens.metas),
    )
    with autocast_context(dev, choice.precision):
        probs = predict_probabilities(
            ens.models, store, kept, device=dev, roi_chunk=roi_chunk, progress=progress
        )
    table = probability_table(kept, probs.mean(axis=0), ens.class_names)
    if per_model:
        for i in range(probs.shape[0]):
            for c, name in enumerate(ens.class_names):
                table[prob_column(name, f"m{i}")] = probs[i, :, c]
    table["n_rois"] = [store.n_rois.get(s, 0) for s in kept]
    table.attrs.update(
        {"class_names": ens.class_names, "task": ens.task, "n_models": len(ens), "precision": choice.record()}
    )
    if out_path is not None:
        write_csv(table, out_path)
    return SlidePredictions(table, list(ens.class_names), ens.task, len(ens), choice.record())
