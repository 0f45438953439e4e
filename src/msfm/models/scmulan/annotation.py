"""Zero-shot prediction (cell type, or organ and region) and cell embeddings: ``predict`` and ``embed``.

Every cell becomes ``[meta words] + genes + task`` and is decoded greedily (:mod:`.cell_decode`). Results follow
the msfm naming convention with ``key`` = ``key_added`` (default ``"scmulan"``):

==========================  =====================================================================================
``target="cell_type"``      ``obs[key_cell_type]`` (coarse), ``obs[key_cell_type_fine]``, ``obs[key_confidence]``,
                            ``obsm[X_key]`` (the cell embedding); release mode also ``obs[key_generated]``
``target="organ"``          ``obs[key_organ]``, ``obs[key_region]``, ``obs[key_organ_confidence]``; release mode
                            also ``obs[key_organ_generated]``
``embed``                   ``obsm[X_key]``
==========================  =====================================================================================

``uns[key]["predict"][target]`` and ``uns[key]["embed"]`` hold the parameters, the checkpoint provenance, the input
kind and the gene-mapping report of each run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from torch import Tensor

from msfm.data import CellReadOptions, GeneMapping, as_anndata
from msfm.errors import MsfmInputError
from msfm.models.scmulan.cell_decode import (
    UNCLASSIFIED,
    CellDecode,
    Embedding,
    categorical,
    category_mask,
    check_embedding,
    decode_cells,
    generated_text,
    label_slots,
    meta_rows,
    prepare,
    token_names,
)
from msfm.models.scmulan.decoding import DecodeOptions, id_mask
from msfm.models.scmulan.loading import Checkpoint, load
from msfm.models.scmulan.smoothing import smooth_labels
from msfm.models.scmulan.verb_io import check_positive, record, split_options
from msfm.runtime.adata import check_key_added, field_key, obsm_key, store_uns
from msfm.runtime.devices import autocast_context
from msfm.runtime.h5ad import check_output, write_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.tokenizers.cell_sentence import ANNOTATE, ORGAN_REGION, CellSentenceVocab

__all__ = ["embed", "predict"]

Target = Literal["cell_type", "organ"]
#: The decoding options annotation takes: it decodes greedily, two steps (three in release mode).
DECODE = ("constrained", "repeat_mask")
DEFAULTS = {"repeat_mask": "official"}

CONFIDENCE_DOC = (
    "product over the two label steps of the probability the model gives the chosen token under its full, "
    "unconstrained softmax (no task constraint, no repeat ban); labels below min_confidence -> Unclassified"
)


def predict(
    data: AnnData | str | os.PathLike[str],
    checkpoint: Checkpoint,
    *,
    target: Target = "cell_type",
    key_added: str = "scmulan",
    min_confidence: float | None = None,
    meta: Mapping[str, str] | None = None,
    embedding: Embedding = "official",
    smoothing: bool = False,
    n_neighbors: int = 15,
    smoothing_threshold: float = 0.1,
    decoding: DecodeOptions | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    progress: bool = True,
    copy: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> AnnData:
    """Zero-shot cell type (coarse and fine, ``<PCT>``) or organ and region (``<SPToken3>``) of every cell.

    Each cell becomes ``[meta words] + genes + task`` and is decoded greedily.

    * ``constrained=True`` (default): two steps, restricted to the vocabulary's ``coarse_cell_type`` then
      ``cell_type`` (fine) tokens (both to their union when one category is missing); for organs, ``organ`` then
      ``region`` tokens. Labels are always tokens of the category (or ``Unclassified``).
    * ``constrained=False`` reproduces the release: free steps (three for cell types: the labels are words
      ``[-3:-1]`` of the sentence; two for organs); a word outside the expected category becomes
      ``Unclassified`` and the raw words go to ``obs[<key>_generated]`` / ``obs[<key>_organ_generated]``.

    Confidence: the product, over the two label steps, of the probability the model gives the chosen token under
    its **full, unconstrained** softmax (every vocabulary token, no constraint, no repeat ban). A cell from a
    tissue the model does not know spreads its mass over genes and other words, so it gets a low confidence
    instead of a confidently wrong label; cells below ``min_confidence`` are labelled ``Unclassified``. Cells with
    no expressed vocabulary gene are ``Unclassified`` with confidence 0 (and a zero embedding row).

    Args:
        data: cells x genes (raw counts, or log-normalised with ``pre_normalized=True``), or its file.
        checkpoint: msfm checkpoint directory (``convert``/``train``), a ``TrainResult`` or a ``Loaded``.
        target: ``"cell_type"`` or ``"organ"`` (organ, then region).
        key_added: prefix of what is written (see the module docstring).
        min_confidence: below this both labels become ``Unclassified`` (default 0.1 for cell types, 0 for
            organs; 0 keeps every label).
        meta: metadata words to prepend, ``{category: obs column}`` such as ``{"organ": "tissue"}``; values must
            be tokens of that category (NaN / ``Unclassified`` are left out).
        embedding: cell types only: ``"official"`` (hidden state at the generated coarse word, as released),
            ``"task"`` (at ``<PCT>``) or ``"mean"`` (mean over the prompt words).
        smoothing: cell types only: also run :func:`smooth_labels` on the fine labels (kNN vote in the
            embedding) with ``n_neighbors`` and its minimal winning weight ``smoothing_threshold``.
        decoding: a :class:`~msfm.models.scmulan.decoding.DecodeOptions`; or give ``constrained=`` and
            ``repeat_mask=`` (default ``"official"``: the release's non-cached model, fine may equal coarse) as
            keyword arguments.
        device: ``"auto"``, ``"cpu"``, ``"cuda:1"`` ...
        precision: ``"auto"`` (bf16 autocast where the device computes it fast, else fp32; see
            :func:`msfm.runtime.precision.resolve_precision`), ``"32"``, ``"bf16"`` or ``"16"``. The choice is
            recorded in ``uns[key_added]["predict"][target]["precision"]``.
        batch_size: cells per batch (``max_tokens`` caps cells x longest prompt per batch).
        progress: show a progress bar.
        copy: work on a copy of ``data`` instead of writing into it.
        out: also write the result to this ``.h5ad`` (atomically; ``overwrite`` to replace a file).
        options: decoding options (above) and reading options (:class:`~msfm.data.CellReadOptions`: ``layer``,
            ``pre_normalized``, ``gene_column``, ``species``, ``use_aliases``, ``min_panel_fraction``).

    Returns:
        The AnnData with the predictions (``data`` itself unless ``copy=True`` or ``data`` was a path).

    Raises:
        MsfmInputError: bad input (unknown option, missing checkpoint, metadata values that are not tokens ...).
    """
    key = check_key_added(key_added)
    if target not in ("cell_type", "organ"):
        msg = f"target must be 'cell_type' (coarse and fine cell type) or 'organ' (organ and region), got {target!r}."
        raise MsfmInputError(msg)
    embedding = check_embedding(embedding)
    canonical_precision(precision)
    if target == "organ" and smoothing:
        msg = "smoothing applies to cell-type labels; use target='cell_type' or smoothing=False."
        raise MsfmInputError(msg)
    threshold = (0.1 if target == "cell_type" else 0.0) if min_confidence is None else min_confidence
    if not float(threshold) >= 0.0:
        msg = (
            f"min_confidence must be >= 0 (0 keeps every label, above 1 rejects all), got {min_confidence!r}."
        )
        raise MsfmInputError(msg)
    opts, read = split_options(predict, options, decode=DECODE, defaults=DEFAULTS, base=decoding)
    batch_size = check_positive(batch_size, "batch_size")
    target_path = check_output(out, overwrite=overwrite, data=data)
    adata = as_anndata(data, copy=copy)
    loaded = load(checkpoint, device=device)
    choice = resolve_precision(precision, loaded.device)
    with autocast_context(loaded.device, choice.precision):
        if target == "cell_type":
            _cell_types(
                adata,
                loaded,
                key,
                opts,
                read,
                float(threshold),
                meta,
                embedding,
                batch_size,
                max_tokens,
                progress,
            )
        else:
            _organs(adata, loaded, key, opts, read, float(threshold), meta, batch_size, max_tokens, progress)
    adata.uns[key]["predict"][target]["precision"] = choice.record()
    if smoothing:
        smooth_labels(adata, key_added=key, n_neighbors=n_neighbors, threshold=smoothing_threshold)
    write_output(adata, target_path, data, replace=overwrite)
    return adata


def _store_predict(adata: AnnData, key: str, target: str, rec: dict[str, Any]) -> None:
    """``uns[key]["predict"][target] = rec``, keeping the other target's record."""
    current = adata.uns.get(key, {})
    previous = current.get("predict") if isinstance(current, Mapping) else None
    merged = dict(previous) if isinstance(previous, Mapping) else {}
    merged[target] = rec
    store_uns(adata, key, "predict", merged)


def _cell_type_steps(loaded: Loaded, opts: DecodeOptions) -> tuple[list[Tensor | None] | None, int]:
    """Allowed tokens per step and the number of steps of cell-type decoding."""
    vocab = loaded.vocab
    if len(vocab.cell_type_ids) == 0:
        msg = (
            "This checkpoint's vocabulary has no cell-type categories ('coarse_cell_type' / 'cell_type'); it "
            "cannot annotate. Use a checkpoint trained with cell-type labels."
        )
        raise MsfmInputError(msg)
    if not opts.constrained:
        return None, 3  # the release decodes cCT, fCT, <E>
    coarse = category_mask(vocab, ["coarse_cell_type"], loaded.device)
    fine = category_mask(vocab, ["cell_type"], loaded.device)
    union = id_mask(vocab.cell_type_ids, len(vocab), device=loaded.device)
    return ([union, union] if coarse is None or fine is None else [coarse, fine]), 2


def decode_cell_types(
    adata: AnnData,
    loaded: Loaded,
    opts: DecodeOptions,
    read: CellReadOptions,
    *,
    meta: Mapping[str, str] | None,
    embedding: Embedding | None,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
    steps: int | None = None,
) -> tuple[CellDecode, GeneMapping, str]:
    """The ``<PCT>`` decode of every cell, the gene mapping and the input kind, shared by ``predict`` and ``embed``."""
    allowed, n_steps = _cell_type_steps(loaded, opts)
    source, mapping = prepare(adata, loaded, read)
    dec = decode_cells(
        loaded,
        source,
        mapping,
        task=ANNOTATE,
        steps=steps or n_steps,
        allowed=allowed,
        repeat_mask=opts.repeat_mask,
        meta=meta_rows(adata, meta, loaded.vocab),
        embedding=embedding,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan predict",
    )
    return dec, mapping, source.kind


def _two_labels(
    vocab: CellSentenceVocab,
    first: tuple[np.ndarray, np.ndarray, np.ndarray],
    second: tuple[np.ndarray, np.ndarray, np.ndarray],
    dec: CellDecode,
    min_confidence: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two labels per cell and their confidence from ``(ids, allowed ids, probabilities)`` of each step.

    Ids outside the allowed set, cells with no expressed vocabulary gene (confidence 0) and cells below
    ``min_confidence`` are ``Unclassified``.
    """
    a = token_names(vocab, first[0], first[1])
    b = token_names(vocab, second[0], second[1])
    confidence = (first[2] * second[2]).astype(np.float32)
    empty = dec.n_genes == 0
    confidence[empty] = 0.0
    low = (confidence < min_confidence) | empty
    a[low] = UNCLASSIFIED
    b[low] = UNCLASSIFIED
    return a, b, confidence


def _params(
    target: str,
    opts: DecodeOptions,
    read: CellReadOptions,
    min_confidence: float,
    meta: Mapping[str, str] | None,
    dec: CellDecode,
) -> dict[str, Any]:
    """The ``uns`` parameters every prediction records."""
    return {
        "target": target,
        "constrained": opts.constrained,
        "repeat_mask": opts.repeat_mask,
        "min_confidence": min_confidence,
        "confidence": CONFIDENCE_DOC,
        "meta": dict(meta or {}),
        "layer": read.layer,
        "pre_normalized": read.pre_normalized,
        "n_empty_cells": int((dec.n_genes == 0).sum()),
        "n_truncated_cells": dec.n_truncated,
    }


def _cell_types(
    adata: AnnData,
    loaded: Loaded,
    key: str,
    opts: DecodeOptions,
    read: CellReadOptions,
    min_confidence: float,
    meta: Mapping[str, str] | None,
    embedding: Embedding,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
) -> None:
    vocab = loaded.vocab
    dec, mapping, kind = decode_cell_types(
        adata,
        loaded,
        opts,
        read,
        meta=meta,
        embedding=embedding,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
    )
    release = not opts.constrained
    first, second, p1, p2 = label_slots(dec, release)
    types = vocab.cell_type_ids
    coarse, fine, confidence = _two_labels(
        vocab, (first, types, p1), (second, types, p2), dec, min_confidence
    )
    empty = dec.n_genes == 0
    assert dec.embedding is not None
    dec.embedding[empty] = 0.0
    if empty.any():
        warnings.warn(
            f"{int(empty.sum())} cells express none of the checkpoint's {len(vocab.genes)} genes; they are "
            f"'Unclassified' with confidence 0 and a zero embedding row.",
            UserWarning,
            stacklevel=3,
        )
    adata.obs[field_key(key, "cell_type")] = categorical(coarse)
    adata.obs[field_key(key, "cell_type_fine")] = categorical(fine)
    adata.obs[field_key(key, "confidence")] = confidence
    adata.obsm[obsm_key(key)] = dec.embedding
    if release:
        adata.obs[field_key(key, "generated")] = generated_text(vocab, dec.ids)
    params = {
        **_params("cell_type", opts, read, min_confidence, meta, dec),
        "embedding": embedding,
        "n_unclassified": int((fine == UNCLASSIFIED).sum()),
    }
    _store_predict(adata, key, "cell_type", record(loaded, params, mapping, kind))


def _organs(
    adata: AnnData,
    loaded: Loaded,
    key: str,
    opts: DecodeOptions,
    read: CellReadOptions,
    min_confidence: float,
    meta: Mapping[str, str] | None,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
) -> None:
    vocab = loaded.vocab
    if "organ" not in vocab.categories and "region" not in vocab.categories:
        msg = "This checkpoint's vocabulary has no 'organ' or 'region' category; it cannot predict organs."
        raise MsfmInputError(msg)
    source, mapping = prepare(adata, loaded, read)
    organ_mask = category_mask(vocab, ["organ"], loaded.device)
    region_mask = category_mask(vocab, ["region"], loaded.device)
    allowed: list[Tensor | None] | None = None
    if opts.constrained:
        allowed = [
            organ_mask if organ_mask is not None else region_mask,
            region_mask if region_mask is not None else organ_mask,
        ]
    dec = decode_cells(
        loaded,
        source,
        mapping,
        task=ORGAN_REGION,
        steps=2,
        allowed=allowed,
        repeat_mask=opts.repeat_mask,
        meta=meta_rows(adata, meta, vocab),
        embedding=None,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan organ",
    )
    organ_ids = vocab.category_ids("organ") if "organ" in vocab.categories else vocab.category_ids("region")
    region_ids = vocab.category_ids("region") if "region" in vocab.categories else organ_ids
    organ, region, confidence = _two_labels(
        vocab,
        (dec.ids[:, 0], organ_ids, dec.full_prob[:, 0]),
        (dec.ids[:, 1], region_ids, dec.full_prob[:, 1]),
        dec,
        min_confidence,
    )
    adata.obs[field_key(key, "organ")] = categorical(organ)
    adata.obs[field_key(key, "region")] = categorical(region)
    adata.obs[field_key(key, "organ_confidence")] = confidence
    if not opts.constrained:
        adata.obs[field_key(key, "organ_generated")] = generated_text(vocab, dec.ids)
    params = _params("organ", opts, read, min_confidence, meta, dec)
    _store_predict(adata, key, "organ", record(loaded, params, mapping, source.kind))


def embed(
    data: AnnData | str | os.PathLike[str],
    checkpoint: Checkpoint,
    *,
    key_added: str = "scmulan",
    embedding: Embedding = "official",
    meta: Mapping[str, str] | None = None,
    decoding: DecodeOptions | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    progress: bool = True,
    copy: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> AnnData:
    """Cell embeddings, written to ``obsm["X_<key_added>"]`` (see :func:`predict` for the arguments).

    ``embedding="official"`` runs the annotation decode (the embedding is the hidden state at the generated
    coarse cell-type word, so it depends on ``constrained``); ``"task"`` (hidden state at ``<PCT>``) and
    ``"mean"`` (mean over the prompt words) need only the prompt. Cells with no expressed vocabulary gene get a
    zero row. ``uns[key_added]["embed"]`` records the run.

    Returns:
        The AnnData with the embedding (``data`` itself unless ``copy=True`` or ``data`` was a path).
    """
    key = check_key_added(key_added)
    embedding = check_embedding(embedding)
    canonical_precision(precision)
    opts, read = split_options(embed, options, decode=DECODE, defaults=DEFAULTS, base=decoding)
    batch_size = check_positive(batch_size, "batch_size")
    target_path = check_output(out, overwrite=overwrite, data=data)
    adata = as_anndata(data, copy=copy)
    loaded = load(checkpoint, device=device)
    choice = resolve_precision(precision, loaded.device)
    with autocast_context(loaded.device, choice.precision):
        dec, mapping, kind = decode_cell_types(
            adata,
            loaded,
            opts,
            read,
            meta=meta,
            embedding=embedding,
            batch_size=batch_size,
            max_tokens=max_tokens,
            progress=progress,
            steps=None if embedding == "official" else 1,  # prompt states need no decoding beyond the prefill
        )
    assert dec.embedding is not None
    empty = dec.n_genes == 0
    dec.embedding[empty] = 0.0
    adata.obsm[obsm_key(key)] = dec.embedding
    params = {
        "embedding": embedding,
        "constrained": opts.constrained,
        "repeat_mask": opts.repeat_mask,
        "meta": dict(meta or {}),
        "layer": read.layer,
        "pre_normalized": read.pre_normalized,
        "n_empty_cells": int(empty.sum()),
    }
    store_uns(adata, key, "embed", {**record(loaded, params, mapping, kind), "precision": choice.record()})
    write_output(adata, target_path, data, replace=overwrite)
    return adata
