"""scFoundation on AnnData: cell embeddings, read-depth enhancement, gene context embeddings, conversion.

Everything takes raw counts under the shared single-cell contract (``layers["counts"]``, else integer ``X``;
normalised input only with ``pre_normalized=True``), maps genes onto the checkpoint's panel (always
re-indexed, with a coverage report in ``uns``) and runs batched on CPU or CUDA.

Results follow scverse conventions:

* ``obsm["X_scfoundation"]``: cell embeddings (``pool="all"``: 4 x encoder dim, order S, T, max, mean);
* ``layers["scfoundation_enhanced"]``: read-depth-enhanced expression (log1p of counts per 10k);
* ``obs["scfoundation_zero_count"]``: cells without any count on the panel (kept, flagged);
* ``uns["scfoundation"]``: parameters, checkpoint provenance and the gene-mapping report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData

from msfm.data import CellSource, GeneMapping, GenePanel, prepare_cells
from msfm.errors import MsfmInputError
from msfm.models.scfoundation.inference import (
    LoadedModel,
    Precision,
    encode_batch,
    iter_batches,
    load_model,
)
from msfm.runtime.atomic import check_output_free
from msfm.runtime.devices import autocast_context
from msfm.tokenizers.gene_panel import ScFoundationTokenizer, TargetDepth

logger = logging.getLogger(__name__)

Pool = Literal["all", "max"]
UNS_KEY = "scfoundation"
ZERO_COUNT_COLUMN = "scfoundation_zero_count"


# ----------------------------------------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------------------------------------
# Shared with every single-cell family: validate the counts, map the genes onto the panel.
prepare = prepare_cells


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cell", disable=not enabled, leave=False)


def _uns_record(
    loaded: LoadedModel, mapping: GeneMapping, kind: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Parameters, input kind (``counts`` or ``normalized``), checkpoint provenance and the gene mapping."""
    return {
        "params": {
            k: (v if isinstance(v, str | int | float | bool) or v is None else str(v))
            for k, v in params.items()
        },
        "input": {"kind": kind},
        "checkpoint": {
            "path": str(loaded.path),
            "msfm_version": loaded.meta.get("msfm_version"),
            "source": loaded.meta.get("source", loaded.meta.get("extra", {}).get("source")),
        },
        "gene_mapping": mapping.to_uns(),
    }


