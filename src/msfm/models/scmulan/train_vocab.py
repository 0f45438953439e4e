"""The vocabulary of a scMulan training run: built from the data, or an existing one grown with new values.

* ``vocabulary="data"``: the data's genes (harmonised human symbols, the top ``n_genes`` highly variable ones)
  and the metadata values found;
* ``"official"`` or a vocabulary file, or the checkpoint being fine-tuned: that vocabulary, with every new
  metadata value appended at the end (:func:`extend_vocabulary`: existing ids never change).

A resumed run reuses ``RUN_DIR/vocabulary.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.data import CellSource, GenePanel
from msfm.data.normalize import normalized_rows
from msfm.engine.trainer import last_checkpoint
from msfm.errors import MsfmInputError
from msfm.models.scmulan.train_cells import Dataset, map_genes
from msfm.models.scmulan.train_config import ScMulanTrainConfig
from msfm.tokenizers.cell_sentence import END, CellSentenceVocab, _is_task_token

logger = logging.getLogger(__name__)

__all__ = ["VOCAB_FILE", "extend_vocabulary", "meta_ids", "run_vocabulary"]

VOCAB_FILE = "vocabulary.json"


def extend_vocabulary(
    vocab: CellSentenceVocab, values: Mapping[str, Iterable[str]]
) -> tuple[CellSentenceVocab, dict[str, list[str]]]:
    """Add metadata values to a vocabulary, appending new tokens at the end (existing ids unchanged).

    A value that is already a token of another category (e.g. an organ re-used as a region) is added to the
    category without a new token. New categories are created as needed.

    Args:
        vocab: the vocabulary to extend.
        values: category -> values (missing values must already be removed).

    Returns:
        ``(vocabulary, added)``: the extended vocabulary (the same object when nothing changes) and, per category,
        the tokens appended.

    Raises:
        MsfmInputError: a value equal to a gene symbol, ``<E>`` or a task token.
    """
    d = vocab.to_dict()
    d.pop("sha256", None)
    tokens: list[str] = list(d["tokens"])
    present = set(tokens)
    genes = set(vocab.genes)
    categories: dict[str, list[str]] = {k: list(v) for k, v in d["categories"].items()}
    added: dict[str, list[str]] = {}
    changed = False
    for cat, vals in values.items():
        current = set(categories.get(cat, []))
        for value in sorted({str(v) for v in vals} - current):
            if value in genes:
                msg = (
                    f"Metadata value {value!r} of category {cat!r} is also a gene symbol of the vocabulary; a token "
                    "cannot be both. Rename the value (e.g. add a suffix)."
                )
                raise MsfmInputError(msg)
            if value == END or _is_task_token(value):
                msg = f"Metadata value {value!r} of category {cat!r} is a reserved token; rename it."
                raise MsfmInputError(msg)
            if value not in present:
                tokens.append(value)
                present.add(value)
                added.setdefault(cat, []).append(value)
            categories.setdefault(cat, []).append(value)
            changed = True
    if not changed:
        return vocab, {}
    d["tokens"] = tokens
    d["categories"] = categories
    return CellSentenceVocab.from_dict(d), added


def _gene_universe() -> GenePanel:
    """Human symbols the 'data' vocabulary may contain: the scFoundation panel plus the official scMulan genes."""
    symbols = list(GenePanel.scfoundation().symbols)
    have = set(symbols)
    symbols += [g for g in CellSentenceVocab.official().genes if g not in have]
    return GenePanel.from_symbols(symbols, name="human-symbols")


def _data_genes(
    datasets: list[Dataset], sources: list[CellSource], config: ScMulanTrainConfig
) -> tuple[list[str], dict[str, Any]]:
    """Harmonised symbols of the data's genes, reduced to the top ``n_genes`` highly variable ones."""
    universe = _gene_universe()
    maps = map_genes(
        datasets,
        universe,
        config,
        what="maps to a human gene symbol",
        fix="Pass gene_column= (a var column with symbols), or species='mouse'.",
        warn_panel_fraction=0.0,
    )
    used = np.zeros(len(universe), dtype=bool)
    for m in maps:
        used[m.input_to_panel[m.input_to_panel >= 0]] = True
    present = np.flatnonzero(used)
    symbols = [universe.symbols[i] for i in present]
    info: dict[str, Any] = {"n_data_genes": len(symbols), "selection": "all"}
    if config.n_genes is None or len(symbols) <= config.n_genes:
        return symbols, info

    import anndata as ad
    import scanpy as sc

    total = sum(s.n_obs for s in sources)
    rng = np.random.default_rng([config.seed, 3])
    blocks, batches = [], []
    for d, (src, m) in enumerate(zip(sources, maps, strict=True)):
        take = min(src.n_obs, max(2, math.ceil(config.hvg_max_cells * src.n_obs / total)))
        rows = np.sort(rng.choice(src.n_obs, size=take, replace=False))
        x = normalized_rows(src, rows, m)[:, present]
        blocks.append(x)
        batches += [str(d)] * x.shape[0]
    X = sp.vstack(blocks, format="csr")
    seen = np.flatnonzero(np.diff(sp.csc_matrix(X).indptr) > 0)  # genes expressed in the sample
    info["n_cells_ranked"] = int(X.shape[0])
    if seen.size == 0:
        return symbols, info  # no counts at all: the usable-cell check reports it
    if seen.size <= config.n_genes:
        info["selection"] = "expressed in the ranked cells"
        return [symbols[i] for i in seen], info
    hv = ad.AnnData(X=X[:, seen], var=pd.DataFrame(index=pd.Index([symbols[i] for i in seen])))
    hv.obs["batch"] = pd.Categorical(batches)
    batch_key = "batch" if len(sources) > 1 and hv.obs["batch"].value_counts().min() > 1 else None
    try:
        sc.pp.highly_variable_genes(hv, n_top_genes=config.n_genes, flavor="seurat", batch_key=batch_key)
        keep = hv.var["highly_variable"].to_numpy()
        info["selection"] = "highly_variable_genes(flavor='seurat')"
    except (ValueError, IndexError) as err:  # degenerate dispersion bins on tiny or odd samples
        logger.warning(
            "highly_variable_genes failed (%s); keeping the %d most expressed genes", err, config.n_genes
        )
        mean = np.asarray(hv.X.mean(axis=0)).ravel()
        keep = np.zeros(hv.n_vars, dtype=bool)
        keep[np.argsort(-mean, kind="stable")[: config.n_genes]] = True
        info["selection"] = "mean expression (HVG fallback)"
    chosen = [s for s, k in zip(hv.var_names, keep, strict=True) if k]
    return chosen, info


