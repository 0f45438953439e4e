"""ROAM: multi-scale ROI transformer with class-specific gated-attention MIL for whole-slide images.

Jiang, Yin, Yang et al., "A transformer-based weakly supervised computational pathology method for
clinical-grade diagnosis and molecular marker discovery of gliomas", *Nat Mach Intell* 6, 876-891 (2024).
Re-implemented from its description; the official code (GPL-3.0) is not used. See ``docs/roam.md``.

Public API (``import msfm``; ``data`` is a feature folder, ``checkpoint`` a run, checkpoint or ``Loaded``)::

    prep = msfm.roam.preprocess(slides, "prep/", encoder="resnet50_trunc", weights="r50.pth")  # -> features/
    run = msfm.roam.train(prep, "runs/subtype", slides="cohort.csv", task="subtype")  # K-fold CV, fold ensemble
    preds = msfm.roam.predict(prep, run)                  # .table: mean softmax over the folds
    msfm.roam.evaluate(preds, "cohort.csv", task="subtype")
    msfm.roam.cascade(prep, ["detection=runs/det", "subtyping=runs/sub:detection==tumour"])
    msfm.roam.heatmap(prep, run, out="heat/")             # heatmaps, galleries, ROI maps per slide
    msfm.roam.convert("ROAM_split0.pth", "roam_fold0")    # released checkpoints
    msfm.roam.load(run)                                   # Loaded (model: Roam or RoamEnsemble)

Building blocks: ``slide_attention_scores``, ``slide_heatmap``, ``top_roi_gallery``, ``roi_attention_maps``,
``roi_heatmap``, the patch encoders (``build_encoder``, ``register_encoder``) and feature files
(``read_slide_features``, ``write_slide_features``).
"""

from __future__ import annotations

import importlib
from typing import Any

from msfm._lazy import lazy_exports

_API = {
    # verbs
    "load": "msfm.models.roam.ensemble",
    "convert": "msfm.models.roam.checkpoint",
    "preprocess": "msfm.models.roam.preprocessing",
    "train": "msfm.models.roam.training",
    "predict": "msfm.models.roam.prediction",
    "cascade": "msfm.models.roam.cascades",
    "evaluate": "msfm.models.roam.evaluation",
    "heatmap": "msfm.models.roam.heatmaps",
    # what they return
    "Loaded": "msfm.runtime.loaded",
    "TrainResult": "msfm.runtime.results",
    "RoamEnsemble": "msfm.models.roam.ensemble",
    "PreprocessResult": "msfm.models.roam.preprocessing",
    "SlidePredictions": "msfm.models.roam.prediction",
    "CascadeResult": "msfm.models.roam.cascades",
    "EvaluationResult": "msfm.models.roam.evaluation",
    "HeatmapResult": "msfm.models.roam.heatmaps",
    # settings
    "RoamConfig": "msfm.models.roam.config",
    "PreprocessConfig": "msfm.models.roam.preprocess_config",
    "RoamTrainConfig": "msfm.models.roam.train_config",
    "CascadeStage": "msfm.models.roam.cascades",
    # model, checkpoints, feature files, encoders
    "Roam": "msfm.models.roam.model",
    "RoamOutput": "msfm.models.roam.model",
    "load_official_checkpoint": "msfm.models.roam.official",
    "save_model": "msfm.models.roam.checkpoint",
    "read_slide_features": "msfm.models.roam.features",
    "write_slide_features": "msfm.models.roam.features",
    "SlideFeatures": "msfm.models.roam.features",
    "build_encoder": "msfm.models.roam.encoders",
    "available_encoders": "msfm.models.roam.encoders",
    "register_encoder": "msfm.models.roam.encoders",
    # interpretation building blocks
    "roi_attention_maps": "msfm.models.roam.interpret",
    "roi_heatmap": "msfm.models.roam.interpret",
    "slide_attention_scores": "msfm.models.roam.interpret",
    "slide_heatmap": "msfm.models.roam.interpret",
    "top_roi_gallery": "msfm.models.roam.interpret",
}

# Old names: wrappers that warn (DeprecationWarning naming the new call) and run it; removed next release.
_DEPRECATED = (
    "convert_official",
    "load_ensemble",
    "load_model",
    "predict_slides",
    "preprocess_slides",
    "write_heatmaps",
)

__all__ = sorted(_API)

_lazy_getattr, __dir__ = lazy_exports("msfm.models.roam", _API, globals())


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        return getattr(importlib.import_module("msfm.models.roam._deprecated"), name)
    return _lazy_getattr(name)