# ----------------------------------------------------------------------------------------------------------
# cell embeddings
# ----------------------------------------------------------------------------------------------------------
def embed(
    adata: AnnData,
    checkpoint: str | os.PathLike[str] | LoadedModel,
    *,
    layer: str | None = None,
    pre_normalized: bool = False,
    target_depth: str = "t4",
    pool: Pool = "all",
    batch_size: int = 64,
    max_tokens: int | None = 65536,
    device: str = "auto",
    precision: Precision = "32",
    key_added: str = "X_scfoundation",
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Cell embeddings from the scFoundation encoder, written to ``adata.obsm[key_added]``.

    Args:
        adata: cells x genes with raw counts (``layers["counts"]`` or integer ``X``); backed AnnData works.
        checkpoint: an msfm checkpoint directory (``msfm scfoundation convert`` or ``pretrain``).
        layer: matrix to read instead of the automatic choice.
        pre_normalized: accept an already log-normalised matrix (depth tokens then use its row sums).
        target_depth: ``tN`` (T = N), ``aY`` (T = S + Y) or ``fX`` (T = log10(total * X)); log10 scale.
        pool: ``all`` = concat[S, T, max, mean] (4 x dim); ``max`` = max over all tokens (dim).
        batch_size: cells per batch; ``max_tokens`` caps cells x longest length per batch.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        precision: ``32``, ``bf16`` or ``16`` (autocast; see docs/benchmarks.md for the agreement with fp32).
        key_added: ``obsm`` key.
        copy: return a modified copy instead of writing into ``adata``.

    Returns:
        The AnnData when ``copy=True``, else ``None``.
    """
    if pool not in ("all", "max"):
        msg = f"pool must be 'all' or 'max', got {pool!r}."
        raise MsfmInputError(msg)
    TargetDepth.parse(target_depth)  # fail before loading anything
    adata = adata.copy() if copy else adata
    loaded = load_model(checkpoint, device=device)
    source, mapping = prepare(
        adata,
        loaded.panel,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )
    emb, zero = embed_source(
        loaded,
        source,
        mapping,
        target_depth=target_depth,
        pool=pool,
        batch_size=batch_size,
        max_tokens=max_tokens,
        precision=precision,
        pre_normalized=pre_normalized,
        progress=progress,
    )
    adata.obsm[key_added] = emb
    adata.obs[ZERO_COUNT_COLUMN] = zero
    if zero.any():
        logger.warning(
            "%d cells have no counts on the gene panel; flagged in obs[%r].", zero.sum(), ZERO_COUNT_COLUMN
        )
    adata.uns[UNS_KEY] = _uns_record(
        loaded,
        mapping,
        source.kind,
        {
            "task": "embed",
            "target_depth": target_depth,
            "pool": pool,
            "precision": precision,
            "key_added": key_added,
            "pre_normalized": pre_normalized,
            "layer": layer,
        },
    )
    return adata if copy else None


def embed_source(
    loaded: LoadedModel,
    source: CellSource,
    mapping: GeneMapping,
    *,
    target_depth: str = "t4",
    pool: Pool = "all",
    batch_size: int = 64,
    max_tokens: int | None = 65536,
    precision: Precision = "32",
    pre_normalized: bool = False,
    progress: bool = True,
    out: np.ndarray | Any | None = None,
    chunk_size: int = 4096,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray | Any, np.ndarray]:
    """Embed the cells of ``source`` (all, or ``rows``); ``out`` is an array or a ``(rows, values)`` callable.

    Results are written at source row positions; with ``rows`` given, other rows of ``out`` stay untouched.
    """
    tokenizer = ScFoundationTokenizer(num_genes=loaded.config.num_genes)
    dim = loaded.config.encoder_dim * (4 if pool == "all" else 1)
    n = source.n_obs
    if out is None:
        out = np.zeros((n, dim), dtype=np.float32)
    zero = np.zeros(n, dtype=bool)
    with _progress(n if rows is None else len(rows), "scFoundation embed", progress) as bar:
        for batch in iter_batches(
            source,
            mapping,
            tokenizer,
            target_depth,
            rows=rows,
            batch_size=batch_size,
            max_tokens=max_tokens,
            chunk_size=chunk_size,
            pre_normalized=pre_normalized,
        ):
            hidden, t = encode_batch(loaded.model, batch.tensors, loaded.device, precision)
            pooled = loaded.model.pool_cell_embedding(hidden, t["gene_ids"], t["padding_mask"], mode=pool)
            _assign(out, batch.rows, pooled.float().cpu().numpy())
            zero[batch.rows] = batch.zero_count
            bar.update(len(batch.rows))
    return out, zero


def _assign(out: Any, rows: np.ndarray, values: np.ndarray) -> None:
    if isinstance(out, np.ndarray):
        out[rows] = values
    else:  # e.g. an on-disk writer with write_rows(idx, values)
        out(rows, values)


def embed_file(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | LoadedModel,
    *,
    key_added: str = "X_scfoundation",
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Embed a file and write ``out`` (.h5ad) atomically; .h5ad inputs are streamed from disk (backed).

    For .h5ad inputs the output is a copy of the input with ``obsm[key_added]``, the zero-count flag and
    ``uns["scfoundation"]`` (JSON) added on disk, so memory does not grow with the number of cells.
    """
    from msfm.data import read
    from msfm.runtime.h5ad import write_h5ad_atomic

    data = Path(data)
    out = Path(out)
    check_output_free(out, overwrite=overwrite)
    if data.suffix != ".h5ad":
        adata = read(data)
        embed(adata, checkpoint, key_added=key_added, **kwargs)
        write_h5ad_atomic(adata, out, overwrite_input_guard=[data])
        return out

    from msfm.runtime.h5ad_stream import H5adResultWriter

    adata = read(data, backed=True)
    try:
        loaded = load_model(checkpoint, device=kwargs.pop("device", "auto"))
        pool = kwargs.get("pool", "all")
        target_depth = kwargs.get("target_depth", "t4")
        TargetDepth.parse(target_depth)
        prep_keys = ("layer", "pre_normalized", "gene_column", "species", "use_aliases", "min_panel_fraction")
        source, mapping = prepare(adata, loaded.panel, **{k: kwargs[k] for k in prep_keys if k in kwargs})
        run_keys = (
            "target_depth",
            "pool",
            "batch_size",
            "max_tokens",
            "precision",
            "pre_normalized",
            "progress",
        )
        run_kwargs = {k: kwargs[k] for k in run_keys if k in kwargs}
        dim = loaded.config.encoder_dim * (4 if pool == "all" else 1)
        with H5adResultWriter(data, out) as writer:
            ds = writer.create_obsm(key_added, dim)
            _, zero = embed_source(
                loaded, source, mapping, out=lambda rows, v: writer.write_rows(ds, rows, v), **run_kwargs
            )
            col = writer.create_obs_column(ZERO_COUNT_COLUMN, bool)
            writer.write_rows(col, np.arange(len(zero)), zero)
            writer.write_uns_json(
                UNS_KEY,
                _uns_record(
                    loaded, mapping, source.kind, {"task": "embed", "key_added": key_added, **run_kwargs}
                ),
            )
    finally:
        if adata.isbacked:
            adata.file.close()
    return out


# ----------------------------------------------------------------------------------------------------------
# decoder outputs: read-depth enhancement and gene context embeddings
# ----------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _decode_batches(
    loaded: LoadedModel,
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
):
    """Yield (source rows, decoder output) batches; ``head=True`` gives expression, else context embeddings."""
    tokenizer = ScFoundationTokenizer(num_genes=loaded.config.num_genes)
    model = loaded.model
    device = loaded.device
    with _progress(source.n_obs if rows is None else len(rows), desc, progress) as bar:
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


