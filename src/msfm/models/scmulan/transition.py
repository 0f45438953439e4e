"""``next_state``: each cell's next state (``<SPToken2>``), a generated cell per input cell.

Design: the release reserves ``<SPToken2>`` without using it; msfm uses it as a next-state task token. A model
fine-tuned with ``msfm scmulan train`` on pairs of cells ordered by a time or pseudotime column learns to continue
``[genes of cell t] + <SPToken2>`` with the gene words of a cell at the next time point (see
:mod:`msfm.models.scmulan.train_cells`). The official checkpoint was never trained on this task, so its outputs
mean nothing until such fine-tuning.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from msfm.data import as_anndata
from msfm.models.scmulan.batches import iter_prompt_batches
from msfm.models.scmulan.cell_decode import gene_budget, prepare, warn_truncated
from msfm.models.scmulan.decoding import DecodeOptions, generate_tokens
from msfm.models.scmulan.generation import decoding_params
from msfm.models.scmulan.loading import FAMILY, Checkpoint, load, tokenizer_for
from msfm.models.scmulan.sampling import cells_anndata, gene_end_mask, resolve_length, sampler_for
from msfm.models.scmulan.verb_io import check_positive, record, split_options
from msfm.runtime.adata import store_uns
from msfm.runtime.h5ad import check_output, write_output
from msfm.runtime.progress import progress_bar
from msfm.tokenizers.cell_sentence import NEXT_STATE

__all__ = ["next_state"]

#: Next-state decoding writes genes and <E> only (no ``constrained``); repeats are banned among generated words.
DECODE = ("max_new_tokens", "greedy", "temperature", "top_k", "end_weight", "repeat_mask", "seed")
DEFAULTS = {"greedy": False, "repeat_mask": "generated"}


def next_state(
    data: AnnData | str | os.PathLike[str],
    checkpoint: Checkpoint,
    *,
    n_per_cell: int = 1,
    decoding: DecodeOptions | None = None,
    device: str = "auto",
    batch_size: int = 32,
    max_tokens: int | None = 32768,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> AnnData:
    """Predict the next state of each cell (``<SPToken2>``): ``n_per_cell`` generated cells per input cell.

    Each input cell is written as ``[genes] + <SPToken2>`` and decoded into genes and ``<E>`` only. Repeats are
    banned among the generated words only (``repeat_mask="generated"``): the next cell usually re-uses most genes
    of the prompt cell, which ``"all"`` would forbid.

    Prompt length: the generated cell may hold up to ``max_new_tokens`` words (default: half of ``max_length`` or
    every gene once, whichever is smaller); input cells with more expressed genes than the remaining room are
    truncated to their top-expressed genes, with a warning.

    Args:
        data: cells x genes (raw counts, or ``pre_normalized=True``), or its file.
        checkpoint: a checkpoint trained with the ``next_state`` task (directory, ``TrainResult`` or ``Loaded``).
        n_per_cell: generated cells per input cell.
        decoding: a :class:`~msfm.models.scmulan.decoding.DecodeOptions`; or its fields as keyword arguments:
            ``greedy`` (default False), ``temperature``, ``top_k``, ``end_weight``, ``max_new_tokens``,
            ``repeat_mask`` (default ``"generated"``), ``seed``.
        out: also write the cells to this ``.h5ad`` (atomically; ``overwrite`` to replace a file).
        options: decoding options and reading options (:class:`~msfm.data.CellReadOptions`).

    Returns:
        AnnData ``[n_obs * n_per_cell, vocabulary genes]`` as :func:`msfm.scmulan.generate` returns it, with
        ``obs["source_cell"]`` (the input obs name), ``obs["copy"]``, ``obs["source_n_genes"]`` and
        ``uns["scmulan"]["next_state"]`` (parameters, provenance, gene mapping).
    """
    opts, read = split_options(next_state, options, decode=DECODE, defaults=DEFAULTS, base=decoding)
    n_per_cell = check_positive(n_per_cell, "n_per_cell")
    batch_size = check_positive(batch_size, "batch_size")
    target = check_output(out, overwrite=overwrite, data=data)
    adata = as_anndata(data)
    loaded = load(checkpoint, device=device)
    vocab = loaded.vocab
    source, mapping = prepare(adata, loaded, read)
    max_len = loaded.config.max_length
    new_tokens = opts.max_new_tokens or min(len(vocab.genes) + 1, max_len // 2)
    budget = gene_budget(loaded, new_tokens + 1, "next_state")
    opts = resolve_length(
        loaded, opts.model_copy(update={"max_new_tokens": new_tokens}), prompt_len=max_len - new_tokens
    )
    tokenizer = tokenizer_for(loaded, max_genes=budget)
    allowed = gene_end_mask(loaded)
    n = source.n_obs
    ids_out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * (n * n_per_cell)
    lv_out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * (n * n_per_cell)
    stopped = np.zeros(n * n_per_cell, dtype=bool)
    n_genes = np.zeros(n, dtype=np.int64)
    with torch.inference_mode(), progress_bar(n, "scMulan next state", enabled=progress) as bar:
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
            model, run_options = sampler_for(loaded.model, opts, allowed, [(int(p),) for p in out_pos])
            res = generate_tokens(model, ids, lv, mask, run_options, allowed=allowed)
            gen_ids, gen_lv, n_new = res.ids.cpu().numpy(), res.levels.cpu().numpy(), res.n_new.cpu().numpy()
            for j, p in enumerate(out_pos):
                k = int(n_new[j])
                ids_out[p] = gen_ids[j, :k].copy()
                lv_out[p] = gen_lv[j, :k].copy()
                stopped[p] = k > 0 and gen_ids[j, k - 1] == vocab.end_id
            bar.update(len(rows))
    n_trunc = warn_truncated(n_genes, budget, max_len)
    names = np.asarray(adata.obs_names).astype(str)
    obs = pd.DataFrame(
        {
            "source_cell": pd.Categorical(np.repeat(names, n_per_cell)),
            "copy": np.tile(np.arange(n_per_cell), n).astype(np.int64),
        }
    )
    obs.index = pd.Index([f"{c}_next{k}" for c in names for k in range(n_per_cell)])
    cells = cells_anndata(loaded, ids_out, lv_out, stopped, obs)
    cells.obs["source_n_genes"] = np.repeat(n_genes, n_per_cell)
    params = {
        "n_per_cell": n_per_cell,
        **decoding_params(opts, DECODE),
        "n_truncated_cells": n_trunc,
        "layer": read.layer,
        "pre_normalized": read.pre_normalized,
    }
    store_uns(cells, FAMILY, "next_state", record(loaded, params, mapping, source.kind))
    write_output(cells, target, data, replace=overwrite)
    return cells
