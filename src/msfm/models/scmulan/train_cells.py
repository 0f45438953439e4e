"""The training cells of a scMulan run: datasets, metadata, next-state pairs and which task each cell supports.

Our next-state pairing rule (the released model has no next-state task) is :func:`next_state_partners`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from msfm.data import CellSource, GeneMapping, GenePanel, harmonize_genes
from msfm.data.normalize import normalized_rows
from msfm.errors import MsfmInputError
from msfm.models.scmulan.objective import ORGAN_CATEGORIES, TaskSampler
from msfm.models.scmulan.train_config import ScMulanTrainConfig
from msfm.tokenizers.cell_sentence import CellSentenceVocab

__all__ = [
    "Cells",
    "Dataset",
    "check_columns",
    "check_support",
    "group_codes",
    "map_genes",
    "next_state_partners",
    "open_datasets",
    "pair_buckets",
    "raw_meta",
    "task_support",
    "time_values",
]


def next_state_partners(
    times: Sequence[Any] | np.ndarray, groups: Sequence[Any] | None = None
) -> list[np.ndarray]:
    """The next-state partners of each cell (our pairing rule; the released model has no next-state task).

    Within each group (``groups``; None = one group of all cells), let ``t_1 < t_2 < ... < t_m`` be the distinct
    time values present. A cell at time ``t_i`` (``i < m``) pairs with every cell of its group at ``t_{i+1}``, the
    next larger time present in the group. Cells at the group's last time, and cells with a missing time or
    group, have no partner.

    Args:
        times: one numeric time per cell (NaN = unknown).
        groups: one group label per cell (None/NaN = unknown), or None.

    Returns:
        Per cell, the sorted indices of its partners (empty when none).
    """
    t = np.asarray(times, dtype=np.float64)
    g = np.zeros(t.size, dtype=np.int64) if groups is None else group_codes(groups)
    bucket_of, buckets = pair_buckets(t, g, np.ones(t.size, dtype=bool))
    empty = np.zeros(0, dtype=np.int64)
    return [buckets[b] if b >= 0 else empty for b in bucket_of]


def group_codes(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    codes, _ = pd.factorize(pd.Series(list(values), dtype=object), use_na_sentinel=True)
    return codes.astype(np.int64)


def pair_buckets(
    time: np.ndarray, group: np.ndarray, usable: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``bucket_of[i]`` = index into ``buckets`` of cell i's partners (-1: none). Only ``usable`` cells take part.

    Shape: time, group, usable ``[N]``.
    """
    n = time.size
    ok = usable & np.isfinite(time) & (group >= 0)
    bucket_of = np.full(n, -1, dtype=np.int64)
    buckets: list[np.ndarray] = []
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return bucket_of, buckets
    order = idx[np.lexsort((time[idx], group[idx]))]
    g_sorted, t_sorted = group[order], time[order]
    # Runs of equal (group, time), in ascending time within each group.
    new_run = np.ones(order.size, dtype=bool)
    new_run[1:] = (g_sorted[1:] != g_sorted[:-1]) | (t_sorted[1:] != t_sorted[:-1])
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], order.size)
    for k in range(len(starts) - 1):
        a, b = starts[k], starts[k + 1]
        if g_sorted[a] != g_sorted[b]:
            continue  # last time of this group: no successor
        buckets.append(np.sort(order[b : ends[k + 1]]))
        bucket_of[order[a : ends[k]]] = len(buckets) - 1
    return bucket_of, buckets


def time_values(col: pd.Series, where: str) -> np.ndarray:
    """A time column as float (NaN = unknown): numbers, number-like strings or an ordered categorical."""
    if isinstance(col.dtype, pd.CategoricalDtype) and col.cat.ordered:
        codes = col.cat.codes.to_numpy().astype(np.float64)
        codes[codes < 0] = np.nan
        return codes
    values = pd.to_numeric(col.astype(object).where(col.notna(), None), errors="coerce")
    bad = values.isna() & col.notna()
    if bool(bad.any()):
        example = col[bad].astype(str).unique()[:5].tolist()
        msg = (
            f"time_key column {where} has values that are not numbers: {example}. Use a numeric column, or an "
            "ordered categorical (pd.Categorical(values, categories=[...], ordered=True))."
        )
        raise MsfmInputError(msg)
    return values.to_numpy(dtype=np.float64)


