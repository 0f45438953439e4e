"""``generate``: conditional generation of cells from metadata prompts (``<SPToken1>``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.models.scmulan.decoding import USER_OPTIONS, DecodeOptions
from msfm.models.scmulan.loading import FAMILY, Checkpoint, load, tokenizer_for
from msfm.models.scmulan.prompts import Prompts, meta_obs, prompt_records
from msfm.models.scmulan.sampling import cells_anndata, gene_end_mask, generate_sentences, resolve_length
from msfm.models.scmulan.verb_io import check_positive, record, split_options
from msfm.runtime.adata import store_uns
from msfm.runtime.h5ad import check_output, write_output
from msfm.tokenizers.cell_sentence import GENERATE, Sentences

__all__ = ["generate"]

#: Open generation (``generate``, ``perturb``, ``perturb_screen``) takes every decoding option, with these defaults.
DEFAULTS = {"greedy": False, "repeat_mask": "all"}


def generate(
    data: Prompts,
    checkpoint: Checkpoint,
    *,
    n_per_prompt: int = 1,
    decoding: DecodeOptions | None = None,
    device: str = "auto",
    batch_size: int = 64,
    max_tokens: int | None = 32768,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> AnnData:
    """Generate cells from metadata prompts (``<SPToken1>``).

    Each prompt is ``[metadata words] + <SPToken1>``; the model then writes gene words (token, level) until
    ``<E>``. With ``constrained=True`` only genes and ``<E>`` may be written; ``constrained=False`` lets any token
    through, as the release does (non-gene words are dropped from the matrix).

    Sampling is reproducible and independent of ``batch_size``: cell ``i`` of the output draws from its own
    random stream, seeded by ``(seed, i)``.

    Args:
        data: the prompts: a dict (category -> value, e.g. ``{"organ": "Blood", "cell_type": "T cell", "age":
            "60 year", "sex": "M"}``), a list of dicts, a text ``"organ=Blood,cell_type=T cell"``, a DataFrame (or
            an AnnData's ``obs``, or a ``.csv``/``.tsv`` path) with one column per category (NaN = leave out).
            Unknown categories or values raise ``MsfmInputError`` naming the allowed values.
        checkpoint: msfm checkpoint directory, a ``TrainResult`` or a ``Loaded``.
        n_per_prompt: cells generated per prompt.
        decoding: a :class:`~msfm.models.scmulan.decoding.DecodeOptions`; or give its fields as keyword arguments:
            ``greedy`` (default False: sample), ``temperature``, ``top_k``, ``end_weight`` (the release's
            ``gamma``; 0.1 in the paper), ``max_new_tokens`` (default: every gene once plus ``<E>``),
            ``repeat_mask`` (default ``"all"``: no word twice), ``constrained``, ``seed``.
        out: also write the cells to this ``.h5ad`` (atomically; ``overwrite`` to replace a file).

    Returns:
        AnnData ``[n_prompts * n_per_prompt, vocabulary genes]``: ``X`` = level / n_levels (CSR),
        ``layers["levels"]`` integer levels, ``obs`` = the prompt columns, ``prompt_id``, ``n_genes`` (genes with
        a level > 0), ``n_words`` (words generated, ``<E>`` included) and ``stopped_at_end``;
        ``uns["scmulan"]["generate"]`` = parameters and checkpoint provenance.
    """
    opts, _ = split_options(
        generate, options, decode=USER_OPTIONS, defaults=DEFAULTS, base=decoding, reads=False
    )
    records = prompt_records(data)
    n_per_prompt = check_positive(n_per_prompt, "n_per_prompt")
    batch_size = check_positive(batch_size, "batch_size")
    target = check_output(out, overwrite=overwrite)
    loaded = load(checkpoint, device=device)
    base = tokenizer_for(loaded).prompts(None, meta=records, task=GENERATE)  # validates categories and values
    idx = np.repeat(np.arange(len(records)), n_per_prompt)
    sentences = Sentences.from_lists([base.get(int(i))[0] for i in idx], [base.get(int(i))[1] for i in idx])
    opts = resolve_length(loaded, opts, prompt_len=int(base.lengths().max()))
    gen = generate_sentences(
        loaded,
        sentences,
        [(i,) for i in range(len(idx))],
        options=opts,
        allowed=gene_end_mask(loaded) if opts.constrained else None,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan generate",
    )
    obs = meta_obs(records, n_per_prompt)
    obs["prompt_id"] = idx.astype(np.int64)
    obs.index = pd.Index([f"gen{p}_{c}" for p, c in zip(idx, np.tile(np.arange(n_per_prompt), len(records)))])
    adata = cells_anndata(loaded, gen.ids, gen.levels, gen.stopped, obs)
    params = {
        "n_prompts": len(records),
        "n_per_prompt": n_per_prompt,
        **decoding_params(opts, USER_OPTIONS),
        "vocabulary_genes": len(loaded.vocab.genes),
    }
    store_uns(adata, FAMILY, "generate", record(loaded, params))
    write_output(adata, target, replace=overwrite)
    return adata


def decoding_params(opts: DecodeOptions, names: Iterable[str]) -> dict[str, Any]:
    """The decoding options ``names`` of a run, for ``uns`` records."""
    return {name: getattr(opts, name) for name in names}
