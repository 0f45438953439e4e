"""Old scFoundation names, kept for one release: each translates the old call into the new one and warns.

=========================  ==========================================================
old                        new
=========================  ==========================================================
``pretrain``               ``train`` (returns a ``TrainResult``)
``PretrainRunConfig``      ``ScFoundationTrainConfig`` (built with ``build_settings``)
``embed_file``             ``embed(data, checkpoint, out=...)``
``embed_distributed``      ``embed(data, checkpoint, out=..., devices=...)``
``gene_embeddings``        ``embed_genes`` (returns ``GeneEmbeddings``)
``predict_cell_types``     ``predict`` (``obs["<key>_<labels_key>"]``, ``obsm["<key>_probs"]``)
``load_model``             ``load`` (returns ``msfm.runtime.Loaded``; the panel is ``.vocab``)
=========================  ==========================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData
from pydantic import model_validator

from msfm.models.scfoundation.pretraining import ScFoundationTrainConfig
from msfm.runtime.config import build_settings
from msfm.runtime.deprecation import deprecated
from msfm.runtime.loaded import Loaded

__all__ = [
    "PretrainRunConfig",
    "embed_distributed",
    "embed_file",
    "gene_embeddings",
    "load_model",
    "predict_cell_types",
    "pretrain",
]

_OLD_READ_FIELDS = ("layer", "gene_column", "species", "use_aliases")


class PretrainRunConfig(ScFoundationTrainConfig):
    """:class:`ScFoundationTrainConfig` with the old top-level reading fields and ``with_overrides``/``from_file``."""

    @model_validator(mode="before")
    @classmethod
    def _old_read_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in _OLD_READ_FIELDS):
            data = dict(data)
            moved = {k: data.pop(k) for k in _OLD_READ_FIELDS if k in data}
            data["read"] = {**dict(data.get("read") or {}), **moved}
        return data

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PretrainRunConfig:
        """Read a YAML or JSON file with these fields."""
        return build_settings(cls, file=path)

    def with_overrides(self, flat: dict[str, Any], *, progress_bar: bool | None = None) -> PretrainRunConfig:
        """Flat overrides (``max_steps``, ``lr``, ``devices`` ...), routed by ``build_settings``."""
        extra = {} if progress_bar is None else {"progress_bar": progress_bar}
        return build_settings(type(self), base=self, overrides={**flat, **extra})


@deprecated("msfm.scfoundation.pretrain", "msfm.scfoundation.train(data, out, config=..., **overrides)")
def pretrain(data: Any, out: str | os.PathLike[str], config: Any = None, *, callbacks: Any = ()) -> Path:
    """Returns ``RUN_DIR/model`` as before."""
    from msfm.models.scfoundation.pretraining import train

    return train(data, out, config=config, callbacks=callbacks).checkpoint


def _obsm_prefix(key_added: str) -> str:
    # The old key_added was the obsm key itself ("X_scfoundation"); the new one is the prefix ("scfoundation").
    return key_added[2:] if key_added.startswith("X_") else key_added


@deprecated("msfm.scfoundation.embed_file", "msfm.scfoundation.embed(data, checkpoint, out=...)")
def embed_file(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    checkpoint: Any,
    *,
    key_added: str = "X_scfoundation",
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Returns ``out`` as before."""
    from msfm.models.scfoundation.embedding import embed

    result = embed(
        data, checkpoint, out=out, overwrite=overwrite, key_added=_obsm_prefix(key_added), **kwargs
    )
    if result.isbacked:
        result.file.close()
    return Path(out)


@deprecated(
    "msfm.scfoundation.embed_distributed", "msfm.scfoundation.embed(data, checkpoint, out=..., devices=...)"
)
def embed_distributed(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    checkpoint: Any,
    *,
    devices: int | str | list[int] = "auto",
    key_added: str = "X_scfoundation",
    work_dir: Any = None,
    **kwargs: Any,
) -> Path | None:
    """Returns ``out`` on global rank 0 and None on the other ranks, as before (``work_dir`` is ignored)."""
    from msfm.models.scfoundation.embedding import embed
    from msfm.runtime.devices import rank_world

    result = embed(data, checkpoint, out=out, devices=devices, key_added=_obsm_prefix(key_added), **kwargs)
    if result.isbacked:
        result.file.close()
    return Path(out) if rank_world()[0] == 0 else None


@deprecated("msfm.scfoundation.gene_embeddings", "msfm.scfoundation.embed_genes")
def gene_embeddings(adata: AnnData, checkpoint: Any, **kwargs: Any) -> np.ndarray | Path:
    """Returns the array, or the path of the HDF5 file with ``out=``, as before."""
    from msfm.models.scfoundation.gene_context import embed_genes

    result = embed_genes(adata, checkpoint, **kwargs)
    return result.path if result.path is not None else result.embeddings


@deprecated("msfm.scfoundation.predict_cell_types", "msfm.scfoundation.predict")
def predict_cell_types(
    adata: AnnData, classifier: Any, *, key_added: str = "scfoundation_cell_type", **kwargs: Any
) -> None:
    """Writes ``obs[key_added]``, ``obs[key_added + "_confidence"]`` and ``obsm[key_added + "_proba"]`` as before."""
    from msfm.models.scfoundation.annotation import predict

    predict(adata, classifier, key_added=key_added, **kwargs)
    labels_key = adata.uns[key_added]["predict"]["params"]["labels_key"]
    adata.obs[key_added] = adata.obs.pop(f"{key_added}_{labels_key}")
    adata.obsm[f"{key_added}_proba"] = adata.obsm.pop(f"{key_added}_probs")


@deprecated("msfm.scfoundation.load_model", "msfm.scfoundation.load")
def load_model(checkpoint: Any, *, device: str = "auto") -> Loaded:
    """Returns a ``msfm.runtime.Loaded`` (the gene panel is ``.vocab``)."""
    from msfm.models.scfoundation.loading import load

    return load(checkpoint, device=device)
