"""Cell embeddings of an ``.h5ad`` file on several devices and nodes (Lightning DDP): ``embed(..., devices=...)``.

Every rank streams its own shard of the backed file (the distributed sampler hands out ordered shards, so reads
stay contiguous) and writes its part; global rank 0 merges the parts in file order and writes the output file (a
copy of the input plus the results), atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from msfm.data import CellReadOptions, CellSource, GenePanel, prepare_cells, read
from msfm.models.scfoundation.inference import encode_batch
from msfm.models.scfoundation.loading import CheckpointLike, backbone_of, load
from msfm.models.scfoundation.provenance import uns_record
from msfm.runtime.adata import field_key, obsm_key
from msfm.runtime.devices import rank_world
from msfm.runtime.precision import resolve_precision
from msfm.tokenizers.gene_panel import ScFoundationTokenizer

__all__ = ["embed_distributed"]


class _CellIndexDataset(torch.utils.data.Dataset):
    """Map-style dataset of cell positions; the collate function reads, maps and tokenises a batch.

    Each process (DDP rank, DataLoader worker) opens the backed file itself on first use, so nothing large
    is pickled between processes.
    """

    def __init__(
        self, path: Path, panel: GenePanel, *, target_depth: str, options: CellReadOptions, num_genes: int
    ) -> None:
        adata = read(path, backed=True)
        try:
            self.n_obs = adata.n_obs
            self.obs_names = list(adata.obs_names)
            _, self.mapping = prepare_cells(adata, panel, options)
        finally:
            adata.file.close()
        self.path = path
        self.options = options
        self.target_depth = target_depth
        self.num_genes = num_genes
        self._source: CellSource | None = None

    def __len__(self) -> int:
        return self.n_obs

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        if self._source is None:
            self._source = CellSource(
                read(self.path, backed=True),
                layer=self.options.layer,
                pre_normalized=self.options.pre_normalized,
            )
        rows = np.asarray(idx, dtype=np.int64)
        tokenizer = ScFoundationTokenizer(num_genes=self.num_genes)
        enc = tokenizer.encode(
            self.mapping.apply(self._source.rows(rows)),
            self.target_depth,
            pre_normalized=self.options.pre_normalized,
        )
        batch = tokenizer.collate(enc, np.arange(len(rows)))
        batch["zero_count"] = torch.as_tensor(np.asarray(enc.zero_count))
        return batch


def embed_distributed(
    data: Path,
    out: Path,
    checkpoint: CheckpointLike,
    *,
    overwrite: bool = True,
    options: CellReadOptions,
    key_added: str,
    params: dict[str, Any],
    accelerator: str,
    devices: int | str | list[int] | None,
    strategy: str,
    num_nodes: int,
    num_workers: int,
    target_depth: str,
    pool: str,
    batch_size: int,
    precision: str,
    progress: bool,
) -> AnnData:
    """The distributed path of :func:`msfm.models.scfoundation.embedding.embed` (arguments checked there)."""
    from msfm.engine.predict import distributed_predict
    from msfm.engine.trainer import TrainerOptions
    from msfm.runtime.h5ad_stream import H5adResultWriter

    loaded = backbone_of(load(checkpoint, device="cpu"))
    dataset = _CellIndexDataset(
        data, loaded.vocab, target_depth=target_depth, options=options, num_genes=loaded.config.num_genes
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate, num_workers=num_workers
    )

    # Decided once for the accelerator (every rank of one job runs on the same kind of device).
    choice = resolve_precision(precision, accelerator)

    def predict(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, t = encode_batch(model, batch, batch["values"].device, choice.precision)
        pooled = model.pool_cell_embedding(hidden, t["gene_ids"], t["padding_mask"], mode=pool).float()
        # The zero-count flag rides along as the last column and is split off after the merge.
        return torch.cat([pooled, batch["zero_count"].to(pooled.dtype)[:, None]], dim=1)

    trainer_options = TrainerOptions(
        accelerator=accelerator,
        devices="auto" if devices is None else devices,
        strategy=strategy,
        num_nodes=num_nodes,
        progress_bar=progress,
    )
    parts = out.with_name(f".{out.name}.parts")
    merged = distributed_predict(
        predict, loader, parts, options=trainer_options, model=loaded.model.eval(), overwrite=True
    )
    record_params = {**params, "distributed": True, "devices": str(devices), "num_nodes": num_nodes}
    if rank_world()[0] != 0:
        # Rank 0 writes the file; the other ranks hold no results, only where they are.
        other = AnnData(obs=pd.DataFrame(index=pd.Index(dataset.obs_names)))
        other.uns[key_added] = {
            "embed": {"out": str(out), "params": record_params, "precision": choice.record()}
        }
        return other
    emb, zero = np.asarray(merged[:, :-1], dtype=np.float32), np.asarray(merged[:, -1]) > 0.5
    with H5adResultWriter(data, out, overwrite=overwrite) as writer:
        ds = writer.create_obsm(obsm_key(key_added), emb.shape[1])
        writer.write_rows(ds, np.arange(len(emb)), emb)
        col = writer.create_obs_column(field_key(key_added, "zero_count"), bool)
        writer.write_rows(col, np.arange(len(zero)), zero)
        kind = "normalized" if options.pre_normalized else "counts"
        writer.write_uns(key_added, "embed", uns_record(loaded, dataset.mapping, kind, record_params, choice))
    shutil.rmtree(parts, ignore_errors=True)
    return read(out, backed="r")
