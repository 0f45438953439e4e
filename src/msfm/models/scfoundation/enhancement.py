"""``enhance``: read-depth enhancement, the decoder's expression profile of each cell at a higher target depth."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from anndata import AnnData

from msfm.data import as_anndata, prepare_cells
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.decoding import decode_batches
from msfm.models.scfoundation.loading import CheckpointLike, backbone_of, load
from msfm.models.scfoundation.provenance import uns_record
from msfm.runtime.adata import check_key_added, field_key, store_uns
from msfm.runtime.atomic import check_output_free
from msfm.runtime.h5ad import write_output
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.tokenizers.gene_panel import TargetDepth

__all__ = ["enhance"]


def enhance(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    key_added: str = "scfoundation",
    target_depth: str = "a1",
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    copy: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Read-depth enhancement: predict expression at a target depth above the source depth.

    The model sees each cell at its real depth S and is asked for the profile at depth T (``a1`` = 10x deeper,
    on the log10 scale). Use a checkpoint converted from the official ``rde`` variant or one pretrained with
    msfm. Under ``key_added`` it writes:

    * ``layers["<key>_enhanced"]``: dense float32, log1p counts-per-10k scale, for the input genes on the panel
      (zero elsewhere);
    * ``var["<key>_enhanced_mapped"]``: which input genes are on the panel;
    * ``uns[<key>]["enhance"]``: parameters, checkpoint provenance and the gene-mapping report.

    Args:
        data: cells x genes with raw counts, or a path to read.
        checkpoint: an scFoundation checkpoint, a ``TrainResult`` or a ``Loaded``.
        key_added: prefix of what is added.
        target_depth: ``aY`` (T = S + Y), ``fX`` or ``tN``; see ``embed``.
        batch_size: cells per decoder batch (the decoder spans the whole panel).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        precision: ``auto`` (bf16 where the device computes it fast, else fp32; the choice is recorded in
            ``uns[key_added]["enhance"]["precision"]``), ``32``, ``bf16`` or ``16`` (autocast).
        progress: show a progress bar.
        copy: add the results to a copy of an AnnData ``data``.
        out: also write the result to this ``.h5ad`` file (atomically).
        overwrite: replace an existing ``out``.
        **read_options: :class:`msfm.data.CellReadOptions` (``layer``, ``pre_normalized``, ``gene_column``, ...).

    Returns:
        The AnnData with the results (``data`` itself unless ``copy=True`` or ``data`` was a path).
    """
    check_key_added(key_added)
    TargetDepth.parse(target_depth)
    canonical_precision(precision)
    options = parse_read_options(enhance, read_options)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
    adata = as_anndata(data, copy=copy)
    loaded = backbone_of(load(checkpoint, device=device))
    choice = resolve_precision(precision, loaded.device)
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    result = np.zeros((adata.n_obs, adata.n_vars), dtype=np.float32)
    src_cols = np.flatnonzero(mapping.input_to_panel >= 0)
    panel_cols = mapping.input_to_panel[src_cols]
    for rows, expr in decode_batches(
        loaded,
        source,
        mapping,
        target_depth=target_depth,
        batch_size=batch_size,
        precision=choice.precision,
        pre_normalized=options.pre_normalized,
        head=True,
        progress=progress,
        desc="scFoundation enhance",
    ):
        result[np.ix_(rows, src_cols)] = expr[:, panel_cols]
    mapped = np.zeros(adata.n_vars, dtype=bool)
    mapped[src_cols] = True
    layer = field_key(key_added, "enhanced")
    adata.layers[layer] = result
    adata.var[f"{layer}_mapped"] = mapped
    params = {
        "target_depth": target_depth,
        "precision": precision,
        "key_added": key_added,
        "pre_normalized": options.pre_normalized,
        "layer": options.layer,
    }
    store_uns(adata, key_added, "enhance", uns_record(loaded, mapping, source.kind, params, choice))
    write_output(adata, out, data, replace=overwrite)
    return adata
