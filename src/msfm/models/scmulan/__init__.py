"""scMulan: a multitask generative GPT over cell sentences.

Bian, Chen, Dong et al., "scMulan: a multitask generative pre-trained language model for single-cell
analysis", RECOMB 2024 (bioRxiv 10.1101/2024.01.25.577152). Architecture, vocabulary and checkpoint layout
follow the official release (SuperBianC/scMulan, commit d64da5e), re-implemented from its description.

Public API (AnnData in, AnnData out)::

    convert(official_ckpt, out_dir)
    annotate(adata, checkpoint)              # obs["scmulan_cell_type"], obsm["X_scmulan"]
    predict_organ(adata, checkpoint)         # obs["scmulan_organ"], obs["scmulan_region"]
    generate(checkpoint, prompts)            # AnnData of generated cells
    perturb(checkpoint, prompt, genes, ...)  # in-silico perturbation with centroid-shift scores
    train(adata, out_dir, ScMulanTrainConfig(...))
"""

from __future__ import annotations

from msfm._lazy import lazy_exports

_API = {
    "ScMulan": "msfm.models.scmulan.model",
    "ScMulanConfig": "msfm.models.scmulan.config",
    "load_official_checkpoint": "msfm.models.scmulan.official",
    "generate_tokens": "msfm.models.scmulan.decoding",
    "DecodeOptions": "msfm.models.scmulan.decoding",
    "convert": "msfm.models.scmulan.api",
    "annotate": "msfm.models.scmulan.api",
    "embed": "msfm.models.scmulan.api",
    "predict_organ": "msfm.models.scmulan.api",
    "smooth_labels": "msfm.models.scmulan.api",
    "generate": "msfm.models.scmulan.api",
    "perturb": "msfm.models.scmulan.api",
    "perturb_screen": "msfm.models.scmulan.api",
    "next_state": "msfm.models.scmulan.api",
    "LoadedScMulan": "msfm.models.scmulan.inference",
    "load_model": "msfm.models.scmulan.inference",
    "train": "msfm.models.scmulan.train",
    "ScMulanTrainConfig": "msfm.models.scmulan.train",
    "ScMulanLossConfig": "msfm.models.scmulan.objective",
}

__all__ = sorted(_API)

__getattr__, __dir__ = lazy_exports("msfm.models.scmulan", _API, globals())