def _format_value(value: Any) -> str:
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass
class Dataset:
    adata: AnnData
    name: str
    opened: bool  # we opened it (close it at the end)


class Cells:
    """Row access (log1p, vocabulary-aligned), metadata ids and next-state buckets of all training cells."""

    def __init__(
        self,
        sources: list[CellSource],
        mappings: list[GeneMapping],
        meta: dict[str, np.ndarray],
        vocab: CellSentenceVocab,
    ) -> None:
        self.sources = sources
        self.mappings = mappings
        self.meta = meta
        self.vocab = vocab
        self.offsets = np.concatenate([[0], np.cumsum([s.n_obs for s in sources])]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.n_expr = self._count_expressed()

    def _count_expressed(self) -> np.ndarray:
        counts = []
        for src, mapping in zip(self.sources, self.mappings, strict=True):
            for chunk in src.iter_chunks():
                x = mapping.apply(chunk.X)
                counts.append(np.diff(sp.csr_matrix(x > 0).indptr))
        return np.concatenate(counts).astype(np.int64)

    def rows(self, cells: np.ndarray) -> sp.csr_matrix:
        """Log1p-normalised, vocabulary-aligned rows of global cells, in the order given.

        Shape: ``[len(cells), len(vocab.genes)]`` CSR float32.
        """
        cells = np.asarray(cells, dtype=np.int64)
        ds = np.searchsorted(self.offsets, cells, side="right") - 1
        blocks, order = [], []
        for d in np.unique(ds):
            sel = np.flatnonzero(ds == d)
            blocks.append(normalized_rows(self.sources[d], cells[sel] - self.offsets[d], self.mappings[d]))
            order.append(sel)
        stacked = sp.vstack(blocks, format="csr")
        inverse = np.empty(cells.size, dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(cells.size)
        return stacked[inverse]

    def meta_of(self, cell: int) -> dict[str, str]:
        """Known metadata of a global cell, category -> value token."""
        tokens = self.vocab.tokens
        return {c: tokens[ids[cell]] for c, ids in self.meta.items() if ids[cell] >= 0}


def task_support(cells: Cells, names: list[str], bucket_of: np.ndarray) -> np.ndarray:
    """``[N, len(names)]`` bool: which task each cell can make an example of (same rules as TaskSampler)."""
    has_genes = cells.n_expr > 0
    known = {c: ids >= 0 for c, ids in cells.meta.items()}
    none = np.zeros(cells.n, dtype=bool)
    rules = {
        "annotate": known.get("cell_type", none),
        "organ_region": np.logical_or.reduce([known.get(c, none) for c in ORGAN_CATEGORIES]),
        "generate": np.logical_or.reduce([none, *known.values()]),
        "next_state": bucket_of >= 0,
    }
    return np.stack([rules[t] & has_genes for t in names], axis=1) if names else np.zeros((cells.n, 0), bool)


def map_genes(
    datasets: list[Dataset],
    panel: GenePanel,
    config: ScMulanTrainConfig,
    *,
    what: str,
    fix: str,
    **harmonize: Any,
) -> list[GeneMapping]:
    """Each dataset's genes mapped onto ``panel``; a dataset none of whose genes ``what`` is an error (``fix``)."""
    maps = []
    for ds in datasets:
        m = harmonize_genes(
            ds.adata.var,
            panel,
            gene_column=config.gene_column,
            species=config.species,
            use_aliases=config.use_aliases,
            min_panel_fraction=0.0,
            **harmonize,
        )
        if m.n_mapped == 0:
            msg = (
                f"None of the {m.n_input} genes of {ds.name} (e.g. {list(m.input_names[:5])}) {what} "
                f"({len(panel)} genes, e.g. {list(panel.symbols[:5])}). {fix}"
            )
            raise MsfmInputError(msg)
        maps.append(m)
    return maps


def open_datasets(data: Any) -> list[Dataset]:
    from msfm.data import read

    items = [data] if isinstance(data, AnnData | str | os.PathLike) else list(data or [])
    if not items:
        msg = "No training data given: pass an AnnData, an .h5ad path, or a list of them (raw counts + obs metadata)."
        raise MsfmInputError(msg)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, AnnData):
            out.append(Dataset(item, f"adata[{i}]", False))
        elif isinstance(item, str | os.PathLike):
            path = Path(item)
            backed = "r" if path.suffix == ".h5ad" else False
            out.append(Dataset(read(path, backed=backed), str(path), True))
        else:
            msg = f"Training data item {i} is a {type(item).__name__}; expected an AnnData or a file path."
            raise MsfmInputError(msg)
    return out


def check_columns(datasets: list[Dataset], config: ScMulanTrainConfig) -> None:
    wanted = [(f"meta_columns[{cat!r}]", col) for cat, col in config.meta_columns.items()]
    if config.tasks.get("next_state", 0) > 0:
        if config.time_key is None:
            msg = "tasks include 'next_state' but time_key is None; set time_key to the obs column with cell times."
            raise MsfmInputError(msg)
        wanted.append(("time_key", config.time_key))
        if config.pair_key is not None:
            wanted.append(("pair_key", config.pair_key))
    for ds in datasets:
        for what, col in wanted:
            if col not in ds.adata.obs.columns:
                cols = list(map(str, ds.adata.obs.columns))
                msg = (
                    f"{what} names the obs column {col!r}, which {ds.name} does not have. Its obs columns: "
                    f"{cols[:40]}{' ...' if len(cols) > 40 else ''}. Fix the column name in the config."
                )
                raise MsfmInputError(msg)


def raw_meta(datasets: list[Dataset], config: ScMulanTrainConfig) -> dict[str, np.ndarray]:
    """category -> ``[N]`` object array of value strings (None = missing/unknown), over all datasets."""
    unknown = {*config.unknown_values, CellSentenceVocab.UNCLASSIFIED}
    out: dict[str, np.ndarray] = {}
    for cat, column in config.meta_columns.items():
        parts = []
        for ds in datasets:
            col = ds.adata.obs[column]
            values = np.array(
                [
                    None if v is None or (not isinstance(v, str) and pd.isna(v)) else _format_value(v)
                    for v in col
                ],
                dtype=object,
            )
            values[np.array([v is not None and v.strip() in unknown for v in values], dtype=bool)] = None
            parts.append(values)
        out[cat] = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
    return out


def check_support(
    support: np.ndarray,
    sampler: TaskSampler,
    cells: Cells,
    config: ScMulanTrainConfig,
    time: np.ndarray | None,
) -> None:
    n_genes = int((cells.n_expr > 0).sum())
    if n_genes == 0:
        msg = (
            f"No usable cells: none of the {cells.n} cells expresses any of the {len(cells.vocab.genes)} vocabulary "
            "genes (all-zero rows after gene mapping). Check layer=, gene_column= and species=."
        )
        raise MsfmInputError(msg)
    for j, task in enumerate(sampler.task_names):
        if support[:, j].any():
            continue
        if task == "annotate":
            col = config.meta_columns.get("cell_type")
            why = (
                "meta_columns has no 'cell_type' entry; add e.g. meta_columns={'cell_type': '<obs column>'}"
                if col is None
                else f"no cell has a known label in obs[{col!r}] (all missing or in unknown_values)"
            )
        elif task == "organ_region":
            cols = {c: config.meta_columns[c] for c in ORGAN_CATEGORIES if c in config.meta_columns}
            why = (
                "meta_columns has neither 'organ' nor 'region'"
                if not cols
                else f"no cell has a known value in the obs columns {cols}"
            )
        elif task == "generate":
            why = "no cell has any known metadata value in meta_columns " + str(config.meta_columns)
        else:
            n_time = 0 if time is None else int(np.isfinite(time).sum())
            why = (
                f"no cell has a next-state partner (time_key={config.time_key!r}: {n_time} cells with a time; "
                f"pair_key={config.pair_key!r}); pairs need at least two distinct times within a group"
            )
        msg = f"Task {task!r} has weight {sampler.tasks[task]} but no usable cell supports it: {why}. " + (
            "Fix the metadata or set its weight to 0."
        )
        raise MsfmInputError(msg)
    if not support.any():
        msg = f"No usable cells among {cells.n}: none supports any of the tasks {sampler.task_names}."
        raise MsfmInputError(msg)