def enhance(
    adata: AnnData,
    checkpoint: str | os.PathLike[str] | LoadedModel,
    *,
    target_depth: str = "a1",
    layer: str | None = None,
    pre_normalized: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    precision: Precision = "32",
    key_added: str = "scfoundation_enhanced",
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Read-depth enhancement: predict expression at a target depth above the source depth.

    The model sees each cell at its real depth S and is asked for the profile at depth T (``a1`` = 10x
    deeper, on the log10 scale). Use a checkpoint converted from the official ``rde`` variant or one
    pretrained with msfm. Writes ``layers[key_added]`` (dense float32, log1p counts-per-10k scale) for the
    input genes that map onto the panel; other genes are 0 and marked False in ``var[key_added + "_mapped"]``.
    """
    t = TargetDepth.parse(target_depth)
    if (t.mode == "a" and t.value <= 0) or (t.mode == "f" and t.value <= 1):
        logger.warning(
            "target_depth=%s does not raise T above S; this is reconstruction, not enhancement.", target_depth
        )
    adata = adata.copy() if copy else adata
    loaded = load_model(checkpoint, device=device)
    source, mapping = prepare(
        adata,
        loaded.panel,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )
    result = np.zeros((adata.n_obs, adata.n_vars), dtype=np.float32)
    src_cols = np.flatnonzero(mapping.input_to_panel >= 0)
    panel_cols = mapping.input_to_panel[src_cols]
    for rows, expr in _decode_batches(
        loaded,
        source,
        mapping,
        target_depth=target_depth,
        batch_size=batch_size,
        precision=precision,
        pre_normalized=pre_normalized,
        head=True,
        progress=progress,
        desc="scFoundation enhance",
    ):
        result[np.ix_(rows, src_cols)] = expr[:, panel_cols]
    mapped = np.zeros(adata.n_vars, dtype=bool)
    mapped[src_cols] = True
    adata.layers[key_added] = result
    adata.var[f"{key_added}_mapped"] = mapped
    record = adata.uns.get(UNS_KEY, {})
    record = dict(record) if isinstance(record, dict) else {}
    record["enhance"] = _uns_record(
        loaded,
        mapping,
        source.kind,
        {"task": "enhance", "target_depth": target_depth, "precision": precision, "key_added": key_added},
    )
    adata.uns[UNS_KEY] = record
    return adata if copy else None


def gene_embeddings(
    adata: AnnData,
    checkpoint: str | os.PathLike[str] | LoadedModel,
    *,
    genes: list[str] | None = None,
    cells: np.ndarray | list | None = None,
    out: str | os.PathLike[str] | None = None,
    target_depth: str = "t4",
    layer: str | None = None,
    pre_normalized: bool = False,
    batch_size: int = 4,
    device: str = "auto",
    precision: Precision = "32",
    max_in_memory_gb: float = 2.0,
    progress: bool = True,
    **gene_kwargs: Any,
) -> np.ndarray | Path:
    """Context-aware gene embeddings from the decoder, ``[cells, genes, decoder_dim]``.

    Args:
        genes: panel gene symbols to keep (default: all 19,264; large!).
        cells: obs names, integer positions or a boolean mask selecting cells (default: all).
        out: write an HDF5 file (datasets ``embeddings`` [cells, genes, dim] chunked per cell, ``genes``,
            ``cells``) instead of returning an array; required when the result exceeds ``max_in_memory_gb``.

    Returns:
        The array, or the path of the HDF5 file written atomically.
    """
    loaded = load_model(checkpoint, device=device)
    source, mapping = prepare(adata, loaded.panel, layer=layer, pre_normalized=pre_normalized, **gene_kwargs)
    rows = _select_cells(adata, cells)
    gene_names, gene_idx = _select_genes(loaded.panel, genes)
    dim = loaded.config.decoder_dim
    size_gb = len(rows) * len(gene_idx) * dim * 4 / 1e9
    if out is None and size_gb > max_in_memory_gb:
        msg = (
            f"Gene embeddings for {len(rows)} cells x {len(gene_idx)} genes x {dim} dims need {size_gb:.1f} GB. "
            "Pass out='file.h5' to stream them to disk, or select fewer genes=/cells=."
        )
        raise MsfmInputError(msg)
    if len(np.unique(rows)) != len(rows):
        msg = "cells= selects some cells more than once; pass each cell once."
        raise MsfmInputError(msg)
    # Batches come back in source order; remember where each source row goes in the caller's order.
    caller_pos = {int(r): i for i, r in enumerate(rows)}
    sorted_rows = np.sort(rows)
    decode = _decode_batches(
        loaded,
        source,
        mapping,
        target_depth=target_depth,
        batch_size=batch_size,
        precision=precision,
        pre_normalized=pre_normalized,
        head=False,
        progress=progress,
        desc="scFoundation gene embeddings",
        rows=sorted_rows,
    )
    if out is None:
        result = np.zeros((len(rows), len(gene_idx), dim), dtype=np.float32)
        for src_rows, z in decode:
            result[[caller_pos[int(r)] for r in src_rows]] = z[:, gene_idx]
        return result
    import h5py

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        h5 = h5py.File(tmp, "w")
        ds = h5.create_dataset(
            "embeddings", shape=(len(rows), len(gene_idx), dim), dtype="f4", chunks=(1, len(gene_idx), dim)
        )
        h5.create_dataset("genes", data=np.array(gene_names, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset(
            "cells", data=np.array(adata.obs_names[rows], dtype=object), dtype=h5py.string_dtype()
        )
        h5.attrs["target_depth"] = target_depth
        h5.attrs["checkpoint"] = str(loaded.path)
        for src_rows, z in decode:
            for r, zi in zip(src_rows, z):
                ds[caller_pos[int(r)]] = zi[gene_idx]
        h5.close()
        os.replace(tmp, out)  # only a complete file ever appears under the final name
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _select_cells(adata: AnnData, cells: Any) -> np.ndarray:
    n = adata.n_obs
    if cells is None:
        return np.arange(n)
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            msg = f"cells= boolean mask has shape {arr.shape}, expected ({n},)."
            raise MsfmInputError(msg)
        return np.flatnonzero(arr)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            msg = f"cells= positions must lie in [0, {n}); got range [{arr.min()}, {arr.max()}]."
            raise MsfmInputError(msg)
        return arr.astype(np.int64)
    idx = adata.obs_names.get_indexer(arr.astype(str))
    if (idx < 0).any():
        missing = arr[idx < 0][:5].tolist()
        msg = f"cells= names not found in obs_names: {missing} ({int((idx < 0).sum())} missing)."
        raise MsfmInputError(msg)
    return idx.astype(np.int64)


def _select_genes(panel: GenePanel, genes: list[str] | None) -> tuple[list[str], np.ndarray]:
    symbols = list(panel.symbols)
    if genes is None:
        return symbols, np.arange(len(symbols))
    index = {s: i for i, s in enumerate(symbols)}
    missing = [g for g in genes if g not in index]
    if missing:
        msg = (
            f"{len(missing)} of the requested genes are not in the model's gene panel, e.g. {missing[:5]}. "
            "Use current HGNC symbols as in the panel (msfm.data.GenePanel.scfoundation().symbols)."
        )
        raise MsfmInputError(msg)
    return list(genes), np.array([index[g] for g in genes], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# official checkpoints
# ----------------------------------------------------------------------------------------------------------
def convert(
    official: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    variant: Literal["cell", "rde", "gene"] = "cell",
    overwrite: bool = False,
) -> Path:
    """Convert an official scFoundation ``models.ckpt`` (one variant) into an msfm checkpoint directory."""
    from msfm.models.scfoundation.official import load_official_checkpoint
    from msfm.runtime.checkpoint import save_checkpoint

    out = Path(out)
    check_output_free(out, overwrite=overwrite)
    config, state_dict = load_official_checkpoint(official, variant=variant)
    panel = GenePanel.scfoundation()
    return save_checkpoint(
        out,
        family="scfoundation",
        config=config,
        state_dict=state_dict,
        gene_panel=list(panel.symbols),
        preprocessing=preprocessing_record(),
        extra_meta={
            "source": "official",
            "official_file": str(Path(official).name),
            "variant": variant,
            "licence_note": "Official scFoundation weights are under the non-commercial 'scFoundation License'.",
        },
    )


def preprocessing_record(pre_normalized: bool = False, panel_name: str = "scfoundation") -> dict[str, Any]:
    """How inputs are turned into model values; saved with every checkpoint."""
    return {
        "counts": "raw counts; layers['counts'] else integer X",
        "normalization": "log1p(count / total * 1e4), float64 then float32"
        if not pre_normalized
        else "as given",
        "target_sum": 1e4,
        "log1p": True,
        "depth_tokens": {"S": "log10(total counts on the panel)", "T": "tN | aY (S+Y) | fX (log10(total*X))"},
        "gene_panel": f"{panel_name} (input genes always re-indexed onto the panel; genes.txt)",
    }


# ----------------------------------------------------------------------------------------------------------
# many devices / nodes
# ----------------------------------------------------------------------------------------------------------
class _CellIndexDataset(torch.utils.data.Dataset):
    """Map-style dataset of cell positions; the collate function reads, maps and tokenises a batch.

    Each process (DDP rank, DataLoader worker) opens the backed file itself on first use, so nothing large
    is pickled between processes and reads stay contiguous (the distributed sampler hands out ordered shards).
    """

    def __init__(
        self,
        path: Path,
        panel: GenePanel,
        *,
        target_depth: str,
        pre_normalized: bool,
        prep_kwargs: dict[str, Any],
        num_genes: int,
    ) -> None:
        from msfm.data import read

        adata = read(path, backed=True)
        try:
            self.n_obs = adata.n_obs
            _, self.mapping = prepare(adata, panel, pre_normalized=pre_normalized, **prep_kwargs)
        finally:
            adata.file.close()
        self.path = path
        self.layer = prep_kwargs.get("layer")
        self.pre_normalized = pre_normalized
        self.target_depth = target_depth
        self.num_genes = num_genes
        self._source: CellSource | None = None

    def __len__(self) -> int:
        return self.n_obs

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        from msfm.data import read

        if self._source is None:
            self._source = CellSource(
                read(self.path, backed=True), layer=self.layer, pre_normalized=self.pre_normalized
            )
        rows = np.asarray(idx, dtype=np.int64)
        tokenizer = ScFoundationTokenizer(num_genes=self.num_genes)
        enc = tokenizer.encode(
            self.mapping.apply(self._source.rows(rows)), self.target_depth, pre_normalized=self.pre_normalized
        )
        batch = tokenizer.collate(enc, np.arange(len(rows)))
        batch["zero_count"] = torch.as_tensor(np.asarray(enc.zero_count))
        return batch


def embed_distributed(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    *,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    strategy: str = "ddp",
    num_nodes: int = 1,
    target_depth: str = "t4",
    pool: Pool = "all",
    batch_size: int = 64,
    precision: Precision = "32",
    key_added: str = "X_scfoundation",
    num_workers: int = 0,
    overwrite: bool = False,
    work_dir: str | os.PathLike[str] | None = None,
    **prep_kwargs: Any,
) -> Path | None:
    """Embed an .h5ad file on several devices and/or nodes (Lightning DDP), e.g. an atlas on a GPU cluster.

    Every rank streams its own shard of the backed file and writes its part; global rank 0 merges the parts
    in file order and writes ``out`` (a copy of the input plus ``obsm[key_added]``), atomically. Launch it
    like any Lightning job (``torchrun``, SLURM ``srun``, or directly: Lightning starts the local ranks).

    Returns:
        ``out`` on global rank 0, ``None`` on the other ranks.
    """
    from msfm.engine.predict import distributed_predict
    from msfm.engine.trainer import TrainerOptions
    from msfm.runtime.h5ad_stream import H5adResultWriter

    data, out = Path(data), Path(out)
    if data.suffix != ".h5ad":
        msg = (
            f"Distributed embedding reads .h5ad files (streamed, backed); got {data.name}. Convert it first."
        )
        raise MsfmInputError(msg)
    check_output_free(out, overwrite=overwrite)
    TargetDepth.parse(target_depth)
    loaded = load_model(checkpoint, device="cpu")
    pre_normalized = bool(prep_kwargs.pop("pre_normalized", False))
    dataset = _CellIndexDataset(
        data,
        loaded.panel,
        target_depth=target_depth,
        pre_normalized=pre_normalized,
        prep_kwargs=prep_kwargs,
        num_genes=loaded.config.num_genes,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate, num_workers=num_workers
    )

    def predict(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, t = encode_batch(model, batch, batch["values"].device, precision)
        pooled = model.pool_cell_embedding(hidden, t["gene_ids"], t["padding_mask"], mode=pool).float()
        # The zero-count flag rides along as the last column and is split off after the merge.
        return torch.cat([pooled, batch["zero_count"].to(pooled.dtype)[:, None]], dim=1)

    options = TrainerOptions(
        accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes, progress_bar=True
    )
    parts = Path(work_dir) if work_dir is not None else out.with_name(f".{out.name}.parts")
    merged = distributed_predict(
        predict, loader, parts, options=options, model=loaded.model.eval(), overwrite=True
    )
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_rank() != 0
    ):
        return None
    emb, zero = np.asarray(merged[:, :-1], dtype=np.float32), np.asarray(merged[:, -1]) > 0.5
    with H5adResultWriter(data, out) as writer:
        ds = writer.create_obsm(key_added, emb.shape[1])
        writer.write_rows(ds, np.arange(len(emb)), emb)
        col = writer.create_obs_column(ZERO_COUNT_COLUMN, bool)
        writer.write_rows(col, np.arange(len(zero)), zero)
        writer.write_uns_json(
            UNS_KEY,
            _uns_record(
                loaded,
                dataset.mapping,
                "normalized" if pre_normalized else "counts",
                {
                    "task": "embed",
                    "distributed": True,
                    "devices": str(devices),
                    "num_nodes": num_nodes,
                    "target_depth": target_depth,
                    "pool": pool,
                    "precision": precision,
                    "key_added": key_added,
                },
            ),
        )
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    return out
