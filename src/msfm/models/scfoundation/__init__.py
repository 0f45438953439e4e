"""scFoundation (xTrimoGene): read-depth-aware single-cell foundation model.

Hao et al., "Large-scale foundation model on single-cell transcriptomics", Nature Methods 21 (2024);
Gong et al., "xTrimoGene", NeurIPS 2023. Architecture and checkpoint layout follow the official
repository (biomap-research/scFoundation, commit d09626a), re-implemented from its description.

Public API (AnnData in, AnnData out)::

    convert(official_ckpt, out_dir, variant="cell")
    embed(adata, checkpoint)                 # obsm["X_scfoundation"]
    enhance(adata, checkpoint)               # layers["scfoundation_enhanced"]
    gene_embeddings(adata, checkpoint, genes=[...], out="genes.h5")
    pretrain(paths, out_dir, PretrainRunConfig(...))
    fit_classifier(adata, checkpoint, labels_key=..., out=...)
    predict_cell_types(adata, classifier_dir)
"""

from __future__ import annotations

from msfm._lazy import lazy_exports

_API = {
    "convert": "msfm.models.scfoundation.api",
    "embed": "msfm.models.scfoundation.api",
    "embed_file": "msfm.models.scfoundation.api",
    "embed_distributed": "msfm.models.scfoundation.api",
    "enhance": "msfm.models.scfoundation.api",
    "gene_embeddings": "msfm.models.scfoundation.api",
    "load_model": "msfm.models.scfoundation.inference",
    "pretrain": "msfm.models.scfoundation.train",
    "PretrainRunConfig": "msfm.models.scfoundation.train",
    "fit_classifier": "msfm.models.scfoundation.train",
    "predict_cell_types": "msfm.models.scfoundation.train",
    "ScFoundation": "msfm.models.scfoundation.model",
    "ScFoundationConfig": "msfm.models.scfoundation.config",
}

__all__ = sorted(_API)

__getattr__, __dir__ = lazy_exports("msfm.models.scfoundation", _API, globals())
