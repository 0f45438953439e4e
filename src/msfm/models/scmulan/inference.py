"""scMulan checkpoints and batched sentence decoding over any cell source.

A checkpoint directory is the shared msfm layout (``model.safetensors``, ``config.json``, ``meta.json``,
``genes.txt``) with the whole vocabulary stored in ``meta.json`` under ``extra.vocabulary`` and the
preprocessing under ``preprocessing``. Cells are read chunk by chunk, mapped onto the vocabulary's genes,
normalised (log1p of counts per 10k unless already normalised), binned per cell into levels, turned into
prompts, sorted by length (length bucketing: similar lengths share a left-padded batch) and decoded on the
model's device. Results come back with their row indices so memory stays flat in the number of cells.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from msfm.data import CellSource, GeneMapping
from msfm.data.normalize import normalized_rows
from msfm.data.samplers import length_buckets
from msfm.errors import CheckpointError
from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.model import ScMulan
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.devices import resolve_device
from msfm.tokenizers.cell_sentence import CellSentenceTokenizer, CellSentenceVocab, Sentences

logger = logging.getLogger(__name__)

FAMILY = "scmulan"
GeneOrder = Literal["reverse", "forward", "random"]


def preprocessing_record(*, n_levels: int = 10, gene_order: GeneOrder = "reverse") -> dict[str, Any]:
    """The preprocessing that travels with every scMulan checkpoint."""
    return {
        "normalization": "log1p(counts / total * 1e4), total over all genes of the cell, float64; already-normalised input as it is",
        "target_sum": 1e4,
        "log1p": True,
        "binning": "per cell: levels = digitize(v, linspace(0, max_v, n_levels + 1), right=True), float64",
        "n_levels": n_levels,
        "genes": "expressed (> 0) vocabulary genes only",
        "gene_order": gene_order,
        "meta_and_task_level": 0,
    }


@dataclass
class LoadedScMulan:
    """A checkpoint made ready for inference: model on its device, config, vocabulary, metadata."""

    model: ScMulan
    config: ScMulanConfig
    vocab: CellSentenceVocab
    meta: dict[str, Any]
    path: Path | None
    device: torch.device
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def tokenizer(
        self, *, gene_order: GeneOrder | None = None, max_genes: int | None = None
    ) -> CellSentenceTokenizer:
        """The tokenizer the checkpoint was trained with (gene order and levels from its preprocessing)."""
        order = gene_order or self.preprocessing.get("gene_order", "reverse")
        if order == "random":  # inference is deterministic; random order is a training augmentation
            order = "reverse"
        return CellSentenceTokenizer(
            self.vocab, n_levels=self.config.n_levels, gene_order=order, max_genes=max_genes
        )


def save_model(
    path: str | Path,
    model: ScMulan,
    vocab: CellSentenceVocab,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its vocabulary as an msfm checkpoint directory (atomically)."""
    if len(vocab) != model.config.vocab_size:
        msg = f"vocabulary has {len(vocab)} tokens but the model expects {model.config.vocab_size}."
        raise CheckpointError(msg)
    extra = dict(extra_meta or {})
    extra["vocabulary"] = vocab.to_dict()
    extra["vocabulary_sha256"] = vocab.sha256()
    return save_checkpoint(
        path,
        family=FAMILY,
        config=model.config,
        state_dict=model.state_dict(),
        gene_panel=list(vocab.genes),
        gene_panel_name="scmulan",
        preprocessing=dict(preprocessing or preprocessing_record(n_levels=model.config.n_levels)),
        extra_meta=extra,
    )


def load_model(
    checkpoint: str | Path | LoadedScMulan, *, device: str | torch.device = "auto"
) -> LoadedScMulan:
    """Load an msfm scMulan checkpoint directory (made by ``convert`` or ``train``)."""
    if isinstance(checkpoint, LoadedScMulan):
        return checkpoint
    ckpt = load_checkpoint(checkpoint, family=FAMILY)
    config = ScMulanConfig(**ckpt.config)
    vocab_dict = ckpt.meta.get("extra", {}).get("vocabulary")
    if vocab_dict is None:
        msg = f"{ckpt.path} has no vocabulary in meta.json (extra.vocabulary); re-create it with msfm scmulan convert."
        raise CheckpointError(msg)
    vocab = CellSentenceVocab.from_dict(vocab_dict)
    if len(vocab) != config.vocab_size:
        msg = f"{ckpt.path}: vocabulary has {len(vocab)} tokens but the config says vocab_size={config.vocab_size}."
        raise CheckpointError(msg)
    model = ScMulan(config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    dev = resolve_device(device)
    model.to(dev).eval()
    return LoadedScMulan(
        model=model,
        config=config,
        vocab=vocab,
        meta=ckpt.meta,
        path=Path(ckpt.path),
        device=dev,
        preprocessing=dict(ckpt.meta.get("preprocessing") or {}),
    )


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
