"""Batched scFoundation inference on any cell source (in memory or backed), on CPU or CUDA.

Cells are read chunk by chunk, mapped onto the gene panel, sorted by length inside each chunk
(length bucketing: cells of similar length share a batch, so little compute goes to padding), and
run through the model under an optional autocast. Results are handed back with their row indices, so
callers can write them anywhere (an in-memory array or an on-disk dataset) and memory stays flat in
the number of cells.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from msfm.data import CellSource, GeneMapping
from msfm.data.samplers import length_buckets
from msfm.models.scfoundation.model import ScFoundation
from msfm.runtime.devices import Precision, autocast_context
from msfm.tokenizers.gene_panel import ScFoundationTokenizer, TargetDepth

logger = logging.getLogger(__name__)

__all__ = ["Batch", "Precision", "encode_batch", "iter_batches"]


@dataclass
class Batch:
    """One model batch and where its cells sit in the source."""

    rows: np.ndarray  # source row indices, [b]
    tensors: dict[str, torch.Tensor]
    zero_count: np.ndarray  # [b] bool
    panel_counts: object  # scipy CSR [b, G]: the panel-aligned input, for callers that need it


def iter_batches(
    source: CellSource,
    mapping: GeneMapping,
    tokenizer: ScFoundationTokenizer,
    target_depth: str | TargetDepth,
    *,
    rows: np.ndarray | None = None,
    batch_size: int = 64,
    max_tokens: int | None = None,
    chunk_size: int = 4096,
    pre_normalized: bool = False,
    with_full_values: bool = False,
) -> Iterator[Batch]:
    """Yield length-bucketed batches over the cells of ``source`` (or only ``rows`` of it).

    ``max_tokens`` caps ``batch * longest sequence`` so long cells (bulk-like, >10k genes) get small batches
    instead of running out of memory. ``Batch.rows`` are always positions in ``source``.
    """
    target = TargetDepth.parse(target_depth) if isinstance(target_depth, str) else target_depth
    if rows is None:
        chunks = ((c.obs_idx, c.X) for c in source.iter_chunks(chunk_size))
    else:
        rows = np.asarray(rows, dtype=np.int64)
        chunks = (
            (rows[i : i + chunk_size], source.rows(rows[i : i + chunk_size]))
            for i in range(0, len(rows), chunk_size)
        )
    for obs_idx, csr in chunks:
        panel = mapping.apply(csr)
        enc = tokenizer.encode(panel, target, pre_normalized=pre_normalized)
        lengths = np.asarray(enc.lengths)
        order = np.argsort(lengths, kind="stable")
        for group in length_buckets(order, lengths, batch_size=batch_size, max_tokens=max_tokens):
            tensors = tokenizer.collate(enc, group)
            if with_full_values:
                tensors["full_values"] = tokenizer.full_values(enc, group)
            yield Batch(
                rows=np.asarray(obs_idx)[group],
                tensors=tensors,
                zero_count=np.asarray(enc.zero_count)[group],
                panel_counts=panel[group],
            )


@torch.inference_mode()
def encode_batch(
    model: ScFoundation,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    precision: Precision,
    *,
    layout: Literal["auto", "packed", "padded"] = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the encoder on one collated batch; returns (hidden ``[b, n, d]``, tensors on device).

    ``layout="packed"`` concatenates the cells without padding (every matmul over real tokens only,
    attention per cell): fastest on CPU. ``"padded"`` runs one masked batch: better on GPUs, where one
    large kernel beats many small ones. ``"auto"`` picks packed on CPU and padded elsewhere. Both give
    the same values at real tokens; padded rows of the returned hidden state are zero (packed) or
    meaningless (padded) and are excluded by the pooling.
    """
    t = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
    if layout == "auto":
        layout = "packed" if device.type == "cpu" else "padded"
    with autocast_context(device, precision):
        if layout == "padded":
            hidden = model.encode(t["values"], t["gene_ids"], t["padding_mask"])
        else:
            real = ~t["padding_mask"]
            seq_lens = real.sum(1).tolist()
            packed = model.encode_packed(t["values"][real], t["gene_ids"][real], seq_lens)
            hidden = packed.new_zeros(*real.shape, packed.shape[-1])
            hidden[real] = packed
    return hidden, t
