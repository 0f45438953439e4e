"""scMulan: a multitask generative GPT over cell sentences.

Bian, Chen, Dong et al., "scMulan: a multitask generative pre-trained language model for single-cell
analysis", RECOMB 2024 (bioRxiv 10.1101/2024.01.25.577152). Architecture, vocabulary and checkpoint layout
follow the official release (SuperBianC/scMulan, commit d64da5e), re-implemented from its description.

Public API (``import msfm``, then ``msfm.scmulan.<verb>``)::

    convert(official, out)                        # official ckpt_scMulan.pt -> msfm checkpoint directory
    load(checkpoint)                              # Loaded (vocab = the CellSentenceVocab)
    predict(adata, checkpoint)                    # obs scmulan_cell_type(_fine), scmulan_confidence; obsm X_scmulan
    predict(adata, checkpoint, target="organ")    # obs scmulan_organ, scmulan_region, scmulan_organ_confidence
    embed(adata, checkpoint)                      # obsm X_scmulan
    smooth_labels(adata)                          # kNN vote on the predicted labels
    generate(prompts, checkpoint)                 # AnnData of generated cells
    perturb(prompt, checkpoint, genes=[...])      # ScMulanPerturbation(cells, scores)
    perturb_screen(prompt, checkpoint)            # ScMulanScreen(scores): genes ranked by their effect
    next_state(adata, checkpoint)                 # AnnData: each cell's next state (next_state-trained models)
    train(adata, out, checkpoint=None, **settings)  # TrainResult

Decoding options (``greedy``, ``temperature``, ``top_k``, ``end_weight``, ``max_new_tokens``, ``repeat_mask``,
``constrained``, ``seed``) are declared once, in :class:`DecodeOptions`; reading options once, in
:class:`msfm.data.CellReadOptions`. Both are keyword arguments of the verbs.
"""

from __future__ import annotations

from msfm._lazy import lazy_exports
from msfm.runtime.deprecation import moved_names

_API = {
    # verbs
    "load": "msfm.models.scmulan.loading",
    "convert": "msfm.models.scmulan.conversion",
    "train": "msfm.models.scmulan.training",
    "predict": "msfm.models.scmulan.annotation",
    "embed": "msfm.models.scmulan.annotation",
    "generate": "msfm.models.scmulan.generation",
    "perturb": "msfm.models.scmulan.perturbation",
    "perturb_screen": "msfm.models.scmulan.perturbation",
    "next_state": "msfm.models.scmulan.transition",
    "smooth_labels": "msfm.models.scmulan.smoothing",
    # types and helpers
    "Loaded": "msfm.runtime.loaded",
    "tokenizer_for": "msfm.models.scmulan.loading",
    "DecodeOptions": "msfm.models.scmulan.decoding",
    "ScMulanPerturbation": "msfm.models.scmulan.perturbation",
    "ScMulanScreen": "msfm.models.scmulan.perturbation",
    "ScMulanTrainConfig": "msfm.models.scmulan.train_config",
    "ScMulanLossConfig": "msfm.models.scmulan.objective",
    "ScMulan": "msfm.models.scmulan.model",
    "ScMulanConfig": "msfm.models.scmulan.config",
    "load_official_checkpoint": "msfm.models.scmulan.official",
    "generate_tokens": "msfm.models.scmulan.decoding",
}

# Old names, one release: wrappers that warn and translate the call.
_OLD = {
    "annotate": "msfm.models.scmulan._deprecated",
    "predict_organ": "msfm.models.scmulan._deprecated",
    "load_model": "msfm.models.scmulan._deprecated",
}
_MOVED = {"LoadedScMulan": "msfm.runtime.loaded:Loaded"}

__all__ = sorted(_API)

_lazy_getattr, __dir__ = lazy_exports("msfm.models.scmulan", {**_API, **_OLD}, globals())
_moved_getattr = moved_names("msfm.scmulan", _MOVED)


def __getattr__(name: str) -> object:
    if name in _MOVED:
        return _moved_getattr(name)
    return _lazy_getattr(name)
