"""Old ROAM names, kept for one release: each warns with the new call, then runs it (old return types kept)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from msfm.runtime.deprecation import deprecated

__all__ = [
    "convert_official",
    "load_ensemble",
    "load_model",
    "predict_slides",
    "preprocess_slides",
    "write_heatmaps",
]

PathLike = str | os.PathLike[str]


@deprecated("msfm.roam.convert_official", "msfm.roam.convert(official, out, overwrite=...)")
def convert_official(official: PathLike, out: PathLike, **kwargs: Any) -> Path:
    """Convert a released ``ROAM_split{k}.pth`` (replaced an existing ``out``, as before)."""
    from msfm.models.roam.checkpoint import convert

    kwargs.setdefault("overwrite", True)
    return convert(official, out, **kwargs)


@deprecated("msfm.roam.load_model", "msfm.roam.load(checkpoint) (Loaded.model, Loaded.meta)")
def load_model(path: PathLike, *, map_location: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """``(Roam in eval mode, meta)`` of one checkpoint directory."""
    from msfm.models.roam.checkpoint import read_model

    return read_model(path, map_location=map_location)


@deprecated("msfm.roam.load_ensemble", "msfm.roam.load(run_or_checkpoints) (Loaded.model)")
def load_ensemble(source: PathLike | Sequence[PathLike], *, device: str | torch.device = "cpu") -> Any:
    """The ``RoamEnsemble`` of a run, one checkpoint or a list of checkpoints."""
    from msfm.models.roam.ensemble import ensemble_for

    return ensemble_for(source, device=device)


@deprecated("msfm.roam.predict_slides", "msfm.roam.predict(features, checkpoint, slides=...).table")
def predict_slides(
    run_or_checkpoints: Any, features_dir: PathLike, slides: Any = None, **kwargs: Any
) -> pd.DataFrame:
    """The probability table of :func:`msfm.roam.predict` (old argument order: checkpoint first)."""
    from msfm.models.roam.prediction import predict

    return predict(features_dir, run_or_checkpoints, slides=slides, **kwargs).table


@deprecated("msfm.roam.write_heatmaps", "msfm.roam.heatmap(features, checkpoint, out=...)")
def write_heatmaps(checkpoint: Any, features: PathLike, out: PathLike, **kwargs: Any) -> list[dict[str, Any]]:
    """One record per slide, as before (old argument order: checkpoint, features, out; device ``cpu``)."""
    from msfm.models.roam.heatmaps import heatmap

    kwargs.setdefault("device", "cpu")
    return heatmap(features, checkpoint, out=out, **kwargs).table.to_dict("records")


@deprecated("msfm.roam.preprocess_slides", "msfm.roam.preprocess(slides, out, config=...).report")
def preprocess_slides(slides: Any, out_dir: PathLike, config: Any = None, **kwargs: Any) -> pd.DataFrame:
    """The report table of :func:`msfm.roam.preprocess`."""
    from msfm.models.roam.preprocessing import preprocess

    return preprocess(slides, out_dir, config=config, **kwargs).report
