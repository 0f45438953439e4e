"""GeST: a GPT-like generative model of spatial transcriptomics (generate expression at positions).

Re-implemented from the paper (GeST, bioRxiv 2025; no public code or weights). Choices where the paper is silent
(width, vocabulary size, ordering, position scale, perturbation magnitude) are parameters, documented in
``docs/gest.md``.

Public API (``import msfm`` then ``msfm.gest.<verb>``; every verb takes ``data`` = an AnnData, a file or a Visium
folder, and the reading options of :class:`msfm.data.SpatialReadOptions` as keyword arguments)::

    run = train(adata, "runs/g", max_steps=2000, pre_normalized=True)   # TrainResult; RUN/model
    gen = generate(adata, run, query="held_out", mode="weighted")       # AnnData of generated cells
    embed(adata, run)                                                   # obsm['X_gest']
    cluster_niches(adata, n_clusters=8)                                 # obs['gest_niche']
    res = perturb(adata, run, region_box=(x0, y0, x1, y1), genes_up=["KRT14"])  # GestPerturbation
    clf = fit_classifier(adata, run, labels_key="region", out="runs/niche")
    predict(adata, clf)                                                 # obs['gest_region'], obsm['gest_probs']
    ev = evaluate(adata, run, held_out="held_out")                      # GenerationEvaluation vs baselines
"""

from __future__ import annotations

from msfm._lazy import lazy_exports
from msfm.runtime.deprecation import moved_names

_API = {
    # verbs
    "load": "msfm.models.gest.checkpoint",
    "train": "msfm.models.gest.pretrain",
    "generate": "msfm.models.gest.generation",
    "embed": "msfm.models.gest.niches",
    "cluster_niches": "msfm.models.gest.niches",
    "perturb": "msfm.models.gest.perturbation",
    "fit_classifier": "msfm.models.gest.classifier",
    "predict": "msfm.models.gest.classifier",
    "evaluate": "msfm.models.gest.evaluation",
    # types and settings
    "Loaded": "msfm.runtime.loaded",
    "GestConfig": "msfm.models.gest.config",
    "GestTrainConfig": "msfm.models.gest.pretrain",
    "NicheClassifierConfig": "msfm.models.gest.classifier",
    "GenerationOptions": "msfm.models.gest.options",
    "GestPerturbation": "msfm.models.gest.perturbation",
    "GenerationEvaluation": "msfm.models.gest.evaluation",
    "WindowSettings": "msfm.models.gest.checkpoint",
    # helpers
    "window_settings": "msfm.models.gest.checkpoint",
    "save_model": "msfm.models.gest.checkpoint",
    "generate_arrays": "msfm.models.gest.generation",
    "held_out_windows": "msfm.models.gest.evaluation",
    "evaluate_niches": "msfm.models.gest.evaluation",
    # network
    "Gest": "msfm.models.gest.model",
    "GestOutput": "msfm.models.gest.model",
    "GestNicheClassifier": "msfm.models.gest.model",
    "GestLossConfig": "msfm.models.gest.objective",
    "gest_objective": "msfm.models.gest.objective",
    "generate_cells": "msfm.models.gest.generation",
}

# Old names (one release, with a DeprecationWarning naming the new call). Renamed objects warn on access; the
# wrappers of changed signatures (models/gest/_deprecated.py) warn on every call.
_RENAMED = {
    "LoadedGest": "msfm.runtime.loaded:Loaded",
    "PerturbationResult": "msfm.models.gest.perturbation:GestPerturbation",
}
_WRAPPED = {
    "load_model": "msfm.models.gest._deprecated",
    "train_niche_classifier": "msfm.models.gest._deprecated",
    "annotate_niches": "msfm.models.gest._deprecated",
    "evaluate_generation": "msfm.models.gest._deprecated",
}

__all__ = sorted(_API)

_lazy_getattr, __dir__ = lazy_exports("msfm.models.gest", {**_API, **_WRAPPED}, globals())
_renamed_getattr = moved_names("msfm.gest", _RENAMED)


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        return _renamed_getattr(name)
    return _lazy_getattr(name)
