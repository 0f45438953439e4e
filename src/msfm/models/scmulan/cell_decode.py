"""Decoding cells with a task token: ``[meta words] + genes + task`` for every cell, a few greedy steps each.

The shared machinery of annotation, organ/region prediction and embeddings: mapping an AnnData onto the
vocabulary, per-cell metadata words from ``obs`` columns, the gene budget of long cells, and one pass over all
cells that records the chosen words, their probabilities under the model's full softmax and an embedding.

Long sentences: the model accepts at most ``config.max_length`` words (prompt plus generated). A cell with more
expressed genes than fit is **truncated to its top-expressed genes** (levels are still binned against the whole
cell, so the kept words are unchanged) and a warning says how many cells were affected. The official
vocabulary (2,000 genes, ``max_length`` 2,048) never needs this for annotation.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import Tensor, nn

from msfm.data import CellReadOptions, CellSource, GeneMapping, GenePanel, prepare_cells
from msfm.errors import MsfmInputError
from msfm.models.scmulan.batches import iter_prompt_batches
from msfm.models.scmulan.decoding import DecodeOptions, GenerationResult, RepeatMask, generate_tokens, id_mask
from msfm.models.scmulan.loading import tokenizer_for
from msfm.runtime.loaded import Loaded
from msfm.runtime.progress import progress_bar
from msfm.tokenizers.cell_sentence import CellSentenceVocab

__all__ = ["UNCLASSIFIED", "CellDecode", "Embedding", "decode_cells", "prepare"]

UNCLASSIFIED = CellSentenceVocab.UNCLASSIFIED
Embedding = Literal["official", "task", "mean"]


def prepare(adata: AnnData, loaded: Loaded, read: CellReadOptions) -> tuple[CellSource, GeneMapping]:
    """Validate the matrix and map the input genes onto the checkpoint's gene words.

    ``harmonize_genes`` raises below ``min_panel_fraction`` and warns below half of the vocabulary's genes.
    """
    return prepare_cells(adata, GenePanel.from_symbols(loaded.vocab.genes, name="scmulan"), read)


def gene_budget(loaded: Loaded, n_other: int, what: str) -> int | None:
    """Most gene words a prompt may hold next to ``n_other`` other words (None = no limit needed)."""
    budget = loaded.config.max_length - n_other
    if budget < 1:
        msg = (
            f"{what} needs {n_other} words besides the genes, more than the model's max_length "
            f"({loaded.config.max_length}). Use fewer metadata words or a smaller max_new_tokens."
        )
        raise MsfmInputError(msg)
    return None if budget >= len(loaded.vocab.genes) else budget


def warn_truncated(n_genes: np.ndarray, budget: int | None, max_length: int) -> int:
    """Warn about cells cut to ``budget`` genes; returns how many."""
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


def meta_rows(adata: AnnData, meta: Mapping[str, str] | None, vocab: CellSentenceVocab) -> list[dict] | None:
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


def category_mask(vocab: CellSentenceVocab, names: Sequence[str], device: torch.device) -> Tensor | None:
    """``[V]`` mask of the tokens of the categories ``names`` present in the vocabulary (None: none present)."""
    present = [n for n in names if n in vocab.categories]
    if not present:
        return None
    return id_mask(vocab.category_ids(*present), len(vocab), device=device)


def categorical(values: Iterable[str]) -> pd.Categorical:
    return pd.Categorical(list(values))


@dataclass
class CellDecode:
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
def decode_cells(
    loaded: Loaded,
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
) -> CellDecode:
    """Greedy task decoding over every cell, also recording each step's unconstrained token probabilities.

    The full-vocabulary probabilities come from a forward hook on the entity head: ``generate_tokens`` runs the
    head once per decoding step (prefill, then each fed-back word), so the hook sees exactly the logits each
    step chose from, before any constraint or repeat ban. No extra forward pass is needed.
    """
    vocab = loaded.vocab
    n_meta = (
        0 if meta is None else max((len([v for v in m.values() if v is not None]) for m in meta), default=0)
    )
    budget = gene_budget(loaded, n_meta + 1 + steps, f"The {task} task")
    tokenizer = tokenizer_for(loaded, max_genes=budget)
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
        with progress_bar(n, desc, enabled=progress) as bar:
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
                    emb_out[rows] = pick_embedding(res, embedding).cpu().numpy()
                bar.update(len(rows))
    finally:
        handle.remove()
    n_trunc = warn_truncated(n_genes, budget, loaded.config.max_length)
    return CellDecode(ids_out, prob_out, tail_out, emb_out, n_genes, n_trunc)


def pick_embedding(res: GenerationResult, embedding: Embedding | None) -> Tensor:
    """Shape: ``[b, d]``; NaN (no fed-back token) becomes 0."""
    if embedding == "official":
        emb = res.hidden[:, 0]
    elif embedding == "task":
        emb = res.prompt_last_hidden
    else:
        emb = res.prompt_mean_hidden
    return torch.nan_to_num(emb.float(), nan=0.0)


def check_embedding(embedding: str) -> Embedding:
    if embedding not in ("official", "task", "mean"):
        msg = (
            f"embedding must be 'official' (hidden state at the generated coarse cell-type word, as released), "
            f"'task' (hidden state at the task token) or 'mean' (mean over the prompt), got {embedding!r}."
        )
        raise MsfmInputError(msg)
    return embedding  # type: ignore[return-value]


def label_slots(dec: CellDecode, release: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


def token_names(vocab: CellSentenceVocab, ids: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Token names; ids outside ``allowed`` (or negative) become Unclassified."""
    table = np.array(vocab.tokens, dtype=object)
    ok = np.isin(ids, allowed) & (ids >= 0)
    return np.where(ok, table[np.clip(ids, 0, len(table) - 1)], UNCLASSIFIED)


def generated_text(vocab: CellSentenceVocab, ids: np.ndarray) -> list[str]:
    """The decoded words of each cell, ``"; "``-joined."""
    return ["; ".join(vocab.tokens[i] for i in row if i >= 0) for row in ids]
