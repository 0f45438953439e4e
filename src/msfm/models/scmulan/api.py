"""scMulan on AnnData: annotation, embeddings, organ/region, generation, perturbation, next state.

Every function that reads cells takes an AnnData of raw counts (``layers["counts"]`` or integer ``X``; an
already log1p-normalised matrix with ``pre_normalized=True``), maps its genes onto the checkpoint's gene words
(``harmonize_genes``; absent genes are simply not expressed), reads rows chunk by chunk (the matrix is never
densified), turns each cell into a c-sentence (expressed genes, levels binned per cell) and decodes
length-bucketed, left-padded batches with :func:`~msfm.models.scmulan.decoding.generate_tokens`.

Results follow scverse conventions, with ``key`` = ``key_added`` (default ``"scmulan"``):

* ``obs[f"{key}_cell_type"]`` (coarse), ``obs[f"{key}_cell_type_fine"]``, ``obs[f"{key}_confidence"]``;
* ``obsm[f"X_{key}"]``: the cell embedding;
* ``obs[f"{key}_organ"]``, ``obs[f"{key}_region"]``, ``obs[f"{key}_organ_confidence"]``;
* ``uns[key][task]``: parameters, checkpoint provenance and the gene-mapping report of each task run.

Generation-type functions (:func:`generate`, :func:`perturb`, :func:`next_state`) return new AnnData objects of
generated cells in the "binned" space of the release: ``X`` = level / 10 over the vocabulary's genes.

Long sentences: the model accepts at most ``config.max_length`` words (prompt plus generated). A cell with more
expressed genes than fit is **truncated to its top-expressed genes** (levels are still binned against the whole
cell, so the kept words are unchanged) and a warning says how many cells were affected. The official
vocabulary (2,000 genes, ``max_length`` 2,048) never needs this for annotation. Metadata-only prompts
(:func:`generate`, :func:`perturb`) cannot be truncated: a prompt plus ``max_new_tokens`` longer than the model
allows is an ``MsfmInputError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import Tensor, nn

from msfm.data import CellSource, GeneMapping, GenePanel, prepare_cells
from msfm.data.normalize import normalized_rows
from msfm.data.samplers import length_buckets
from msfm.errors import MsfmInputError
from msfm.models.scmulan.decoding import DecodeOptions, GenerationResult, RepeatMask, generate_tokens, id_mask
from msfm.models.scmulan.inference import (
    LoadedScMulan,
    iter_prompt_batches,
    load_model,
    preprocessing_record,
    save_model,
)
from msfm.models.scmulan.model import ScMulan, ScMulanOutput
from msfm.runtime.atomic import check_output_free
from msfm.runtime.jsonable import to_uns
from msfm.tokenizers.cell_sentence import (
    ANNOTATE,
    GENERATE,
    NEXT_STATE,
    ORGAN_REGION,
    CellSentenceTokenizer,
    CellSentenceVocab,
    Sentences,
)

__all__ = [
    "annotate",
    "convert",
    "embed",
    "generate",
    "next_state",
    "perturb",
    "perturb_screen",
    "predict_organ",
    "smooth_labels",
]

logger = logging.getLogger(__name__)

UNCLASSIFIED = CellSentenceVocab.UNCLASSIFIED
Embedding = Literal["official", "task", "mean"]
Checkpoint = str | os.PathLike[str] | LoadedScMulan
Prompts = Mapping[str, Any] | Sequence[Mapping[str, Any]] | pd.DataFrame

GENERATION_KEY = "scmulan_generation"
PERTURBATION_KEY = "scmulan_perturbation"
NEXT_STATE_KEY = "scmulan_next_state"

_CONFIDENCE_DOC = (
    "product over the two label steps of the probability the model gives the chosen token under its full, "
    "unconstrained softmax (no task constraint, no repeat ban); labels below min_confidence -> Unclassified"
)


# ----------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------
def _load(checkpoint: Checkpoint, device: str | torch.device) -> LoadedScMulan:
    if isinstance(checkpoint, LoadedScMulan):
        return checkpoint
    if not Path(checkpoint).exists():
        msg = (
            f"scMulan checkpoint {str(checkpoint)!r} does not exist. Pass an msfm checkpoint directory, e.g. one "
            "written by `msfm scmulan convert ckpt_scMulan.pt --out DIR` or by `msfm scmulan train`."
        )
        raise MsfmInputError(msg)
    return load_model(checkpoint, device=device)


def _check_key(key_added: str) -> str:
    if not isinstance(key_added, str) or not key_added.strip():
        msg = f"key_added must be a non-empty string such as 'scmulan', got {key_added!r}."
        raise MsfmInputError(msg)
    return key_added


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}."
        raise MsfmInputError(msg)
    return int(batch_size)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        msg = f"seed must be a non-negative integer, got {seed!r}."
        raise MsfmInputError(msg)
    return int(seed)


def _prepare(
    adata: AnnData,
    loaded: LoadedScMulan,
    *,
    layer: str | None,
    pre_normalized: bool,
    gene_column: str | None,
    species: Literal["human", "mouse"],
    use_aliases: bool,
    min_panel_fraction: float,
) -> tuple[CellSource, GeneMapping]:
    """Validate the matrix and map the input genes onto the checkpoint's gene words.

    ``harmonize_genes`` raises below ``min_panel_fraction`` and warns below half of the vocabulary's genes.
    """
    return prepare_cells(
        adata,
        GenePanel.from_symbols(loaded.vocab.genes, name="scmulan"),
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cell", disable=not enabled, leave=False)


def _provenance(loaded: LoadedScMulan) -> dict[str, Any]:
    extra = loaded.meta.get("extra", {}) or {}
    return {
        "path": str(loaded.path) if loaded.path is not None else "",
        "msfm_version": loaded.meta.get("msfm_version"),
        "source": extra.get("source"),
        "official_file": extra.get("official_file"),
        "official_sha256": extra.get("official_sha256"),
        "vocabulary_sha256": extra.get("vocabulary_sha256"),
        "created": loaded.meta.get("created"),
    }


def _record(
    loaded: LoadedScMulan,
    params: Mapping[str, Any],
    mapping: GeneMapping | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"params": dict(params), "checkpoint": _provenance(loaded)}
    if kind is not None:
        out["input"] = {"kind": kind}
    rec = to_uns(out)
    if mapping is not None:
        rec["gene_mapping"] = mapping.to_uns()
    return rec


def _store_uns(adata: AnnData, key: str, task: str, record: dict[str, Any]) -> None:
    """``uns[key][task] = record``, keeping the records of other tasks run under the same key."""
    current = adata.uns.get(key)
    merged = dict(current) if isinstance(current, Mapping) else {}
    merged[task] = record
    adata.uns[key] = merged


def _gene_budget(loaded: LoadedScMulan, n_other: int, what: str) -> int | None:
    """Most gene words a prompt may hold next to ``n_other`` other words (None = no limit needed)."""
    budget = loaded.config.max_length - n_other
    if budget < 1:
        msg = (
            f"{what} needs {n_other} words besides the genes, more than the model's max_length "
            f"({loaded.config.max_length}). Use fewer metadata words or a smaller max_new_tokens."
        )
        raise MsfmInputError(msg)
    return None if budget >= len(loaded.vocab.genes) else budget


def _warn_truncated(n_genes: np.ndarray, budget: int | None, max_length: int) -> int:
    if budget is None:
        return 0
    n = int((n_genes >= budget).sum())
    if n:
        warnings.warn(
            f"{n} cells have at least {budget} expressed vocabulary genes, the most that fit in the model's "
            f"max_length of {max_length} words with this task; they were truncated to their {budget} "
            "top-expressed genes (levels are binned against the whole cell).",
            UserWarning,
            stacklevel=3,
        )
    return n


def _meta_rows(adata: AnnData, meta: Mapping[str, str] | None, vocab: CellSentenceVocab) -> list[dict] | None:
    """Per-cell metadata words from obs columns: ``{category: obs column}`` (``{obs column: category}`` works too)."""
    if meta is None or len(meta) == 0:
        return None
    if not isinstance(meta, Mapping):
        msg = f"meta must map vocabulary categories to obs columns, e.g. {{'organ': 'tissue'}}; got {type(meta).__name__}."
        raise MsfmInputError(msg)
    pairs: list[tuple[str, str]] = []
    for a, b in meta.items():
        if a in vocab.categories and b in adata.obs.columns:
            pairs.append((a, b))
        elif b in vocab.categories and a in adata.obs.columns:
            pairs.append((b, a))
        else:
            msg = (
                f"meta entry {a!r}: {b!r} is not (vocabulary category: obs column). Categories: "
                f"{sorted(vocab.categories)}; obs columns: {list(adata.obs.columns)[:20]}."
            )
            raise MsfmInputError(msg)
    columns: dict[str, np.ndarray] = {}
    for category, column in pairs:
        values = adata.obs[column]
        allowed = set(vocab.categories[category])
        present = pd.Series(values.astype(object).where(values.notna(), None))
        bad = sorted(
            {str(v) for v in present.dropna().unique() if str(v) not in allowed and v != UNCLASSIFIED}
        )
        if bad:
            shown = ", ".join(repr(v) for v in vocab.categories[category][:15])
            msg = (
                f"obs[{column!r}] has values that are not {category!r} tokens of this vocabulary: {bad[:10]}. "
                f"Allowed ({len(allowed)}): {shown} ... Map your labels onto these tokens first, or set unknown "
                "ones to NaN / 'Unclassified' to leave them out of the prompt."
            )
            raise MsfmInputError(msg)
        columns[category] = np.array([None if v is None else str(v) for v in present], dtype=object)
    return [{c: columns[c][i] for c in columns} for i in range(adata.n_obs)]


def _category_mask(vocab: CellSentenceVocab, names: Sequence[str], device: torch.device) -> Tensor | None:
    present = [n for n in names if n in vocab.categories]
    if not present:
        return None
    return id_mask(vocab.category_ids(*present), len(vocab), device=device)


def _categorical(values: Iterable[str]) -> pd.Categorical:
    return pd.Categorical(list(values))


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert(
    official: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Convert an official scMulan ``ckpt_scMulan.pt`` into an msfm checkpoint directory.

    The file is read with ``weights_only=True``; the official 2,222-token vocabulary is stored with the weights
    and ``meta.json`` records the source file name and its sha256.

    Raises:
        MsfmInputError: ``out`` exists (without ``overwrite``) or the file is missing.
        CheckpointError: the file is not an official scMulan checkpoint.
    """
    from msfm.models.scmulan.official import load_official_checkpoint

    official = Path(official)
    out = Path(out)
    check_output_free(out, overwrite=overwrite)
    config, state_dict = load_official_checkpoint(official)
    vocab = CellSentenceVocab.official()
    model = ScMulan(config)
    model.load_state_dict(state_dict, strict=True)
    return save_model(
        out,
        model,
        vocab,
        preprocessing=preprocessing_record(n_levels=config.n_levels),
        extra_meta={
            "source": "official scMulan",
            "official_file": official.name,
            "official_sha256": _sha256_file(official),
            "licence_note": "Official scMulan code and weights: SuperBianC/scMulan (MIT licence).",
        },
    )


