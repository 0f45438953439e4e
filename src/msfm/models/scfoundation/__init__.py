"""scFoundation (xTrimoGene): read-depth-aware single-cell foundation model.

Hao et al., "Large-scale foundation model on single-cell transcriptomics", Nature Methods 21 (2024);
Gong et al., "xTrimoGene", NeurIPS 2023. Architecture and checkpoint layout follow the official
repository (biomap-research/scFoundation, commit d09626a), re-implemented from its description.

Public API (``data`` is an AnnData or a path; ``checkpoint`` a directory, a ``TrainResult`` or a ``Loaded``)::

    convert(official, out, variant="cell")           # official models.ckpt -> msfm checkpoint directory
    load(checkpoint)                                 # -> msfm.runtime.Loaded (vocab = the gene panel)
    embed(data, checkpoint)                          # obsm["X_scfoundation"]
    enhance(data, checkpoint)                        # layers["scfoundation_enhanced"]
    embed_genes(data, checkpoint, genes=[...])       # -> GeneEmbeddings
    train(data, out, config=..., **overrides)        # pretraining -> TrainResult
    fit_classifier(data, checkpoint, labels_key=..., out=...)   # -> TrainResult
    predict(data, classifier)                        # obs["scfoundation_<labels_key>"], obsm["scfoundation_probs"]
    perturb_fit(data, checkpoint, out=..., condition_key="condition", control="ctrl")  # GEARS-style head
    perturb(data, perturb_model, conditions=[...])   # -> AnnData of predicted mean profiles per condition
    gene_network(data, checkpoint, gene_sets="x.gmt")  # -> AnnData over genes: modules, kNN graph, enrichment
    drug_fit(bulk, checkpoint, responses=..., drugs=..., out=...)  # DeepCDR-style ln(IC50), 5-fold CV -> TrainResult
    drug_predict(bulk, drug_model)                   # obsm["scfoundation_ic50"] (cell lines x drugs)
    sensitivity_fit(bulk, checkpoint, single_cells=cells, bulk_labels_key=..., out=...)  # SCAD-style -> TrainResult
    sensitivity_predict(cells, sensitivity_model)    # obs["scfoundation_sensitive"], ..._sensitivity_confidence
"""

from __future__ import annotations

import importlib
from typing import Any

from msfm._lazy import lazy_exports
from msfm.runtime.deprecation import moved_names, warn_deprecated

_API = {
    "load": "msfm.models.scfoundation.loading",
    "convert": "msfm.models.scfoundation.conversion",
    "train": "msfm.models.scfoundation.pretraining",
    "embed": "msfm.models.scfoundation.embedding",
    "enhance": "msfm.models.scfoundation.enhancement",
    "embed_genes": "msfm.models.scfoundation.gene_context",
    "fit_classifier": "msfm.models.scfoundation.annotation",
    "predict": "msfm.models.scfoundation.annotation",
    "perturb_fit": "msfm.models.scfoundation.perturbation",
    "perturb": "msfm.models.scfoundation.perturb_predict",
    "gene_network": "msfm.models.scfoundation.network_inference",
    "drug_fit": "msfm.models.scfoundation.drug_response",
    "drug_predict": "msfm.models.scfoundation.drug_response",
    "sensitivity_fit": "msfm.models.scfoundation.drug_sensitivity",
    "sensitivity_predict": "msfm.models.scfoundation.drug_sensitivity",
    "Loaded": "msfm.runtime.loaded",
    "GeneEmbeddings": "msfm.models.scfoundation.gene_context",
    "ScFoundationTrainConfig": "msfm.models.scfoundation.pretraining",
    "ScFoundation": "msfm.models.scfoundation.model",
    "ScFoundationConfig": "msfm.models.scfoundation.config",
    "tokenizer_for": "msfm.models.scfoundation.loading",
}

# Old names, one release: functions warn when called (wrappers translate the old call), the rest on access.
_WRAPPED = (
    "pretrain",
    "embed_file",
    "embed_distributed",
    "gene_embeddings",
    "predict_cell_types",
    "load_model",
)
_MOVED = {"LoadedModel": "msfm.runtime.loaded:Loaded"}
_RENAMED_CLASSES = {
    "PretrainRunConfig": "msfm.scfoundation.ScFoundationTrainConfig (or train(config=..., **overrides))"
}

__all__ = sorted(_API)

_lazy_getattr, __dir__ = lazy_exports("msfm.models.scfoundation", _API, globals())
_moved_getattr = moved_names("msfm.scfoundation", _MOVED)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return _moved_getattr(name)
    if name in _WRAPPED or name in _RENAMED_CLASSES:
        if name in _RENAMED_CLASSES:
            warn_deprecated(f"msfm.scfoundation.{name}", _RENAMED_CLASSES[name])
        return getattr(importlib.import_module("msfm.models.scfoundation._deprecated"), name)
    return _lazy_getattr(name)
