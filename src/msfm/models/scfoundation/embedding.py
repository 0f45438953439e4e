"""``embed``: cell embeddings from the scFoundation encoder, in memory, streamed from disk, or on many devices.

Everything takes raw counts under the shared single-cell contract (``layers["counts"]``, else integer ``X``;
normalised input only with ``pre_normalized=True``), maps genes onto the checkpoint's panel (always re-indexed,
with a coverage report in ``uns``) and runs batched on CPU or CUDA. Under ``key_added`` (default
``"scfoundation"``) it writes:

* ``obsm["X_<key>"]``: the embeddings (``pool="all"``: 4 x encoder dim, order S, T, max, mean);
* ``obs["<key>_zero_count"]``: cells without any count on the panel (kept, flagged);
* ``uns[<key>]["embed"]``: parameters, checkpoint provenance and the gene-mapping report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from msfm.data import CellReadOptions, CellSource, GeneMapping, as_anndata, prepare_cells, read
from msfm.errors import MsfmInputError
from msfm.models.scfoundation._io import h5ad_file, parse_read_options
from msfm.models.scfoundation.inference import Precision, encode_batch, iter_batches
from msfm.models.scfoundation.loading import CheckpointLike, backbone_of, load, tokenizer_for
from msfm.models.scfoundation.provenance import uns_record
from msfm.runtime.adata import check_key_added, field_key, obsm_key, store_uns
from msfm.runtime.atomic import check_output_free
from msfm.runtime.h5ad import write_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.precision import PrecisionChoice, canonical_precision, resolve_precision
from msfm.runtime.progress import progress_bar
from msfm.tokenizers.gene_panel import TargetDepth

logger = logging.getLogger(__name__)

__all__ = ["Pool", "embed", "embed_source"]

Pool = Literal["all", "max"]


def embed(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    key_added: str = "scfoundation",
    target_depth: str = "t4",
    pool: Pool = "all",
    batch_size: int = 64,
    max_tokens: int | None = 65536,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    copy: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    devices: int | str | list[int] | None = None,
    accelerator: str = "auto",
    strategy: str = "ddp",
    num_nodes: int = 1,
    num_workers: int = 0,
    **read_options: Any,
) -> AnnData:
    """Cell embeddings from the scFoundation encoder: ``obsm["X_<key_added>"]``.

    Three ways to run, chosen by the arguments:

    * in memory (default): ``data`` is an AnnData (in memory or backed) or a file read into memory; the results
      are added to it (or to a copy with ``copy=True``) and, with ``out``, the whole object is written too;
    * streamed: ``data`` is the path of an ``.h5ad`` file and ``out`` an ``.h5ad`` path. The input is read backed,
      in chunks, and the output (a byte copy of the input plus the results) is written batch by batch, so memory
      does not grow with the number of cells. The return value is ``out`` opened backed (``backed="r"``: ``X``
      stays on disk; close it with ``result.file.close()``);
    * distributed: ``devices`` (or ``num_nodes > 1``) runs Lightning DDP over an ``.h5ad`` path with ``out``:
      every rank embeds its shard of the backed file, global rank 0 merges the parts in file order and writes
      ``out``. Rank 0 returns ``out`` opened backed; the other ranks return an AnnData of the obs names only
      (``uns[key_added]["embed"]["out"]`` names the file). Launch like any Lightning job (``torchrun``, SLURM
      ``srun``, or directly: Lightning starts the local ranks).

    Args:
        data: cells x genes with raw counts (``layers["counts"]`` or integer ``X``), or a path to read.
        checkpoint: an scFoundation checkpoint (``convert``/``train``; a classifier uses its fine-tuned backbone),
            a ``TrainResult`` or a ``Loaded``.
        key_added: prefix of what is added: ``obsm["X_<key>"]``, ``obs["<key>_zero_count"]``, ``uns[<key>]``.
        target_depth: ``tN`` (T = N), ``aY`` (T = S + Y) or ``fX`` (T = log10(total * X)); log10 scale.
        pool: ``all`` = concat[S, T, max, mean] (4 x dim); ``max`` = max over all tokens (dim).
        batch_size: cells per batch; ``max_tokens`` caps cells x longest length per batch.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (in memory and streamed).
        precision: ``auto`` (bf16 where the device computes it fast, else fp32; see
            :func:`msfm.runtime.precision.resolve_precision`), ``32``, ``bf16`` or ``16`` (autocast; see
            docs/benchmarks.md for the agreement with fp32). The choice is recorded in
            ``uns[key_added]["embed"]["precision"]``.
        progress: show a progress bar.
        copy: add the results to a copy of an AnnData ``data`` instead of ``data`` itself.
        out: also write the result to this ``.h5ad`` file (atomically).
        overwrite: replace an existing ``out``.
        devices: run distributed: ``"auto"``, a count (``-1`` = all) or indices (``"0,1"``).
        accelerator: distributed only: ``auto``, ``cpu``, ``gpu``.
        strategy: distributed only: Lightning strategy (``ddp``).
        num_nodes: distributed only: number of machines.
        num_workers: distributed only: DataLoader workers per rank.
        **read_options: how to read ``data`` (:class:`msfm.data.CellReadOptions`: ``layer``, ``pre_normalized``,
            ``gene_column``, ``species``, ``use_aliases``, ``min_panel_fraction``).

    Returns:
        The AnnData with the results (see above for the streamed and distributed cases).

    Raises:
        MsfmInputError: bad input (negative or normalised counts without ``pre_normalized``, too few panel
            genes), a bad option, or ``out`` exists without ``overwrite``.
        OutputError: ``out`` cannot be written (read-only folder, full disk; checked before compute where
            possible), or it appeared while this run computed and ``overwrite`` is False (with ``overwrite`` the
            last writer wins).
        CheckpointError: ``checkpoint`` is not an msfm scFoundation checkpoint (convert official files first).
    """
    check_key_added(key_added)
    if pool not in ("all", "max"):
        msg = f"pool must be 'all' or 'max', got {pool!r}."
        raise MsfmInputError(msg)
    TargetDepth.parse(target_depth)  # fail before loading anything
    canonical_precision(precision)
    options = parse_read_options(embed, read_options)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
    params = {
        "target_depth": target_depth,
        "pool": pool,
        "precision": precision,
        "key_added": key_added,
        "pre_normalized": options.pre_normalized,
        "layer": options.layer,
    }
    run = {
        "target_depth": target_depth,
        "pool": pool,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "precision": precision,
        "progress": progress,
    }
    if devices is not None or num_nodes > 1:
        from msfm.models.scfoundation.distributed import embed_distributed

        path = h5ad_file(data)
        if path is None or out is None:
            msg = (
                f"Distributed embedding (devices={devices!r}, num_nodes={num_nodes}) reads an .h5ad file backed "
                f"and writes out=...; got data={type(data).__name__ if path is None else str(data)!r}, "
                f"out={out!r}. Pass the path of an .h5ad file and out='result.h5ad' (or drop devices= to embed "
                "in memory)."
            )
            raise MsfmInputError(msg)
        return embed_distributed(
            path,
            Path(out),
            checkpoint,
            overwrite=overwrite,
            options=options,
            key_added=key_added,
            params=params,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            num_workers=num_workers,
            **{k: run[k] for k in ("target_depth", "pool", "batch_size", "precision", "progress")},
        )
    loaded = backbone_of(load(checkpoint, device=device))
    choice = resolve_precision(precision, loaded.device)
    run["precision"] = choice.precision
    path = h5ad_file(data)
    if out is not None and path is not None:
        return _embed_streamed(
            path, Path(out), loaded, options, key_added, params, run, choice, overwrite=overwrite
        )
    adata = as_anndata(data, copy=copy)
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    emb, zero = embed_source(loaded, source, mapping, pre_normalized=options.pre_normalized, **run)
    adata.obsm[obsm_key(key_added)] = emb
    adata.obs[field_key(key_added, "zero_count")] = zero
    _warn_zero(zero, key_added)
    store_uns(adata, key_added, "embed", uns_record(loaded, mapping, source.kind, params, choice))
    write_output(adata, out, data, replace=overwrite)
    return adata


def _warn_zero(zero: np.ndarray, key_added: str) -> None:
    if zero.any():
        logger.warning(
            "%d cells have no counts on the gene panel; flagged in obs[%r].",
            int(zero.sum()),
            field_key(key_added, "zero_count"),
        )


def _embed_streamed(
    data: Path,
    out: Path,
    loaded: Loaded,
    options: CellReadOptions,
    key_added: str,
    params: dict[str, Any],
    run: dict[str, Any],
    choice: PrecisionChoice,
    *,
    overwrite: bool,
) -> AnnData:
    """Embed a backed .h5ad and write ``out`` (a copy of the input plus the results) batch by batch.

    Both result datasets are created before any compute, so a disk that clearly cannot hold them is refused
    first; a write that fails later (the disk filled up meanwhile) is an ``OutputError`` and leaves no file.
    """
    from msfm.runtime.h5ad_stream import H5adResultWriter

    adata = read(data, backed=True)
    try:
        source, mapping = prepare_cells(adata, loaded.vocab, options)
        dim = loaded.config.encoder_dim * (4 if run["pool"] == "all" else 1)
        with H5adResultWriter(data, out, overwrite=overwrite) as writer:
            ds = writer.create_obsm(obsm_key(key_added), dim)
            col = writer.create_obs_column(field_key(key_added, "zero_count"), bool)
            _, zero = embed_source(
                loaded,
                source,
                mapping,
                pre_normalized=options.pre_normalized,
                out=lambda rows, values: writer.write_rows(ds, rows, values),
                **run,
            )
            writer.write_rows(col, np.arange(len(zero)), zero)
            record = uns_record(loaded, mapping, source.kind, {**params, "streamed": True}, choice)
            writer.write_uns(key_added, "embed", record)
    finally:
        if adata.isbacked:
            adata.file.close()
    _warn_zero(zero, key_added)
    return read(out, backed="r")


def embed_source(
    loaded: Loaded,
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
    out: np.ndarray | Callable[[np.ndarray, np.ndarray], None] | None = None,
    chunk_size: int = 4096,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray | Any, np.ndarray]:
    """Embed the cells of ``source`` (all, or ``rows``) with the model of ``loaded``.

    Args:
        out: where results go: an ``[n, dim]`` array, or a function ``out(rows, values)`` (e.g. an on-disk
            writer); default a new array. Results land at source row positions; other rows stay untouched.

    Returns:
        ``(out, zero_count)``: the embeddings (or the ``out`` given) and the ``[n]`` zero-count flags.
    """
    tokenizer = tokenizer_for(loaded)
    dim = loaded.config.encoder_dim * (4 if pool == "all" else 1)
    n = source.n_obs
    if out is None:
        out = np.zeros((n, dim), dtype=np.float32)
    zero = np.zeros(n, dtype=bool)
    with progress_bar(n if rows is None else len(rows), "scFoundation embed", enabled=progress) as bar:
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
            values = pooled.float().cpu().numpy()
            if isinstance(out, np.ndarray):
                out[batch.rows] = values
            else:
                out(batch.rows, values)
            zero[batch.rows] = batch.zero_count
            bar.update(len(batch.rows))
    return out, zero