# ----------------------------------------------------------------------------------------------------------
# decoding cells with a task token (annotation, organ/region, embeddings)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _CellDecode:
    """Per-cell outputs of a short task decode.

    Shape:
        - ids, full_prob: ``[n, steps]`` (ids -1 after a stop / for unread cells)
        - prompt_tail: ``[n, 2]`` last two prompt ids (-1 where the prompt is shorter)
        - embedding: ``[n, d]`` or None
        - n_genes: ``[n]``
    """

    ids: np.ndarray
    full_prob: np.ndarray
    prompt_tail: np.ndarray
    embedding: np.ndarray | None
    n_genes: np.ndarray
    n_truncated: int


@torch.inference_mode()
def _decode_cells(
    loaded: LoadedScMulan,
    source: CellSource,
    mapping: GeneMapping,
    *,
    task: str,
    steps: int,
    allowed: list[Tensor | None] | None,
    repeat_mask: RepeatMask,
    meta: list[dict] | None,
    embedding: Embedding | None,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
    desc: str,
) -> _CellDecode:
    """Greedy task decoding over every cell, also recording each step's unconstrained token probabilities.

    The full-vocabulary probabilities come from a forward hook on the entity head: ``generate_tokens`` runs the
    head once per decoding step (prefill, then each fed-back word), so the hook sees exactly the logits each
    step chose from, before any constraint or repeat ban. No extra forward pass is needed.
    """
    vocab = loaded.vocab
    n_meta = (
        0 if meta is None else max((len([v for v in m.values() if v is not None]) for m in meta), default=0)
    )
    budget = _gene_budget(loaded, n_meta + 1 + steps, f"The {task} task")
    tokenizer = loaded.tokenizer(max_genes=budget)
    n = source.n_obs
    d = loaded.config.dim
    ids_out = np.full((n, steps), -1, dtype=np.int64)
    prob_out = np.zeros((n, steps), dtype=np.float32)
    tail_out = np.full((n, 2), -1, dtype=np.int64)
    emb_out = np.zeros((n, d), dtype=np.float32) if embedding is not None else None
    n_genes = np.zeros(n, dtype=np.int64)
    options = DecodeOptions(max_new_tokens=steps, greedy=True, repeat_mask=repeat_mask, end_id=vocab.end_id)
    model = loaded.model
    device = loaded.device
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        captured.append(torch.log_softmax(output[:, -1].float(), dim=-1))

    handle = model.entity_head.register_forward_hook(hook)
    try:
        with _progress(n, desc, progress) as bar:
            for batch in iter_prompt_batches(
                source, mapping, tokenizer, task=task, meta=meta, batch_size=batch_size, max_tokens=max_tokens
            ):
                captured.clear()
                res = generate_tokens(
                    model,
                    batch.ids.to(device),
                    batch.levels.to(device),
                    batch.attention_mask.to(device),
                    options,
                    allowed=allowed,
                )
                run = res.ids.shape[1]
                logp = torch.stack(captured[:run], dim=1)  # [b, run, V]
                chosen = res.ids.clamp_min(0)
                full = logp.gather(2, chosen[..., None]).squeeze(-1).exp()
                full = torch.where(res.ids >= 0, full, torch.zeros_like(full))
                rows = batch.rows
                ids_out[rows, :run] = res.ids.cpu().numpy()
                prob_out[rows, :run] = full.cpu().numpy()
                tail = batch.ids[:, -2:].clone()
                tail[~batch.attention_mask[:, -2:]] = -1
                tail_out[rows, 2 - tail.shape[1] :] = tail.numpy()
                n_genes[rows] = batch.n_genes
                if emb_out is not None:
                    emb_out[rows] = _pick_embedding(res, embedding).cpu().numpy()
                bar.update(len(rows))
    finally:
        handle.remove()
    n_trunc = _warn_truncated(n_genes, budget, loaded.config.max_length)
    return _CellDecode(ids_out, prob_out, tail_out, emb_out, n_genes, n_trunc)


def _pick_embedding(res: GenerationResult, embedding: Embedding | None) -> Tensor:
    """Shape: ``[b, d]``; NaN (no fed-back token) becomes 0."""
    if embedding == "official":
        emb = res.hidden[:, 0]
    elif embedding == "task":
        emb = res.prompt_last_hidden
    else:
        emb = res.prompt_mean_hidden
    return torch.nan_to_num(emb.float(), nan=0.0)


def _check_embedding(embedding: str) -> Embedding:
    if embedding not in ("official", "task", "mean"):
        msg = (
            f"embedding must be 'official' (hidden state at the generated coarse cell-type word, as released), "
            f"'task' (hidden state at the task token) or 'mean' (mean over the prompt), got {embedding!r}."
        )
        raise MsfmInputError(msg)
    return embedding  # type: ignore[return-value]


def _check_repeat_mask(repeat_mask: str) -> RepeatMask:
    if repeat_mask not in ("official", "all", "generated", "none"):
        msg = f"repeat_mask must be 'official', 'all', 'generated' or 'none', got {repeat_mask!r}."
        raise MsfmInputError(msg)
    return repeat_mask  # type: ignore[return-value]


def _label_slots(dec: _CellDecode, release: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first label id, second label id, their unconstrained probabilities) per cell.

    Constrained decoding: the first two generated words. Release mode: words ``[-3:-1]`` of prompt + generated
    words, as the official code slices them (with an early ``<E>`` a slot falls on a prompt word, probability 0).
    """
    if not release:
        return dec.ids[:, 0], dec.ids[:, 1], dec.full_prob[:, 0], dec.full_prob[:, 1]
    seq = np.concatenate([dec.prompt_tail, dec.ids], axis=1)
    prob = np.concatenate([np.zeros_like(dec.prompt_tail, dtype=np.float32), dec.full_prob], axis=1)
    k = (dec.ids >= 0).sum(axis=1)  # generated words, <E> included
    end = 2 + k  # valid length of seq
    a, b = end - 3, end - 2
    rows = np.arange(len(seq))
    a = np.clip(a, 0, seq.shape[1] - 1)
    return seq[rows, a], seq[rows, b], prob[rows, a], prob[rows, b]


def _names(vocab: CellSentenceVocab, ids: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Token names; ids outside ``allowed`` (or negative) become Unclassified."""
    table = np.array(vocab.tokens, dtype=object)
    ok = np.isin(ids, allowed) & (ids >= 0)
    return np.where(ok, table[np.clip(ids, 0, len(table) - 1)], UNCLASSIFIED)


def _generated_text(vocab: CellSentenceVocab, ids: np.ndarray) -> list[str]:
    return ["; ".join(vocab.tokens[i] for i in row if i >= 0) for row in ids]


