"""GeST: a GPT-like generative model of spatial transcriptomics (generate expression at positions).

Re-implemented from the paper (GeST, bioRxiv 2025; no public code or weights). Choices where the paper is silent
(width, vocabulary size, ordering, position scale, perturbation magnitude) are parameters, documented in
``docs/gest.md``.

Public API::

    train(adata, run_dir, GestTrainConfig(...))             # vocabulary + windows + decoder -> run_dir/model
    generate(adata, ckpt, query=mask)                       # expression at held-out or new positions
    embed(adata, ckpt)                                      # obsm['X_gest'] niche embeddings
    cluster_niches(adata, method="kmeans", n_clusters=8)    # obs['gest_niche']
    train_niche_classifier(adata, ckpt, run, NicheClassifierConfig(label_key=...)); annotate_niches(...)
    perturb(adata, ckpt, region_box=..., genes_up=[...])    # in-silico spatial perturbation
    evaluate_generation(adata, ckpt, held_out=mask)         # GeST vs kNN-mean / MLP / GP baselines
"""

from __future__ import annotations

from msfm._lazy import lazy_exports

_API = {
    "Gest": "msfm.models.gest.model",
    "GestOutput": "msfm.models.gest.model",
    "GestNicheClassifier": "msfm.models.gest.model",
    "GestConfig": "msfm.models.gest.config",
    "GestLossConfig": "msfm.models.gest.objective",
    "gest_objective": "msfm.models.gest.objective",
    "generate_cells": "msfm.models.gest.generation",
    "LoadedGest": "msfm.models.gest.checkpoint",
    "load_model": "msfm.models.gest.checkpoint",
    "save_model": "msfm.models.gest.checkpoint",
    "GestTrainConfig": "msfm.models.gest.train",
    "train": "msfm.models.gest.train",
    "generate": "msfm.models.gest.api",
    "generate_arrays": "msfm.models.gest.api",
    "embed": "msfm.models.gest.api",
    "cluster_niches": "msfm.models.gest.api",
    "perturb": "msfm.models.gest.perturb",
    "PerturbationResult": "msfm.models.gest.perturb",
    "NicheClassifierConfig": "msfm.models.gest.finetune",
    "train_niche_classifier": "msfm.models.gest.finetune",
    "annotate_niches": "msfm.models.gest.finetune",
    "evaluate_generation": "msfm.models.gest.evaluate",
    "held_out_windows": "msfm.models.gest.evaluate",
    "evaluate_niches": "msfm.models.gest.evaluate",
}

__all__ = sorted(_API)

__getattr__, __dir__ = lazy_exports("msfm.models.gest", _API, globals())
