"""Old GeST names kept for one release: each warns with the new call, then runs it.

``msfm.gest.<old>`` resolves here (see ``msfm/models/gest/__init__.py``); renamed names without a signature change
(``LoadedGest``, ``PerturbationResult``) point straight at the new object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anndata import AnnData

from msfm.runtime.deprecation import deprecated
from msfm.runtime.loaded import Loaded

__all__ = ["annotate_niches", "evaluate_generation", "load_model", "train_niche_classifier"]


@deprecated("msfm.gest.load_model", "msfm.gest.load")
def load_model(path: Any, *, device: str = "auto") -> Loaded:
    """Load a GeST checkpoint (now :func:`msfm.gest.load`; window settings: :func:`msfm.gest.window_settings`)."""
    from msfm.models.gest.checkpoint import load

    return load(path, device=device)


@deprecated(
    "msfm.gest.train_niche_classifier(adata, checkpoint, out, config)",
    "msfm.gest.fit_classifier(adata, checkpoint, labels_key=..., out=..., config=...)",
)
def train_niche_classifier(
    adata: AnnData, checkpoint: Any, out: str | os.PathLike[str], config: Any, *, cells: Any = None
) -> Path:
    """Fine-tune a niche classifier; returns ``out/model`` as before (now :func:`msfm.gest.fit_classifier`)."""
    from msfm.models.gest.classifier import NicheClassifierConfig, fit_classifier

    settings = (
        config if isinstance(config, NicheClassifierConfig) else NicheClassifierConfig.model_validate(config)
    )
    if settings.labels_key is None:
        from msfm.errors import MsfmInputError

        msg = "The NicheClassifierConfig has no labels_key (label_key); name the obs column of the labels."
        raise MsfmInputError(msg)
    result = fit_classifier(
        adata, checkpoint, labels_key=settings.labels_key, out=out, config=settings, cells=cells
    )
    return result.checkpoint


@deprecated(
    "msfm.gest.annotate_niches",
    "msfm.gest.predict (labels in obs['gest_<labels_key>'], obs['gest_confidence'], obsm['gest_probs'])",
)
def annotate_niches(
    adata: AnnData,
    checkpoint: Any,
    *,
    batch_size: int = 64,
    device: str = "auto",
    key_added: str = "gest",
    copy: bool = False,
    **read_options: Any,
) -> AnnData | None:
    """Predict niche labels (now :func:`msfm.gest.predict`); returns the AnnData only with ``copy=True``."""
    from msfm.models.gest.classifier import predict

    if (
        key_added == "gest_niche_label"
    ):  # the old default was a full obs column name; the prefix is now "gest"
        key_added = "gest"
    result = predict(
        adata,
        checkpoint,
        key_added=key_added,
        batch_size=batch_size,
        device=device,
        copy=copy,
        **read_options,
    )
    return result if copy else None


@deprecated("msfm.gest.evaluate_generation", "msfm.gest.evaluate")
def evaluate_generation(adata: AnnData, checkpoint: Any, **kwargs: Any) -> Any:
    """Score held-out generation against baselines (now :func:`msfm.gest.evaluate`)."""
    from msfm.models.gest.evaluation import evaluate

    return evaluate(adata, checkpoint, **kwargs)