def _annotate_core(
    adata: AnnData,
    loaded: LoadedScMulan,
    *,
    constrained: bool,
    repeat_mask: str,
    embedding: Embedding | None,
    meta: Mapping[str, str] | None,
    layer: str | None,
    pre_normalized: bool,
    gene_column: str | None,
    species: Literal["human", "mouse"],
    use_aliases: bool,
    min_panel_fraction: float,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
    steps: int | None = None,
) -> tuple[_CellDecode, CellSource, GeneMapping, bool]:
    vocab = loaded.vocab
    if len(vocab.cell_type_ids) == 0:
        msg = (
            "This checkpoint's vocabulary has no cell-type categories ('coarse_cell_type' / 'cell_type'); it "
            "cannot annotate. Use a checkpoint trained with cell-type labels."
        )
        raise MsfmInputError(msg)
    source, mapping = _prepare(
        adata,
        loaded,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )
    meta_rows = _meta_rows(adata, meta, vocab)
    device = loaded.device
    if constrained:
        coarse = _category_mask(vocab, ["coarse_cell_type"], device)
        fine = _category_mask(vocab, ["cell_type"], device)
        union = id_mask(vocab.cell_type_ids, len(vocab), device=device)
        allowed: list[Tensor | None] | None = (
            [union, union] if coarse is None or fine is None else [coarse, fine]
        )
        n_steps = 2
    else:
        allowed = None
        n_steps = 3  # the release decodes cCT, fCT, <E>
    dec = _decode_cells(
        loaded,
        source,
        mapping,
        task=ANNOTATE,
        steps=steps or n_steps,
        allowed=allowed,
        repeat_mask=_check_repeat_mask(repeat_mask),
        meta=meta_rows,
        embedding=embedding,
        batch_size=_check_batch_size(batch_size),
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan annotate",
    )
    return dec, source, mapping, not constrained


