"""Old scMulan names and call shapes, kept for one release: each translates the old call into the new verb.

``msfm.scmulan.annotate`` / ``predict_organ`` / ``load_model`` warn and call ``predict`` / ``predict(target=
"organ")`` / ``load``; :mod:`msfm.models.scmulan.api` (the old module) uses the translators below, which keep the
old argument order (``generate(checkpoint, prompts)``) and the old return values (``None`` without ``copy=True``,
``perturb``'s ``(cells, scores)`` tuple, ``perturb_screen``'s table).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from anndata import AnnData

from msfm.models.scmulan.annotation import embed, predict
from msfm.models.scmulan.generation import generate
from msfm.models.scmulan.loading import Checkpoint, load
from msfm.models.scmulan.perturbation import perturb, perturb_screen
from msfm.runtime.deprecation import deprecated
from msfm.runtime.loaded import Loaded

__all__ = ["annotate", "load_model", "predict_organ"]


def annotate_call(
    adata: AnnData, checkpoint: Checkpoint, *, copy: bool = False, **kwargs: Any
) -> AnnData | None:
    """The old ``annotate``: ``predict(target="cell_type")``, returning None unless ``copy=True``."""
    out = predict(adata, checkpoint, target="cell_type", copy=copy, **kwargs)
    return out if copy else None


def predict_organ_call(
    adata: AnnData, checkpoint: Checkpoint, *, copy: bool = False, **kwargs: Any
) -> AnnData | None:
    """The old ``predict_organ``: ``predict(target="organ")``, returning None unless ``copy=True``."""
    out = predict(adata, checkpoint, target="organ", copy=copy, **kwargs)
    return out if copy else None


def embed_call(
    adata: AnnData, checkpoint: Checkpoint, *, copy: bool = False, **kwargs: Any
) -> AnnData | None:
    """The old ``embed``, returning None unless ``copy=True``."""
    out = embed(adata, checkpoint, copy=copy, **kwargs)
    return out if copy else None


def generate_call(checkpoint: Checkpoint, prompts: Any, **kwargs: Any) -> AnnData:
    """The old ``generate(checkpoint, prompts)``."""
    return generate(prompts, checkpoint, **kwargs)


def perturb_call(
    checkpoint: Checkpoint,
    prompt: Mapping[str, Any],
    genes: str | Sequence[str],
    levels: Iterable[int] = range(0, 11),
    **kwargs: Any,
) -> tuple[AnnData, pd.DataFrame]:
    """The old ``perturb(checkpoint, prompt, genes, levels)`` returning ``(cells, scores)``."""
    result = perturb(prompt, checkpoint, genes=genes, levels=levels, **kwargs)
    return result.cells, result.scores


def perturb_screen_call(
    checkpoint: Checkpoint, prompt: Mapping[str, Any], genes: str | Sequence[str] | None = None, **kwargs: Any
) -> pd.DataFrame:
    """The old ``perturb_screen(checkpoint, prompt, genes)`` returning the ranked table."""
    return perturb_screen(prompt, checkpoint, genes=genes, **kwargs).scores


@deprecated("msfm.scmulan.annotate", "msfm.scmulan.predict(data, checkpoint)")
def annotate(adata: AnnData, checkpoint: Checkpoint, **kwargs: Any) -> AnnData | None:
    return annotate_call(adata, checkpoint, **kwargs)


@deprecated("msfm.scmulan.predict_organ", "msfm.scmulan.predict(data, checkpoint, target='organ')")
def predict_organ(adata: AnnData, checkpoint: Checkpoint, **kwargs: Any) -> AnnData | None:
    return predict_organ_call(adata, checkpoint, **kwargs)


@deprecated("msfm.scmulan.load_model", "msfm.scmulan.load(checkpoint, device=...)")
def load_model(checkpoint: Checkpoint, *, device: str = "auto") -> Loaded:
    return load(checkpoint, device=device)
