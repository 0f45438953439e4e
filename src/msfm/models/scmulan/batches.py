"""Length-bucketed, left-padded prompt batches over any cell source (memory stays flat in the number of cells).

Cells are read chunk by chunk, mapped onto the vocabulary's genes, normalised (log1p of counts per 10k over all
of the cell's genes unless already normalised), binned per cell into levels, turned into prompts, sorted by
length (similar lengths share a left-padded batch) and handed out with their row indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msfm.data import CellSource, GeneMapping
from msfm.data.normalize import normalized_rows
from msfm.data.samplers import length_buckets
from msfm.tokenizers.cell_sentence import CellSentenceTokenizer, Sentences

__all__ = ["SentenceBatch", "iter_prompt_batches"]


@dataclass
class SentenceBatch:
    """One left-padded batch of prompts and where its cells sit in the source."""

    rows: np.ndarray  # [b] source rows
    ids: torch.Tensor  # [b, n]
    levels: torch.Tensor  # [b, n]
    attention_mask: torch.Tensor  # [b, n], True = real word
    n_genes: np.ndarray  # [b] expressed vocabulary genes per cell


def iter_prompt_batches(
    source: CellSource,
    mapping: GeneMapping,
    tokenizer: CellSentenceTokenizer,
    *,
    task: str,
    meta: Sequence[Mapping[str, str]] | None = None,
    rows: np.ndarray | None = None,
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    chunk_size: int = 4096,
) -> Iterator[SentenceBatch]:
    """Yield length-bucketed, left-padded prompt batches (``[meta words], genes, task``) over ``source``.

    ``meta``, when given, has one mapping per source row (category -> value) and is prepended to each prompt.
    """
    if rows is None:
        rows = np.arange(source.n_obs, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, len(rows), chunk_size):
        obs_idx = rows[start : start + chunk_size]
        # log1p CP10k over all of the cell's genes, then its vocabulary genes (as the release).
        panel = normalized_rows(source, obs_idx, mapping)
        genes = tokenizer.gene_sentences(panel)
        chunk_meta = None if meta is None else [meta[int(r)] for r in obs_idx]
        prompts: Sentences = tokenizer.prompts(genes, meta=chunk_meta, task=task)
        lengths = prompts.lengths()
        order = np.argsort(lengths, kind="stable")
        for group in length_buckets(order, lengths, batch_size=batch_size, max_tokens=max_tokens):
            ids, levels, mask = tokenizer.left_pad(prompts, group)
            yield SentenceBatch(
                rows=obs_idx[group],
                ids=ids,
                levels=levels,
                attention_mask=mask,
                n_genes=np.asarray(genes.lengths())[group],
            )
