"""ROAM: multi-scale ROI transformer with class-specific gated-attention MIL for whole-slide images.

Jiang, Yin, Yang et al., "A transformer-based weakly supervised computational pathology method for
clinical-grade diagnosis and molecular marker discovery of gliomas", *Nat Mach Intell* 6, 876-891 (2024).
Re-implemented from its description; the official code (GPL-3.0) is not used. See ``docs/roam.md``.

Public API::

    preprocess_slides(slides, out_dir, PreprocessConfig(...))   # slides -> out_dir/features/<id>.h5
    train(table, features_dir, run_dir, RoamTrainConfig(task=...))  # K-fold CV, fold ensembles, metrics
    predict_slides(run_dir, features_dir)                        # mean softmax over folds
    cascade([CascadeStage(...), ...], features_dir)              # detection -> subtyping -> markers
    write_heatmaps(run_dir, features_dir, out_dir)              # heatmaps, galleries, ROI maps per slide
    slide_attention_scores / slide_heatmap / top_roi_gallery / roi_attention_maps   # building blocks
    convert_official("ROAM_split0.pth", out_dir)                 # released checkpoints
"""

from __future__ import annotations

from msfm._lazy import lazy_exports

_API = {
    "Roam": "msfm.models.roam.model",
    "RoamOutput": "msfm.models.roam.model",
    "RoamConfig": "msfm.models.roam.config",
    "load_official_checkpoint": "msfm.models.roam.official",
    "convert_official": "msfm.models.roam.checkpoint",
    "load_model": "msfm.models.roam.checkpoint",
    "save_model": "msfm.models.roam.checkpoint",
    "build_encoder": "msfm.models.roam.encoders",
    "available_encoders": "msfm.models.roam.encoders",
    "register_encoder": "msfm.models.roam.encoders",
    "read_slide_features": "msfm.models.roam.features",
    "write_slide_features": "msfm.models.roam.features",
    "SlideFeatures": "msfm.models.roam.features",
    "PreprocessConfig": "msfm.models.roam.preprocess",
    "preprocess_slides": "msfm.models.roam.preprocess",
    "RoamTrainConfig": "msfm.models.roam.train",
    "train": "msfm.models.roam.train",
    "predict_slides": "msfm.models.roam.predict",
    "load_ensemble": "msfm.models.roam.predict",
    "CascadeStage": "msfm.models.roam.predict",
    "cascade": "msfm.models.roam.predict",
    "roi_attention_maps": "msfm.models.roam.interpret",
    "roi_heatmap": "msfm.models.roam.interpret",
    "slide_attention_scores": "msfm.models.roam.interpret",
    "slide_heatmap": "msfm.models.roam.interpret",
    "top_roi_gallery": "msfm.models.roam.interpret",
    "write_heatmaps": "msfm.models.roam.heatmaps",
}

__all__ = sorted(_API)

__getattr__, __dir__ = lazy_exports("msfm.models.roam", _API, globals())