def run_vocabulary(
    datasets: list[Dataset],
    sources: list[CellSource],
    raw_meta: dict[str, np.ndarray],
    config: ScMulanTrainConfig,
    init_vocab: CellSentenceVocab | None,
    init_path: str | None,
    out: Path,
) -> tuple[CellSentenceVocab, dict[str, list[str]], dict[str, Any]]:
    """The run's vocabulary and the tokens appended to its base (the checkpoint's, official or file vocabulary).

    A resumed run reuses ``RUN_DIR/vocabulary.json`` (which must still extend the base); otherwise the base is
    grown with the data's metadata values, or, for ``vocabulary='data'``, a new vocabulary is built.
    """
    values = {cat: sorted({v for v in vals if v is not None}) for cat, vals in raw_meta.items()}
    info: dict[str, Any]
    base: CellSentenceVocab | None
    if init_vocab is not None:
        base, info = init_vocab, {"source": "checkpoint", "path": init_path}
    elif config.vocabulary == "official":
        base, info = CellSentenceVocab.official(), {"source": "official"}
    elif config.vocabulary == "data":
        base, info = None, {"source": "data"}
    else:
        path = Path(config.vocabulary)
        if not path.is_file():
            msg = f"vocabulary={config.vocabulary!r} is neither 'data', 'official' nor an existing vocabulary JSON."
            raise MsfmInputError(msg)
        base, info = CellSentenceVocab.load(path), {"source": "file", "path": str(path)}

    saved = out / VOCAB_FILE
    if last_checkpoint(out) is not None and saved.is_file():
        vocab = CellSentenceVocab.load(saved)
        _, extra = extend_vocabulary(vocab, values)
        if extra:
            msg = (
                f"Resuming {out}: the data has metadata values that the run's vocabulary lacks ({extra}). A run's "
                "vocabulary cannot change once training started; resume with the original data or start a new run."
            )
            raise MsfmInputError(msg)
        if base is not None and vocab.tokens[: len(base)] != base.tokens:
            msg = f"Resuming {out}: its saved vocabulary does not extend the {info['source']} vocabulary of this config."
            raise MsfmInputError(msg)
        return vocab, _appended(base, vocab), {**info, "resumed_from": str(saved)}
    if base is None:
        genes, gene_info = _data_genes(datasets, sources, config)
        return CellSentenceVocab.build(genes, values), {}, {**info, **gene_info}
    vocab, added = extend_vocabulary(base, values)
    return vocab, added, info


def _appended(base: CellSentenceVocab | None, vocab: CellSentenceVocab) -> dict[str, list[str]]:
    """Per category, the tokens of ``vocab`` after ``base``'s (what a fine-tuning run added)."""
    if base is None:
        return {}
    new = set(vocab.tokens[len(base) :])
    out = {c: [t for t in vals if t in new] for c, vals in vocab.categories.items()}
    return {c: v for c, v in out.items() if v}


def meta_ids(raw_meta: dict[str, np.ndarray], vocab: CellSentenceVocab) -> dict[str, np.ndarray]:
    out = {}
    for cat, values in raw_meta.items():
        codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
        table = np.array([vocab.id(u) for u in uniques], dtype=np.int64)
        ids = np.full(values.size, -1, dtype=np.int64)
        ids[codes >= 0] = table[codes[codes >= 0]]
        out[cat] = ids
    return out
