"""The decoder pass over a cell source: predicted expression (``enhance``) or gene context embeddings (``embed_genes``).

The decoder sees every gene of the panel (19,266 positions for the released model), so batches are small and
unbucketed by token budget; results come back with their source rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from msfm.data import CellSource, GeneMapping
from msfm.models.scfoundation.inference import Precision, iter_batches
from msfm.models.scfoundation.loading import tokenizer_for
from msfm.runtime.devices import autocast_context
from msfm.runtime.loaded import Loaded
from msfm.runtime.progress import progress_bar

__all__ = ["decode_batches"]


@torch.inference_mode()
def decode_batches(
    loaded: Loaded,
    source: CellSource,
    mapping: GeneMapping,
    *,
    target_depth: str,
    batch_size: int,
    precision: Precision,
    pre_normalized: bool,
    head: bool,
    progress: bool,
    desc: str,
    rows: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(source rows, decoder output)`` batches.

    Args:
        head: ``True`` gives predicted expression ``[b, G + 2]`` (log1p CP10k scale), ``False`` the decoder's
            context embeddings ``[b, G + 2, decoder_dim]``.
        rows: only these source rows (sorted), default all.
    """
    tokenizer = tokenizer_for(loaded)
    model, device = loaded.model, loaded.device
    with progress_bar(source.n_obs if rows is None else len(rows), desc, enabled=progress) as bar:
        for batch in iter_batches(
            source,
            mapping,
            tokenizer,
            target_depth,
            rows=rows,
            batch_size=batch_size,
            max_tokens=None,
            pre_normalized=pre_normalized,
            with_full_values=True,
        ):
            t = {k: v.to(device) for k, v in batch.tensors.items()}
            with autocast_context(device, precision):
                hidden = model.encode(t["values"], t["gene_ids"], t["padding_mask"])
                z = model.decode(hidden, t["gene_ids"], t["padding_mask"], t["full_values"])
                out = model.predict_expression(z) if head else z
            yield batch.rows, out.float().cpu().numpy()
            bar.update(len(batch.rows))