# ----------------------------------------------------------------------------------------------------------
# annotation and embeddings
# ----------------------------------------------------------------------------------------------------------
def annotate(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    constrained: bool = True,
    repeat_mask: RepeatMask = "official",
    min_confidence: float = 0.1,
    meta: Mapping[str, str] | None = None,
    embedding: Embedding = "official",
    smoothing: bool = False,
    n_neighbors: int = 15,
    smoothing_threshold: float = 0.1,
    layer: str | None = None,
    pre_normalized: bool = False,
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    key_added: str = "scmulan",
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Zero-shot cell-type annotation (coarse and fine) and the cell embedding, with the ``<PCT>`` task.

    Each cell becomes ``[meta words] + genes + <PCT>`` and is decoded greedily.

    * ``constrained=True`` (default): two steps, the first restricted to the vocabulary's ``coarse_cell_type``
      tokens and the second to its ``cell_type`` (fine) tokens (both to their union when one category is
      missing). Labels are always cell-type tokens (or ``Unclassified``).
    * ``constrained=False`` reproduces the release: three free steps; the labels are words ``[-3:-1]`` of the
      sentence, each replaced by ``Unclassified`` unless it is a cell-type token.

    Confidence: the product, over the coarse and fine steps, of the probability the model gives the chosen token
    under its **full, unconstrained** softmax (every vocabulary token, no constraint, no repeat ban), i.e. the
    mass the model itself puts on the label before the constraint is applied. A cell from a tissue the model
    does not know spreads its mass over genes and other words, so it gets a low confidence instead of a
    confidently wrong label; cells below ``min_confidence`` are labelled ``Unclassified``. Cells with no
    expressed vocabulary gene are ``Unclassified`` with confidence 0 and a zero embedding row.

    Args:
        adata: cells x genes (raw counts, or log-normalised with ``pre_normalized=True``); backed works.
        checkpoint: msfm checkpoint directory (``convert``/``train``) or a loaded model.
        constrained: restrict the label steps to cell-type tokens (see above).
        repeat_mask: ``"official"`` (the release's non-cached model: fine may equal coarse), ``"all"``, ``"none"``.
        min_confidence: below this confidence both labels become ``Unclassified`` (0 keeps every label).
        meta: metadata words to prepend, ``{category: obs column}`` such as ``{"organ": "tissue"}``; values must
            be tokens of that category (NaN / ``Unclassified`` are left out).
        embedding: ``"official"`` (hidden state at the generated coarse word, as released), ``"task"`` (at
            ``<PCT>``) or ``"mean"`` (mean over the prompt words).
        smoothing: also run :func:`smooth_labels` on the fine labels (kNN vote in the embedding).
        n_neighbors: neighbours for smoothing; ``smoothing_threshold`` its minimal winning weight.
        key_added: prefix of the obs/obsm keys and the uns key.
        batch_size: cells per batch (``max_tokens`` caps cells x longest prompt per batch).
        copy: return a modified copy instead of writing into ``adata``.

    Returns:
        The AnnData when ``copy=True``, else ``None``. Writes ``obs[f"{key}_cell_type"]`` (coarse),
        ``obs[f"{key}_cell_type_fine"]``, ``obs[f"{key}_confidence"]``, ``obsm[f"X_{key}"]`` and
        ``uns[key]["annotate"]``; with ``constrained=False`` also ``obs[f"{key}_generated"]`` (the raw words).
    """
    key = _check_key(key_added)
    embedding = _check_embedding(embedding)
    if not float(min_confidence) >= 0.0:
        msg = (
            f"min_confidence must be >= 0 (0 keeps every label, above 1 rejects all), got {min_confidence!r}."
        )
        raise MsfmInputError(msg)
    adata = adata.copy() if copy else adata
    loaded = _load(checkpoint, device)
    dec, source, mapping, release = _annotate_core(
        adata,
        loaded,
        constrained=constrained,
        repeat_mask=repeat_mask,
        embedding=embedding,
        meta=meta,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
    )
    vocab = loaded.vocab
    first, second, p1, p2 = _label_slots(dec, release)
    cell_types = vocab.cell_type_ids
    coarse = _names(vocab, first, cell_types)
    fine = _names(vocab, second, cell_types)
    confidence = (p1 * p2).astype(np.float32)
    empty = dec.n_genes == 0
    confidence[empty] = 0.0
    low = confidence < float(min_confidence)
    coarse[low | empty] = UNCLASSIFIED
    fine[low | empty] = UNCLASSIFIED
    assert dec.embedding is not None
    dec.embedding[empty] = 0.0
    if empty.any():
        warnings.warn(
            f"{int(empty.sum())} cells express none of the checkpoint's {len(vocab.genes)} genes; they are "
            f"'Unclassified' with confidence 0 and a zero embedding row.",
            UserWarning,
            stacklevel=2,
        )
    adata.obs[f"{key}_cell_type"] = _categorical(coarse)
    adata.obs[f"{key}_cell_type_fine"] = _categorical(fine)
    adata.obs[f"{key}_confidence"] = confidence
    adata.obsm[f"X_{key}"] = dec.embedding
    if release:
        adata.obs[f"{key}_generated"] = _generated_text(vocab, dec.ids)
    _store_uns(
        adata,
        key,
        "annotate",
        _record(
            loaded,
            {
                "task": "annotate",
                "constrained": constrained,
                "repeat_mask": repeat_mask,
                "min_confidence": float(min_confidence),
                "confidence": _CONFIDENCE_DOC,
                "embedding": embedding,
                "meta": dict(meta or {}),
                "layer": layer,
                "pre_normalized": pre_normalized,
                "n_empty_cells": int(empty.sum()),
                "n_truncated_cells": dec.n_truncated,
                "n_unclassified": int((fine == UNCLASSIFIED).sum()),
            },
            mapping,
            source.kind,
        ),
    )
    if smoothing:
        smooth_labels(adata, key_added=key, n_neighbors=n_neighbors, threshold=smoothing_threshold)
    return adata if copy else None


def embed(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    embedding: Embedding = "official",
    constrained: bool = True,
    repeat_mask: RepeatMask = "official",
    meta: Mapping[str, str] | None = None,
    layer: str | None = None,
    pre_normalized: bool = False,
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    key_added: str = "scmulan",
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Cell embeddings only, written to ``obsm[f"X_{key_added}"]`` (see :func:`annotate` for ``embedding``).

    ``"official"`` runs the annotation decode (the embedding is the hidden state at the generated coarse
    cell-type word, so it depends on ``constrained``); ``"task"`` and ``"mean"`` need only the prompt.
    Cells with no expressed vocabulary gene get a zero row.

    Returns:
        The AnnData when ``copy=True``, else ``None``.
    """
    key = _check_key(key_added)
    embedding = _check_embedding(embedding)
    adata = adata.copy() if copy else adata
    loaded = _load(checkpoint, device)
    dec, source, mapping, _ = _annotate_core(
        adata,
        loaded,
        constrained=constrained,
        repeat_mask=repeat_mask,
        embedding=embedding,
        meta=meta,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        steps=None if embedding == "official" else 1,  # prompt states need no decoding beyond the prefill
    )
    assert dec.embedding is not None
    empty = dec.n_genes == 0
    dec.embedding[empty] = 0.0
    adata.obsm[f"X_{key}"] = dec.embedding
    _store_uns(
        adata,
        key,
        "embed",
        _record(
            loaded,
            {
                "task": "embed",
                "embedding": embedding,
                "constrained": constrained,
                "repeat_mask": repeat_mask,
                "layer": layer,
                "pre_normalized": pre_normalized,
                "n_empty_cells": int(empty.sum()),
            },
            mapping,
            source.kind,
        ),
    )
    return adata if copy else None


def predict_organ(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    constrained: bool = True,
    repeat_mask: RepeatMask = "official",
    min_confidence: float = 0.0,
    layer: str | None = None,
    pre_normalized: bool = False,
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    key_added: str = "scmulan",
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Organ and region of origin with the ``<SPToken3>`` task (two greedy steps: organ, then region).

    ``constrained=True`` restricts the first step to the vocabulary's ``organ`` tokens and the second to its
    ``region`` tokens. ``constrained=False`` decodes two free words as the release does; a word outside the
    expected category becomes ``Unclassified`` and the raw words go to ``obs[f"{key}_organ_generated"]``.
    Confidence is defined as in :func:`annotate` (product of the unconstrained probabilities of both words).

    Returns:
        The AnnData when ``copy=True``, else ``None``. Writes ``obs[f"{key}_organ"]``, ``obs[f"{key}_region"]``,
        ``obs[f"{key}_organ_confidence"]`` and ``uns[key]["predict_organ"]``.
    """
    key = _check_key(key_added)
    adata = adata.copy() if copy else adata
    loaded = _load(checkpoint, device)
    vocab = loaded.vocab
    if "organ" not in vocab.categories and "region" not in vocab.categories:
        msg = "This checkpoint's vocabulary has no 'organ' or 'region' category; it cannot predict organs."
        raise MsfmInputError(msg)
    source, mapping = _prepare(
        adata,
        loaded,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )
    device_ = loaded.device
    organ_mask = _category_mask(vocab, ["organ"], device_)
    region_mask = _category_mask(vocab, ["region"], device_)
    if constrained:
        allowed: list[Tensor | None] | None = [
            organ_mask if organ_mask is not None else region_mask,
            region_mask if region_mask is not None else organ_mask,
        ]
    else:
        allowed = None
    dec = _decode_cells(
        loaded,
        source,
        mapping,
        task=ORGAN_REGION,
        steps=2,
        allowed=allowed,
        repeat_mask=_check_repeat_mask(repeat_mask),
        meta=None,
        embedding=None,
        batch_size=_check_batch_size(batch_size),
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan organ",
    )
    organ_ids = vocab.category_ids("organ") if "organ" in vocab.categories else vocab.category_ids("region")
    region_ids = vocab.category_ids("region") if "region" in vocab.categories else organ_ids
    organ = _names(vocab, dec.ids[:, 0], organ_ids)
    region = _names(vocab, dec.ids[:, 1], region_ids)
    confidence = (dec.full_prob[:, 0] * dec.full_prob[:, 1]).astype(np.float32)
    empty = dec.n_genes == 0
    confidence[empty] = 0.0
    low = (confidence < float(min_confidence)) | empty
    organ[low] = UNCLASSIFIED
    region[low] = UNCLASSIFIED
    adata.obs[f"{key}_organ"] = _categorical(organ)
    adata.obs[f"{key}_region"] = _categorical(region)
    adata.obs[f"{key}_organ_confidence"] = confidence
    if not constrained:
        adata.obs[f"{key}_organ_generated"] = _generated_text(vocab, dec.ids)
    _store_uns(
        adata,
        key,
        "predict_organ",
        _record(
            loaded,
            {
                "task": "predict_organ",
                "constrained": constrained,
                "repeat_mask": repeat_mask,
                "min_confidence": float(min_confidence),
                "confidence": _CONFIDENCE_DOC,
                "layer": layer,
                "pre_normalized": pre_normalized,
                "n_empty_cells": int(empty.sum()),
                "n_truncated_cells": dec.n_truncated,
            },
            mapping,
            source.kind,
        ),
    )
    return adata if copy else None


def smooth_labels(
    adata: AnnData,
    *,
    key_added: str = "scmulan",
    n_neighbors: int = 15,
    threshold: float = 0.1,
    use_rep: str | None = None,
    labels: str | None = None,
    n_pcs: int = 10,
) -> None:
    """kNN smoothing of annotation labels (the release's ``cell_type_smoothing``).

    The representation (default ``obsm[f"X_{key}"]``) is reduced to ``n_pcs`` principal components; every cell
    takes a vote among its ``n_neighbors`` nearest other cells, each neighbour weighted by its inverse distance
    (weights normalised to sum to 1). The label with the largest weight wins; if that weight is below
    ``threshold`` the cell becomes ``Unclassified``.

    Writes ``obs[f"{key}_cell_type_smoothed"]`` and ``obs[f"{key}_smoothing_score"]`` (winning weight).
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    key = _check_key(key_added)
    rep_key = use_rep or f"X_{key}"
    label_key = labels or f"{key}_cell_type_fine"
    if rep_key not in adata.obsm:
        msg = f"obsm[{rep_key!r}] not found; run scmulan.annotate first or pass use_rep= (have {list(adata.obsm)})."
        raise MsfmInputError(msg)
    if label_key not in adata.obs:
        msg = f"obs[{label_key!r}] not found; run scmulan.annotate first or pass labels=."
        raise MsfmInputError(msg)
    if isinstance(n_neighbors, bool) or int(n_neighbors) < 1:
        msg = f"n_neighbors must be a positive integer, got {n_neighbors!r}."
        raise MsfmInputError(msg)
    rep = np.asarray(adata.obsm[rep_key], dtype=np.float64)
    values = adata.obs[label_key].astype(str).to_numpy()
    n = rep.shape[0]
    if n < 2:
        adata.obs[f"{key}_cell_type_smoothed"] = _categorical(values)
        adata.obs[f"{key}_smoothing_score"] = np.ones(n, dtype=np.float32)
        return
    n_comp = min(int(n_pcs), rep.shape[1], n - 1)
    z = PCA(n_components=n_comp, random_state=0).fit_transform(rep) if rep.shape[1] > n_comp else rep
    k = min(int(n_neighbors), n - 1)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    # Drop each cell itself (not necessarily column 0 when several cells coincide).
    not_self = idx != np.arange(n)[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(idx, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    weight = 1.0 / np.maximum(dist, 1e-8)
    weight /= weight.sum(axis=1, keepdims=True)
    cats, codes = np.unique(values, return_inverse=True)
    scores = np.zeros((n, len(cats)))
    np.add.at(scores, (np.repeat(np.arange(n), k), codes[idx].ravel()), weight.ravel())
    best = scores.argmax(axis=1)
    score = scores[np.arange(n), best]
    smoothed = np.where(score >= float(threshold), cats[best], UNCLASSIFIED)
    adata.obs[f"{key}_cell_type_smoothed"] = _categorical(smoothed)
    adata.obs[f"{key}_smoothing_score"] = score.astype(np.float32)
    uns = adata.uns.get(key)
    if isinstance(uns, Mapping):
        _store_uns(
            adata,
            key,
            "smooth_labels",
            to_uns(
                {
                    "n_neighbors": k,
                    "threshold": float(threshold),
                    "use_rep": rep_key,
                    "labels": label_key,
                    "n_pcs": n_comp,
                }
            ),
        )


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------
def _stream_seed(seed: int, stream: Sequence[int]) -> int:
    return int(
        np.random.SeedSequence([int(seed), *(int(s) for s in stream)]).generate_state(1, dtype=np.uint64)[0]
    )


class _PerCellSampler(nn.Module):
    """Wraps the model so that *greedy* decoding draws an exact sample per cell from its own random stream.

    Gumbel-max trick: with ``G ~ Gumbel(0, 1)`` i.i.d. per token, ``argmax(l / T + G)`` is a sample from
    ``softmax(l / T)``. ``generate_tokens`` with ``greedy=True`` multiplies the ``<E>`` probability by
    ``end_weight`` before its argmax, i.e. adds ``log(end_weight)`` to that logit, which is exactly the release's
    ``gamma`` re-weighting of the sampling distribution. The constraint, the repeat ban and top-k are applied
    here before the noise (as the release applies them before sampling), and each cell draws its noise from a
    generator seeded by ``(seed, stream id)``: a cell's sample does not depend on the batch it is decoded in.
    """

    def __init__(
        self,
        model: ScMulan,
        seeds: Sequence[int],
        *,
        temperature: float,
        top_k: int | None,
        allowed: Tensor | None,
        repeat_mask: RepeatMask,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.temperature = float(temperature)
        self.top_k = top_k
        self.allowed = allowed
        self.repeat_mask = repeat_mask
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self._seen: Tensor | None = None
        self._last: Tensor | None = None

    def new_cache(self) -> Any:
        return self.model.new_cache()

    def _track(self, ids: Tensor, attention_mask: Tensor | None, incremental: bool) -> None:
        """Repeat-ban bookkeeping, the same rule as ``generate_tokens``."""
        b, n = ids.shape
        if incremental and self._seen is not None:
            self._seen.scatter_add_(
                1, self._last[:, None], torch.ones(b, 1, dtype=torch.int32, device=ids.device)
            )
            self._last = ids[:, -1].clone()
            return
        mask = (
            torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask[:, -n:].bool()
        )
        seen = torch.zeros(b, self.config.vocab_size, dtype=torch.int32, device=ids.device)
        seen.scatter_add_(1, ids[:, :-1].masked_fill(~mask[:, :-1], 0), mask[:, :-1].to(torch.int32))
        self._seen, self._last = seen, ids[:, -1].clone()

    def forward(
        self,
        ids: Tensor,
        levels: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        heads: str = "last",
    ) -> ScMulanOutput:
        out = self.model(ids, levels, attention_mask=attention_mask, cache=cache, heads=heads)
        self._track(ids, attention_mask, incremental=cache is not None and self._seen is not None)
        logits = out.logits[:, -1].float()
        neg = float("-inf")
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed.expand_as(logits), neg)
        if self.repeat_mask != "none":
            banned = self._seen > 0
            if self.repeat_mask == "all":
                banned = banned.clone()
                banned.scatter_(1, self._last[:, None], True)
            logits = logits.masked_fill(banned, neg)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, neg)
        logits = logits / self.temperature
        u = torch.stack(
            [torch.rand(logits.shape[-1], generator=g, dtype=torch.float64) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        logits = logits + gumbel.to(device=logits.device, dtype=logits.dtype)
        return ScMulanOutput(logits[:, None], out.expression, out.hidden)


def _run_options(options: DecodeOptions) -> DecodeOptions:
    """Sampling runs as greedy decoding over :class:`_PerCellSampler`'s noisy logits (which already carry the
    temperature and top-k); greedy decoding runs as it is."""
    if options.greedy:
        return options
    return dataclasses.replace(options, greedy=True, temperature=1.0, top_k=None)


@dataclass
class _Generated:
    """Generated words per sentence (``<E>`` included when the sentence stopped on it)."""

    ids: list[np.ndarray]
    levels: list[np.ndarray]
    stopped: np.ndarray


@torch.inference_mode()
def _generate_sentences(
    loaded: LoadedScMulan,
    prompts: Sentences,
    streams: Sequence[Sequence[int]],
    *,
    options: DecodeOptions,
    allowed: Tensor | None,
    seed: int,
    temperature: float,
    top_k: int | None,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
    desc: str,
) -> _Generated:
    """Decode every prompt (left padded, bucketed by length); sampling uses one random stream per prompt."""
    tokenizer = CellSentenceTokenizer(loaded.vocab, n_levels=loaded.config.n_levels)
    n = len(prompts)
    out_ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
    out_levels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
    stopped = np.zeros(n, dtype=bool)
    device = loaded.device
    lengths = prompts.lengths()
    with _progress(n, desc, progress) as bar:
        order = np.argsort(lengths, kind="stable")
        for group in length_buckets(order, lengths, batch_size=batch_size, max_tokens=max_tokens):
            ids, levels, mask = tokenizer.left_pad(prompts, group)
            if options.greedy:
                model: Any = loaded.model
            else:
                model = _PerCellSampler(
                    loaded.model,
                    [_stream_seed(seed, streams[int(i)]) for i in group],
                    temperature=temperature,
                    top_k=top_k,
                    allowed=allowed,
                    repeat_mask=options.repeat_mask,
                )
            res = generate_tokens(
                model,
                ids.to(device),
                levels.to(device),
                mask.to(device),
                _run_options(options),
                allowed=allowed,
            )
            gen_ids = res.ids.cpu().numpy()
            gen_levels = res.levels.cpu().numpy()
            n_new = res.n_new.cpu().numpy()
            for j, i in enumerate(group):
                k = int(n_new[j])
                out_ids[int(i)] = gen_ids[j, :k].copy()
                out_levels[int(i)] = gen_levels[j, :k].copy()
                stopped[int(i)] = k > 0 and gen_ids[j, k - 1] == options.end_id
            bar.update(len(group))
    return _Generated(out_ids, out_levels, stopped)


def _prompt_records(prompts: Prompts) -> list[dict[str, Any]]:
    if isinstance(prompts, pd.DataFrame):
        records = prompts.to_dict("records")
    elif isinstance(prompts, Mapping):
        records = [dict(prompts)]
    elif isinstance(prompts, Sequence) and not isinstance(prompts, str):
        records = [dict(p) if isinstance(p, Mapping) else p for p in prompts]
    else:
        msg = (
            f"prompts must be a dict such as {{'organ': 'Blood', 'cell_type': 'T cell'}}, a list of such dicts "
            f"or a DataFrame with one column per category; got {type(prompts).__name__}."
        )
        raise MsfmInputError(msg)
    if not records:
        msg = "prompts is empty; give at least one prompt (a dict of category -> value)."
        raise MsfmInputError(msg)
    bad = [i for i, r in enumerate(records) if not isinstance(r, Mapping)]
    if bad:
        msg = f"prompt {bad[0]} is a {type(records[bad[0]]).__name__}; every prompt must be a dict of category -> value."
        raise MsfmInputError(msg)
    return records


def _decode_options(
    loaded: LoadedScMulan,
    *,
    prompt_len: int,
    max_new_tokens: int | None,
    greedy: bool,
    temperature: float,
    top_k: int | None,
    end_weight: float,
    repeat_mask: str,
) -> DecodeOptions:
    """Options for open generation; the default length is every gene once plus ``<E>``, within max_length."""
    limit = loaded.config.max_length - prompt_len
    if max_new_tokens is None:
        max_new_tokens = min(len(loaded.vocab.genes) + 1, limit)
        if max_new_tokens < 1:
            msg = f"Prompts of {prompt_len} words leave no room to generate within max_length {loaded.config.max_length}."
            raise MsfmInputError(msg)
    elif isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1 or int(max_new_tokens) > limit:
        msg = (
            f"max_new_tokens={max_new_tokens!r} is not valid: expected 1..{limit} (the model's max_length "
            f"{loaded.config.max_length} minus the longest prompt, {prompt_len} words)."
        )
        raise MsfmInputError(msg)
    try:
        return DecodeOptions(
            max_new_tokens=int(max_new_tokens),
            greedy=bool(greedy),
            temperature=float(temperature),
            top_k=top_k,
            end_weight=float(end_weight),
            repeat_mask=_check_repeat_mask(repeat_mask),
            end_id=loaded.vocab.end_id,
        )
    except ValueError as err:
        raise MsfmInputError(str(err)) from None


def _cells_anndata(
    loaded: LoadedScMulan,
    ids: Sequence[np.ndarray],
    levels: Sequence[np.ndarray],
    stopped: np.ndarray,
    obs: pd.DataFrame,
) -> AnnData:
    """Generated sentences -> AnnData: X = level / n_levels (csr), layers['levels'] integer levels."""
    tokenizer = CellSentenceTokenizer(loaded.vocab, n_levels=loaded.config.n_levels)
    x = tokenizer.sentences_to_matrix(list(ids), list(levels))
    lv = sp.csr_matrix(
        (np.rint(x.data * loaded.config.n_levels).astype(np.int16), x.indices.copy(), x.indptr.copy()),
        shape=x.shape,
    )
    obs = obs.copy()
    obs["n_genes"] = np.diff(x.indptr).astype(np.int64)
    obs["n_words"] = np.array([len(a) for a in ids], dtype=np.int64)
    obs["stopped_at_end"] = np.asarray(stopped, dtype=bool)
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(loaded.vocab.genes, name="gene")))
    adata.layers["levels"] = lv
    return adata


def _meta_obs(records: Sequence[Mapping[str, Any]], repeat: int) -> pd.DataFrame:
    cols: list[str] = []
    for r in records:
        cols.extend(str(k) for k in r if str(k) not in cols)
    data: dict[str, Any] = {}
    for c in cols:
        vals = [r.get(c) for r in records]
        vals = [None if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in vals]
        data[c] = pd.Categorical(np.repeat(np.array(vals, dtype=object), repeat))
    return pd.DataFrame(data)


def generate(
    checkpoint: Checkpoint,
    prompts: Prompts,
    *,
    n_per_prompt: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    end_weight: float = 1.0,
    max_new_tokens: int | None = None,
    repeat_mask: RepeatMask = "all",
    constrained: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    max_tokens: int | None = 32768,
    device: str = "auto",
    progress: bool = True,
) -> AnnData:
    """Conditional generation of cells from metadata prompts (``<SPToken1>``).

    Each prompt is ``[metadata words] + <SPToken1>``; the model then writes gene words (token, level) until
    ``<E>``. With ``constrained=True`` only genes and ``<E>`` may be written; ``constrained=False`` lets any
    token through, as the release does (non-gene words are dropped from the matrix).

    Sampling is reproducible and independent of ``batch_size``: cell ``i`` of the output draws from its own
    random stream, seeded by ``(seed, i)`` (see :class:`_PerCellSampler`).

    Args:
        checkpoint: msfm checkpoint directory or a loaded model.
        prompts: one dict (category -> value, e.g. ``{"organ": "Blood", "cell_type": "T cell", "age": "60 year",
            "sex": "M"}``), a list of dicts, or a DataFrame with one column per category (NaN = leave out).
            Unknown categories or values raise ``MsfmInputError`` naming the allowed values.
        n_per_prompt: cells generated per prompt.
        greedy: most probable word at every step (deterministic; every copy of a prompt is identical).
        temperature: divides the logits before sampling; ``top_k`` keeps the k best words.
        end_weight: multiplies the probability of ``<E>`` (the release's ``gamma``; 0.1 in the paper).
        max_new_tokens: most words per cell (default: every gene once plus ``<E>``, within ``max_length``).
        repeat_mask: ``"all"`` (no word twice, the cached release model), ``"official"`` or ``"none"``.
        seed: random seed.

    Returns:
        AnnData ``[n_prompts * n_per_prompt, vocabulary genes]``: ``X`` = level / n_levels (CSR),
        ``layers["levels"]`` integer levels, ``obs`` = the prompt columns, ``prompt_id``, ``n_genes`` (genes
        with a level > 0), ``n_words`` (words generated, ``<E>`` included) and ``stopped_at_end``;
        ``uns["scmulan_generation"]`` = parameters and checkpoint provenance.
    """
    records = _prompt_records(prompts)
    if isinstance(n_per_prompt, bool) or int(n_per_prompt) < 1:
        msg = f"n_per_prompt must be a positive integer, got {n_per_prompt!r}."
        raise MsfmInputError(msg)
    n_per_prompt = int(n_per_prompt)
    seed = _check_seed(seed)
    batch_size = _check_batch_size(batch_size)
    loaded = _load(checkpoint, device)
    vocab = loaded.vocab
    tokenizer = loaded.tokenizer()
    base = tokenizer.prompts(None, meta=records, task=GENERATE)  # validates categories and values
    idx = np.repeat(np.arange(len(records)), n_per_prompt)
    sentences = Sentences.from_lists([base.get(int(i))[0] for i in idx], [base.get(int(i))[1] for i in idx])
    options = _decode_options(
        loaded,
        prompt_len=int(base.lengths().max()),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        end_weight=end_weight,
        repeat_mask=repeat_mask,
    )
    allowed = _gene_end_mask(loaded) if constrained else None
    gen = _generate_sentences(
        loaded,
        sentences,
        [(i,) for i in range(len(idx))],
        options=options,
        allowed=allowed,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan generate",
    )
    obs = _meta_obs(records, n_per_prompt)
    obs["prompt_id"] = idx.astype(np.int64)
    obs.index = pd.Index([f"gen{p}_{c}" for p, c in zip(idx, np.tile(np.arange(n_per_prompt), len(records)))])
    adata = _cells_anndata(loaded, gen.ids, gen.levels, gen.stopped, obs)
    adata.uns[GENERATION_KEY] = _record(
        loaded,
        {
            "task": "generate",
            "n_prompts": len(records),
            "n_per_prompt": n_per_prompt,
            "greedy": greedy,
            "temperature": float(temperature),
            "top_k": top_k,
            "end_weight": float(end_weight),
            "max_new_tokens": options.max_new_tokens,
            "repeat_mask": repeat_mask,
            "constrained": constrained,
            "seed": seed,
            "vocabulary_genes": len(vocab.genes),
        },
    )
    return adata


def _gene_end_mask(loaded: LoadedScMulan) -> Tensor:
    vocab = loaded.vocab
    return id_mask(np.append(vocab.gene_ids, vocab.end_id), len(vocab), device=loaded.device)


# ----------------------------------------------------------------------------------------------------------
# in-silico perturbation
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Reference:
    """PCA of real cells in the binned space and the group centroids (gene space)."""

    mean: np.ndarray  # [G]
    components: np.ndarray  # [n_pcs, G]
    source: np.ndarray  # [G] centroid of the source group
    targets: dict[str, np.ndarray]  # name -> [G]
    n_cells: int
    n_source: int
    mapping: GeneMapping

    def project(self, x: np.ndarray) -> np.ndarray:
        """Shape: ``[..., G]`` -> ``[..., n_pcs]``."""
        return (x - self.mean) @ self.components.T


def _reference_pca(
    reference: AnnData,
    loaded: LoadedScMulan,
    *,
    group_key: str | None,
    source: str | None,
    targets: Sequence[str] | None,
    n_pcs: int,
    layer: str | None,
    pre_normalized: bool,
    gene_column: str | None,
    species: Literal["human", "mouse"],
    use_aliases: bool,
    min_panel_fraction: float,
    chunk_size: int = 4096,
) -> _Reference:
    """Stream the reference once: mean and covariance in the binned gene space, plus group sums.

    Memory is ``G x G`` (the vocabulary's genes), never cells x genes.
    """
    if group_key is None and (source is not None or targets):
        msg = "source= and targets= name groups of reference.obs[group_key]; pass group_key= too."
        raise MsfmInputError(msg)
    groups: np.ndarray | None = None
    if group_key is not None:
        if group_key not in reference.obs:
            msg = f"group_key {group_key!r} is not a column of reference.obs ({list(reference.obs.columns)[:20]})."
            raise MsfmInputError(msg)
        groups = reference.obs[group_key].astype(str).to_numpy()
        known = set(groups)
        wanted = ([source] if source is not None else []) + list(targets or [])
        missing = [g for g in wanted if g not in known]
        if missing:
            msg = (
                f"Groups {missing} are not in reference.obs[{group_key!r}]; available: {sorted(known)[:30]}."
            )
            raise MsfmInputError(msg)
    src, mapping = _prepare(
        reference,
        loaded,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )
    tokenizer = CellSentenceTokenizer(loaded.vocab, n_levels=loaded.config.n_levels)
    g = len(loaded.vocab.genes)
    total = np.zeros(g)
    gram = np.zeros((g, g))
    wanted_groups = ([source] if source is not None else []) + list(targets or [])
    sums = {name: np.zeros(g) for name in wanted_groups}
    counts = dict.fromkeys(wanted_groups, 0)
    n = src.n_obs
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(n, start + chunk_size))
        binned = tokenizer.binned_matrix(normalized_rows(src, rows, mapping)).astype(np.float64)
        total += np.asarray(binned.sum(axis=0)).ravel()
        gram += (binned.T @ binned).toarray()
        if groups is not None:
            for name in wanted_groups:
                sel = np.flatnonzero(groups[rows] == name)
                if sel.size:
                    sums[name] += np.asarray(binned[sel].sum(axis=0)).ravel()
                    counts[name] += sel.size
    if n < 2:
        msg = f"The reference has {n} cell(s); a PCA needs at least 2."
        raise MsfmInputError(msg)
    mean = total / n
    # Genes never expressed in the reference have zero variance and zero loadings: decompose the rest only.
    active = np.flatnonzero(np.diag(gram) > 0)
    if active.size == 0:
        msg = "No reference cell expresses any of the checkpoint's genes; the reference defines no PCA space."
        raise MsfmInputError(msg)
    cov = (gram[np.ix_(active, active)] - n * np.outer(mean[active], mean[active])) / (n - 1)
    _, evecs = np.linalg.eigh(cov)
    k = max(1, min(int(n_pcs), active.size, n - 1))
    comps = np.zeros((k, g))
    comps[:, active] = evecs[:, ::-1][:, :k].T  # [k, G], by decreasing variance
    # Deterministic signs: the largest-magnitude loading of each component is positive.
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    source_centroid = sums[source] / counts[source] if source is not None else mean
    return _Reference(
        mean=mean,
        components=comps,
        source=source_centroid,
        targets={t: sums[t] / counts[t] for t in (targets or [])},
        n_cells=n,
        n_source=counts[source] if source is not None else n,
        mapping=mapping,
    )


def _check_genes(vocab: CellSentenceVocab, genes: str | Sequence[str]) -> list[str]:
    genes = [g.strip() for g in genes.split(",")] if isinstance(genes, str) else [str(g) for g in genes]
    genes = [g for g in genes if g]
    if not genes:
        msg = "genes is empty; name at least one gene of the checkpoint's vocabulary, e.g. 'SPI1'."
        raise MsfmInputError(msg)
    known = set(vocab.genes)
    unknown = [g for g in genes if g not in known]
    if unknown:
        import difflib

        hints = {g: difflib.get_close_matches(g, vocab.genes, n=3, cutoff=0.7) for g in unknown[:5]}
        hint = "; ".join(f"{g}: did you mean {h}?" for g, h in hints.items() if h)
        msg = (
            f"{len(unknown)} gene(s) are not gene words of this checkpoint ({len(vocab.genes)} genes): {unknown[:10]}. "
            f"Only vocabulary genes can be perturbed.{' ' + hint if hint else ''}"
        )
        raise MsfmInputError(msg)
    if len(set(genes)) != len(genes):
        msg = f"genes lists some genes twice: {sorted({g for g in genes if genes.count(g) > 1})}."
        raise MsfmInputError(msg)
    return genes


def _check_levels(levels: Iterable[int], n_levels: int) -> list[int]:
    out = []
    for lv in levels:
        if isinstance(lv, bool) or not isinstance(lv, int | np.integer) or not 0 <= int(lv) <= n_levels:
            msg = f"levels must be integers in 0..{n_levels} (0 = not expressed, {n_levels} = the cell's maximum); got {lv!r}."
            raise MsfmInputError(msg)
        out.append(int(lv))
    if not out:
        msg = "levels is empty; give at least one level, e.g. [0, 5, 10]."
        raise MsfmInputError(msg)
    return out


def _top_changed(delta: np.ndarray, genes: Sequence[str], exclude: str | None, n_top: int) -> str:
    order = np.argsort(-np.abs(delta), kind="stable")
    parts = []
    for j in order:
        if len(parts) >= n_top or delta[j] == 0:
            break
        if genes[j] == exclude:
            continue
        parts.append(f"{genes[j]}:{delta[j]:+.3f}")
    return "; ".join(parts)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def perturb(
    checkpoint: Checkpoint,
    prompt: Mapping[str, Any],
    genes: str | Sequence[str],
    levels: Iterable[int] = range(0, 11),
    *,
    n_cells: int = 50,
    reference: AnnData | None = None,
    group_key: str | None = None,
    source: str | None = None,
    targets: Sequence[str] | None = None,
    n_pcs: int = 10,
    n_top_genes: int = 5,
    seed: int = 0,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    end_weight: float = 1.0,
    max_new_tokens: int | None = None,
    repeat_mask: RepeatMask = "all",
    constrained: bool = True,
    layer: str | None = None,
    pre_normalized: bool = False,
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    batch_size: int = 64,
    max_tokens: int | None = 32768,
    device: str = "auto",
    progress: bool = True,
) -> tuple[AnnData, pd.DataFrame]:
    """In-silico perturbation: generate cells with one gene forced to a level, and score the shift.

    For every ``(gene, level)`` the word ``(gene, level)`` is placed right after ``<SPToken1>`` (as if the model
    had written it first) and ``n_cells`` cells are generated; ``n_cells`` control cells come from the
    unperturbed prompt. Cell ``k`` of every condition uses the same random stream (common random numbers), so
    differences between conditions are not sampling noise of different streams. Level 0 means "not expressed"
    (a knock-out); the forced gene is part of the generated cell, as in the release's notebooks.

    Scores (the release's haematopoiesis case): with a ``reference`` of real cells, a PCA (``n_pcs``) is fitted
    on them in the binned space (per-cell levels / 10 over the vocabulary genes). Centroids are compared in PC
    space: ``s = centroid(generated) - centroid(reference source group)`` (all reference cells without
    ``source``), and for each target group ``T`` with direction ``d_T = centroid(T) - centroid(source)``:
    ``score_T = cos(s, d_T)``, ``projection_T = s . d_T / |d_T|`` and ``score_T_vs_control`` = cos of the shift
    from the control centroid. Without a reference only the gene-space comparison with the control is reported.

    A *gene screen* is this function with many genes (e.g. every transcription factor of the vocabulary) at the
    highest level; :func:`perturb_screen` does that and sorts the genes by score. Its cost is
    ``(len(genes) * len(levels) + 1) * n_cells`` generated cells.

    Args:
        checkpoint: msfm checkpoint directory or a loaded model.
        prompt: the start state, e.g. ``{"organ": "Bone marrow", "cell_type": "Haematopoietic stem cell"}``.
        genes: vocabulary genes to perturb (a list, or a comma-separated string).
        levels: levels to force, integers in ``0..n_levels``.
        n_cells: cells per condition (and for the control).
        reference: real cells (raw counts, or ``pre_normalized=True``) defining the PCA space and the groups.
        group_key: ``reference.obs`` column with the groups; ``source``: start group (e.g. ``"HSC"``);
            ``targets``: direction groups (e.g. ``["MEP", "LMPP"]``).
        n_top_genes: genes listed in ``top_changed`` (largest mean change vs control, the forced gene left out).
        seed, greedy, temperature, top_k, end_weight, max_new_tokens, repeat_mask, constrained: as in
            :func:`generate`.

    Returns:
        ``(cells, scores)``. ``cells``: AnnData of all generated cells (control first) as in :func:`generate`,
        with ``obs["condition"]`` (``"control"`` or ``"GENE@LEVEL"``), ``obs["gene"]``, ``obs["level"]`` (-1 for
        the control) and, with a reference, ``obsm["X_reference_pca"]``. ``scores``: one row per condition
        (control first) with ``gene``, ``level``, ``n_cells``, ``n_genes_mean``, ``delta_vs_control`` (L2 norm of
        the mean change in the binned gene space), ``top_changed``, and with a reference ``shift_norm`` (``|s|``),
        ``shift_vs_control`` (PC-space distance between the generated and control centroids) and for each
        target ``score_<T>``, ``projection_<T>``, ``score_<T>_vs_control``.
    """
    if not isinstance(prompt, Mapping):
        msg = f"prompt must be one dict of category -> value, got {type(prompt).__name__}."
        raise MsfmInputError(msg)
    if isinstance(n_cells, bool) or int(n_cells) < 1:
        msg = f"n_cells must be a positive integer, got {n_cells!r}."
        raise MsfmInputError(msg)
    n_cells = int(n_cells)
    seed = _check_seed(seed)
    batch_size = _check_batch_size(batch_size)
    loaded = _load(checkpoint, device)
    vocab = loaded.vocab
    gene_list = _check_genes(vocab, genes)
    level_list = _check_levels(levels, loaded.config.n_levels)
    tokenizer = loaded.tokenizer()
    base_ids, base_levels = tokenizer.prompts(None, meta=dict(prompt), task=GENERATE).get(0)
    ref = None
    if reference is not None:
        ref = _reference_pca(
            reference,
            loaded,
            group_key=group_key,
            source=source,
            targets=targets,
            n_pcs=n_pcs,
            layer=layer,
            pre_normalized=pre_normalized,
            gene_column=gene_column,
            species=species,
            use_aliases=use_aliases,
            min_panel_fraction=min_panel_fraction,
        )
    elif group_key is not None or source is not None or targets:
        msg = "group_key=, source= and targets= need a reference= AnnData of real cells."
        raise MsfmInputError(msg)

    conditions: list[tuple[str | None, int]] = [(None, -1)] + [
        (g, lv) for g in gene_list for lv in level_list
    ]
    ids_list, lv_list, streams = [], [], []
    for gene, lv in conditions:
        prefix_ids = [] if gene is None else [vocab.id(gene)]
        prefix_lv = [] if gene is None else [lv]
        for k in range(n_cells):
            ids_list.append(np.concatenate([base_ids, prefix_ids]).astype(np.int64))
            lv_list.append(np.concatenate([base_levels, prefix_lv]).astype(np.int64))
            streams.append((k,))
    sentences = Sentences.from_lists(ids_list, lv_list)
    options = _decode_options(
        loaded,
        prompt_len=int(sentences.lengths().max()),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        end_weight=end_weight,
        repeat_mask=repeat_mask,
    )
    gen = _generate_sentences(
        loaded,
        sentences,
        streams,
        options=options,
        allowed=_gene_end_mask(loaded) if constrained else None,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan perturb",
    )
    # The forced word is part of the generated cell (the release reads everything after <SPToken1>).
    cell_ids, cell_levels = [], []
    for i, (gene, lv) in enumerate(c for c in conditions for _ in range(n_cells)):
        pre_i = np.array([] if gene is None else [vocab.id(gene)], dtype=np.int64)
        pre_l = np.array([] if gene is None else [lv], dtype=np.int64)
        cell_ids.append(np.concatenate([pre_i, gen.ids[i]]))
        cell_levels.append(np.concatenate([pre_l, gen.levels[i]]))
    labels = ["control" if g is None else f"{g}@{lv}" for g, lv in conditions]
    obs = _meta_obs([dict(prompt)], len(conditions) * n_cells)
    obs["condition"] = pd.Categorical(np.repeat(labels, n_cells), categories=labels)
    obs["gene"] = pd.Categorical(np.repeat(["control" if g is None else g for g, _ in conditions], n_cells))
    obs["level"] = np.repeat([lv for _, lv in conditions], n_cells).astype(np.int64)
    obs.index = pd.Index([f"{lab}_{k}" for lab in labels for k in range(n_cells)])
    cells = _cells_anndata(loaded, cell_ids, cell_levels, gen.stopped, obs)

    x = cells.X
    n_cond = len(conditions)
    centroids = np.vstack(
        [np.asarray(x[c * n_cells : (c + 1) * n_cells].mean(axis=0)).ravel() for c in range(n_cond)]
    )
    n_genes_mean = cells.obs["n_genes"].to_numpy().reshape(n_cond, n_cells).mean(axis=1)
    rows: list[dict[str, Any]] = []
    control = centroids[0]
    pcs = ref.project(centroids) if ref is not None else None
    if ref is not None:
        # Sparse product: never densify the generated cells.
        proj = np.asarray(x @ ref.components.T) - ref.mean @ ref.components.T
        cells.obsm["X_reference_pca"] = proj.astype(np.float32)
        src_pc = ref.project(ref.source)
        dirs = {t: ref.project(c) - src_pc for t, c in ref.targets.items()}
    for c, (gene, lv) in enumerate(conditions):
        delta = centroids[c] - control
        row: dict[str, Any] = {
            "gene": "control" if gene is None else gene,
            "level": pd.NA if gene is None else lv,
            "n_cells": n_cells,
            "n_genes_mean": float(n_genes_mean[c]),
            "delta_vs_control": float(np.linalg.norm(delta)),
            "top_changed": _top_changed(delta, vocab.genes, gene, int(n_top_genes)),
        }
        if ref is not None and pcs is not None:
            s = pcs[c] - src_pc
            row["shift_norm"] = float(np.linalg.norm(s))
            row["shift_vs_control"] = float(np.linalg.norm(pcs[c] - pcs[0]))
            for t, d in dirs.items():
                nd = float(np.linalg.norm(d))
                row[f"score_{t}"] = _cos(s, d)
                row[f"projection_{t}"] = float(s @ d / nd) if nd > 0 else float("nan")
                row[f"score_{t}_vs_control"] = _cos(pcs[c] - pcs[0], d)
        rows.append(row)
    scores = pd.DataFrame(rows)
    scores["level"] = scores["level"].astype("Int64")
    cells.uns[PERTURBATION_KEY] = _record(
        loaded,
        {
            "task": "perturb",
            "prompt": {str(k): v for k, v in prompt.items()},
            "genes": gene_list,
            "levels": level_list,
            "n_cells": n_cells,
            "seed": seed,
            "greedy": greedy,
            "temperature": float(temperature),
            "top_k": top_k,
            "end_weight": float(end_weight),
            "max_new_tokens": options.max_new_tokens,
            "repeat_mask": repeat_mask,
            "constrained": constrained,
            "reference_cells": 0 if ref is None else ref.n_cells,
            "group_key": group_key,
            "source": source,
            "targets": list(targets or []),
            "n_pcs": 0 if ref is None else int(ref.components.shape[0]),
        },
        None if ref is None else ref.mapping,
    )
    return cells, scores


def perturb_screen(
    checkpoint: Checkpoint,
    prompt: Mapping[str, Any],
    genes: str | Sequence[str] | None = None,
    *,
    level: int | None = None,
    n_cells: int = 50,
    reference: AnnData | None = None,
    group_key: str | None = None,
    source: str | None = None,
    targets: Sequence[str] | None = None,
    sort_by: str | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Regulator screen: :func:`perturb` every gene at one level (default: the highest) and rank them.

    ``genes`` defaults to every gene of the vocabulary (2,000 for the official model: ``2,001 * n_cells``
    generated cells). Rows are sorted by ``sort_by`` (default ``score_<first target>``, else
    ``delta_vs_control``), largest first, with the control row last.
    """
    loaded = _load(checkpoint, kwargs.pop("device", "auto"))
    level = loaded.config.n_levels if level is None else level
    _, scores = perturb(
        loaded,
        prompt,
        list(loaded.vocab.genes) if genes is None else genes,
        [level],
        n_cells=n_cells,
        reference=reference,
        group_key=group_key,
        source=source,
        targets=targets,
        **kwargs,
    )
    column = sort_by or (f"score_{targets[0]}" if targets else "delta_vs_control")
    if column not in scores.columns:
        msg = f"sort_by={column!r} is not a score column; have {list(scores.columns)}."
        raise MsfmInputError(msg)
    is_control = scores["gene"] == "control"
    ranked = scores[~is_control].sort_values(column, ascending=False, kind="stable", na_position="last")
    return pd.concat([ranked, scores[is_control]]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# next state
# ----------------------------------------------------------------------------------------------------------
def next_state(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    n_per_cell: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    end_weight: float = 1.0,
    max_new_tokens: int | None = None,
    repeat_mask: RepeatMask = "generated",
    seed: int = 0,
    layer: str | None = None,
    pre_normalized: bool = False,
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    device: str = "auto",
    progress: bool = True,
) -> AnnData:
    """Predict the next state of each cell (``<SPToken2>``): a generated cell per input cell.

    Design: the release reserves ``<SPToken2>`` without using it; msfm uses it as a next-state task token. A
    model fine-tuned with ``msfm scmulan train`` on pairs of cells ordered by a time or pseudotime column
    learns to continue ``[genes of cell t] + <SPToken2>`` with the gene words of a cell at the next time point
    (see :mod:`msfm.models.scmulan.train`). Here each input cell is written as that prompt and decoded into
    genes and ``<E>`` only. The official checkpoint was never trained on this task, so its outputs mean nothing
    until such fine-tuning. Repeats are banned among the generated words only (``repeat_mask="generated"``):
    the next cell usually re-uses most genes of the prompt cell, which ``"all"`` would forbid.

    Prompt length: the generated cell may hold up to ``max_new_tokens`` words (default: half of ``max_length``
    or every gene once, whichever is smaller); input cells with more expressed genes than the remaining room are
    truncated to their top-expressed genes, with a warning.

    Returns:
        AnnData ``[n_obs * n_per_cell, vocabulary genes]`` as in :func:`generate`, with ``obs["source_cell"]``
        (the input obs name) and ``uns["scmulan_next_state"]`` (parameters, provenance, gene mapping).
    """
    if isinstance(n_per_cell, bool) or int(n_per_cell) < 1:
        msg = f"n_per_cell must be a positive integer, got {n_per_cell!r}."
        raise MsfmInputError(msg)
    n_per_cell = int(n_per_cell)
    seed = _check_seed(seed)
    batch_size = _check_batch_size(batch_size)
    loaded = _load(checkpoint, device)
    vocab = loaded.vocab
    source, mapping = _prepare(
        adata,
        loaded,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )
    max_len = loaded.config.max_length
    if max_new_tokens is None:
        max_new_tokens = min(len(vocab.genes) + 1, max_len // 2)
    budget = _gene_budget(loaded, int(max_new_tokens) + 1, "next_state")
    options = _decode_options(
        loaded,
        prompt_len=max_len - int(max_new_tokens),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        end_weight=end_weight,
        repeat_mask=repeat_mask,
    )
    tokenizer = loaded.tokenizer(max_genes=budget)
    allowed = _gene_end_mask(loaded)
    n = source.n_obs
    ids_out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * (n * n_per_cell)
    lv_out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * (n * n_per_cell)
    stopped = np.zeros(n * n_per_cell, dtype=bool)
    n_genes = np.zeros(n, dtype=np.int64)
    with torch.inference_mode(), _progress(n, "scMulan next state", progress) as bar:
        for batch in iter_prompt_batches(
            source, mapping, tokenizer, task=NEXT_STATE, batch_size=batch_size, max_tokens=max_tokens
        ):
            rows = batch.rows
            n_genes[rows] = batch.n_genes
            # Copies of a cell sit next to each other; output position = row * n_per_cell + copy.
            rep = n_per_cell
            ids = batch.ids.repeat_interleave(rep, dim=0).to(loaded.device)
            lv = batch.levels.repeat_interleave(rep, dim=0).to(loaded.device)
            mask = batch.attention_mask.repeat_interleave(rep, dim=0).to(loaded.device)
            out_pos = (rows[:, None] * rep + np.arange(rep)[None, :]).ravel()
            if options.greedy:
                model: Any = loaded.model
            else:
                model = _PerCellSampler(
                    loaded.model,
                    [_stream_seed(seed, (int(p),)) for p in out_pos],
                    temperature=temperature,
                    top_k=top_k,
                    allowed=allowed,
                    repeat_mask=options.repeat_mask,
                )
            res = generate_tokens(model, ids, lv, mask, _run_options(options), allowed=allowed)
            gen_ids, gen_lv, n_new = res.ids.cpu().numpy(), res.levels.cpu().numpy(), res.n_new.cpu().numpy()
            for j, p in enumerate(out_pos):
                k = int(n_new[j])
                ids_out[p] = gen_ids[j, :k].copy()
                lv_out[p] = gen_lv[j, :k].copy()
                stopped[p] = k > 0 and gen_ids[j, k - 1] == vocab.end_id
            bar.update(len(rows))
    n_trunc = _warn_truncated(n_genes, budget, max_len)
    names = np.asarray(adata.obs_names).astype(str)
    obs = pd.DataFrame(
        {
            "source_cell": pd.Categorical(np.repeat(names, n_per_cell)),
            "copy": np.tile(np.arange(n_per_cell), n).astype(np.int64),
        }
    )
    obs.index = pd.Index([f"{c}_next{k}" for c in names for k in range(n_per_cell)])
    out = _cells_anndata(loaded, ids_out, lv_out, stopped, obs)
    out.obs["source_n_genes"] = np.repeat(n_genes, n_per_cell)
    out.uns[NEXT_STATE_KEY] = _record(
        loaded,
        {
            "task": "next_state",
            "n_per_cell": n_per_cell,
            "greedy": greedy,
            "temperature": float(temperature),
            "top_k": top_k,
            "end_weight": float(end_weight),
            "max_new_tokens": options.max_new_tokens,
            "repeat_mask": repeat_mask,
            "seed": seed,
            "n_truncated_cells": n_trunc,
            "layer": layer,
            "pre_normalized": pre_normalized,
        },
        mapping,
        source.kind,
    )
    return out
