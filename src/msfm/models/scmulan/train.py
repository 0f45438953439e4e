"""scMulan training and fine-tuning from AnnData with metadata columns, through the shared Lightning engine.

``train(data, out, config)`` turns cells and their ``obs`` metadata into a stream of multitask c-sentence
examples (annotation, organ/region prediction, conditional generation and our next-state task; see
:mod:`msfm.models.scmulan.objective`), trains a new model or fine-tunes an msfm scMulan checkpoint
(``init_from``), and writes the run directory of the engine contract::

    RUN_DIR/
      checkpoints/last.ckpt   # resume state (a killed run continues when the same call is repeated)
      model/                  # msfm scMulan checkpoint (loads with msfm.models.scmulan.inference.load_model)
      vocabulary.json         # the run's vocabulary (reused on resume)
      config.json, metrics.csv

Everything runs through :class:`msfm.engine.MsfmLightningModule`, :func:`msfm.engine.build_trainer` and
:func:`msfm.engine.fit`: any accelerator, DDP/FSDP (``TrainerOptions.strategy``), mixed precision, gradient
accumulation. Example ``k`` of the stream is a pure function of ``(seed, k)``, so a resumed run sees exactly the
examples an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from msfm.data import CellSource, GeneMapping, GenePanel, harmonize_genes
from msfm.data.normalize import normalized_rows
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.sampler import BatchStream
from msfm.engine.trainer import (
    ExportCallback,
    TrainerOptions,
    build_trainer,
    fit,
    last_checkpoint,
    resume_step,
)
from msfm.errors import MsfmInputError
from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.inference import load_model, preprocessing_record
from msfm.models.scmulan.model import ScMulan, ScMulanBlock
from msfm.models.scmulan.objective import (
    ORGAN_CATEGORIES,
    TASKS,
    ScMulanLossConfig,
    TaskSampler,
    TrainExample,
    collate_examples,
    scmulan_loss,
)
from msfm.registry import preset_config
from msfm.runtime.config import read_config_file
from msfm.tokenizers.cell_sentence import END, CellSentenceVocab, _is_task_token

logger = logging.getLogger(__name__)

__all__ = [
    "ScMulanExampleStream",
    "ScMulanTrainConfig",
    "extend_vocabulary",
    "grow_model",
    "next_state_partners",
    "train",
]

PathLike = str | os.PathLike[str]
VOCAB_FILE = "vocabulary.json"

_TRAINER_KEYS = {
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "max_steps",
    "max_epochs",
    "accumulate",
    "gradient_clip",
    "log_every_n_steps",
    "checkpoint_every_n_steps",
    "val_check_interval",
    "progress_bar",
}
_OPTIM_KEYS = {"lr", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio", "frozen_prefixes"}
_LOSS_KEYS = {"expression_weight", "targets", "reduction", "entity_loss"}
#: Model fields a fine-tuning run may change without changing any weight shape.
_FINETUNE_OVERRIDES = {"dropout", "max_length"}


class ScMulanTrainConfig(BaseModel):
    """Everything a scMulan training run needs; written to ``RUN_DIR/config.json``."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("scmulan-tiny", description="Model preset for a new model (msfm.registry).")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields replacing the preset's; with init_from only 'dropout' and 'max_length'.",
    )
    init_from: str | None = Field(
        None,
        description=(
            "Fine-tune this msfm scMulan checkpoint directory (e.g. a converted official one). Its vocabulary is "
            "used (the 'vocabulary' field is ignored) and grown with new metadata values."
        ),
    )
    meta_columns: dict[str, str] = Field(
        default_factory=lambda: {"cell_type": "cell_type"},
        description=(
            "Vocabulary category -> obs column, e.g. {'cell_type': 'cell_type', 'coarse_cell_type': 'lineage', "
            "'organ': 'tissue'}. Task answers use 'cell_type' (fine), 'coarse_cell_type', 'organ', 'region'."
        ),
    )
    tasks: dict[str, float] = Field(
        default_factory=lambda: {"annotate": 1.0, "generate": 1.0},
        description="Task weights among annotate, organ_region, generate, next_state (renormalised per cell).",
    )
    time_key: str | None = Field(None, description="obs column with the time of each cell (next_state).")
    pair_key: str | None = Field(
        None, description="obs column grouping cells that may pair for next_state (None: all cells)."
    )
    vocabulary: str = Field(
        "data",
        description=(
            "'data': genes of the data (harmonised human symbols; the top n_genes highly variable ones) and the "
            "metadata values; 'official': the released 2,222-token vocabulary (grown with new values); or the "
            "path of a vocabulary JSON (CellSentenceVocab.save)."
        ),
    )
    n_genes: int | None = Field(2000, ge=1, description="'data' vocabulary: keep this many HVGs (None: all).")
    hvg_max_cells: int = Field(50_000, ge=10, description="Cells sampled to rank highly variable genes.")
    max_genes: int | None = Field(None, ge=1, description="Keep only the top-expressed genes of a cell.")
    gene_order: Literal["random", "reverse", "forward"] = Field(
        "random", description="Gene order in training sentences ('random': fresh permutation per example)."
    )
    meta_prompt_prob: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="annotate/organ_region: chance of other metadata words in the prompt.",
    )
    unknown_values: list[str] = Field(
        default_factory=lambda: ["Unclassified", "unknown", "Unknown", "nan", "NaN", "None", "NA", ""],
        description="obs values treated as missing (besides NaN/None).",
    )
    loss: ScMulanLossConfig = Field(default_factory=ScMulanLossConfig)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(
            lr=3e-4,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            warmup_steps=100,
            schedule="cosine",
            min_lr_ratio=0.1,
        ),
        description="AdamW (decay on 2-d weights) with warm-up and cosine decay.",
    )
    trainer: TrainerOptions = Field(default_factory=lambda: TrainerOptions(max_steps=1000, gradient_clip=1.0))
    batch_size: int = Field(16, ge=1, description="Sentences per device per micro-step.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (in-memory data: keep 0).")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of cells held out for validation.")
    layer: str | None = Field(None, description="Matrix to read (default: layers['counts'] else X).")
    pre_normalized: bool = Field(False, description="The matrix already holds log1p-normalised values.")
    gene_column: str | None = Field(None, description="var column with symbols/Ensembl IDs.")
    species: Literal["human", "mouse"] = Field("human", description="mouse genes are mapped via orthologs.")
    use_aliases: bool = Field(True, description="Map previous/alias symbols.")
    seed: int = Field(0, description="Seeds everything: examples, split, HVG sample, init, trainer.")

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            msg = f"Unknown task(s) {unknown}; expected names among {sorted(TASKS)}."
            raise ValueError(msg)
        if any(v < 0 for v in value.values()) or not any(v > 0 for v in value.values()):
            msg = f"Task weights must be >= 0 with at least one > 0; got {value}."
            raise ValueError(msg)
        return value

    @field_validator("meta_columns")
    @classmethod
    def _check_meta(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k, v in value.items() if not k or not isinstance(v, str) or not v]
        if bad:
            msg = f"meta_columns needs non-empty category names and obs column names; bad entries: {bad}."
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _sync_seed(self) -> ScMulanTrainConfig:
        # One seed: a trainer seed given alone (e.g. in an old YAML) wins, otherwise `seed` is copied into it.
        if "seed" not in self.model_fields_set and self.trainer.seed != 0:
            self.seed = self.trainer.seed
        if self.trainer.seed != self.seed:
            self.trainer = self.trainer.model_copy(update={"seed": self.seed})
        return self

    @classmethod
    def from_file(cls, path: PathLike) -> ScMulanTrainConfig:
        """Read a YAML or JSON file with these fields (nested sections as mappings)."""
        return cls.model_validate(read_config_file(path, what="ScMulanTrainConfig"))

    def with_overrides(self, flat: dict[str, Any], *, progress_bar: bool | None = None) -> ScMulanTrainConfig:
        """Apply flat CLI-style overrides (``max_steps``, ``lr``, ``devices``, ``tasks`` ...) to the right section.

        ``meta_columns`` and ``tasks`` also accept ``"a=b,c=d"`` strings.
        """
        data = self.model_dump()
        for key, value in flat.items():
            if key in _TRAINER_KEYS:
                data["trainer"][key] = _parse_devices(value) if key == "devices" else value
            elif key in _OPTIM_KEYS:
                data["optim"][key] = tuple(value) if key == "frozen_prefixes" else value
            elif key in _LOSS_KEYS:
                data["loss"][key] = value
            elif key in ("meta_columns", "tasks") and isinstance(value, str):
                data[key] = _parse_mapping(value, float if key == "tasks" else str, key)
            elif key in data:
                data[key] = value
            else:
                known = sorted(set(data) | _TRAINER_KEYS | _OPTIM_KEYS | _LOSS_KEYS)
                msg = f"Unknown override {key!r}; known: {known}."
                raise MsfmInputError(msg)
        if progress_bar is not None:
            data["trainer"]["progress_bar"] = progress_bar
        data["trainer"]["seed"] = data["seed"]
        from pydantic import ValidationError

        try:
            return ScMulanTrainConfig.model_validate(data)
        except ValidationError as err:
            msg = f"Invalid scMulan training settings: {err}"
            raise MsfmInputError(msg) from err


def _parse_devices(value: Any) -> Any:
    if isinstance(value, str):
        if value == "auto":
            return value
        if "," in value:
            return [int(v) for v in value.split(",") if v]
        if value.lstrip("-").isdigit():
            return int(value)
    return value


def _parse_mapping(text: str, cast: type, key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            msg = (
                f"{key}={text!r}: expected 'name=value' pairs separated by commas, e.g. 'cell_type=celltype'."
            )
            raise MsfmInputError(msg)
        name, value = (s.strip() for s in part.split("=", 1))
        try:
            out[name] = cast(value)
        except ValueError:
            msg = f"{key}: {value!r} (for {name!r}) is not a {cast.__name__}."
            raise MsfmInputError(msg) from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary growth (fine-tuning with new labels)
# ---------------------------------------------------------------------------------------------------------------


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


def grow_model(
    model: ScMulan, old_vocab: CellSentenceVocab, new_vocab: CellSentenceVocab, *, seed: int = 0
) -> ScMulan:
    """A copy of ``model`` sized for ``new_vocab``, an extension of ``old_vocab`` (tokens appended at the end).

    Rows of ``token_embed``, ``entity_head`` and ``expression_head`` for existing tokens are copied unchanged. A
    new token's rows are the mean of the existing rows of its category (so a new cell type starts as an
    "average cell type"), or ``N(0, 0.02)`` (seeded) when the category had no token before.

    Raises:
        MsfmInputError: ``new_vocab`` does not start with ``old_vocab``'s tokens, or the model does not match
            ``old_vocab``.
    """
    v_old, v_new = len(old_vocab), len(new_vocab)
    if model.config.vocab_size != v_old:
        msg = f"The model has {model.config.vocab_size} tokens but its vocabulary {v_old}."
        raise MsfmInputError(msg)
    if new_vocab.tokens[:v_old] != old_vocab.tokens:
        msg = (
            "The new vocabulary does not extend the checkpoint's: its first tokens differ. Only appending new "
            "tokens keeps the pretrained ids valid."
        )
        raise MsfmInputError(msg)
    if v_new == v_old:
        return model
    new = ScMulan(model.config.model_copy(update={"vocab_size": v_new}))
    state = model.state_dict()
    grown = {"token_embed.weight", "entity_head.weight", "expression_head.weight"}
    gen = torch.Generator().manual_seed(seed)
    new_state = {}
    for key in new.state_dict():
        if key not in grown:
            new_state[key] = state[key]
            continue
        old = state[key]
        rows = torch.empty(v_new - v_old, old.shape[1], dtype=old.dtype)
        for i in range(v_old, v_new):
            token = new_vocab.tokens[i]
            cat = next((c for c, vals in new_vocab.categories.items() if token in vals), None)
            peers = [] if cat is None else [old_vocab.id(t) for t in old_vocab.categories.get(cat, [])]
            if peers:
                rows[i - v_old] = old[peers].mean(dim=0)
            else:
                rows[i - v_old] = torch.randn(old.shape[1], generator=gen).to(old.dtype) * 0.02
        new_state[key] = torch.cat([old, rows], dim=0)
    new.load_state_dict(new_state, strict=True)
    new.train(model.training)
    return new


# ---------------------------------------------------------------------------------------------------------------
# Cells, metadata and next-state pairs
# ---------------------------------------------------------------------------------------------------------------


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
    g = np.zeros(t.size, dtype=np.int64) if groups is None else _codes(groups)
    bucket_of, buckets = _pair_buckets(t, g, np.ones(t.size, dtype=bool))
    empty = np.zeros(0, dtype=np.int64)
    return [buckets[b] if b >= 0 else empty for b in bucket_of]


def _codes(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    codes, _ = pd.factorize(pd.Series(list(values), dtype=object), use_na_sentinel=True)
    return codes.astype(np.int64)


def _pair_buckets(
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


def _time_values(col: pd.Series, where: str) -> np.ndarray:
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
class _Dataset:
    adata: AnnData
    name: str
    opened: bool  # we opened it (close it at the end)


class _Cells:
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


def _support(cells: _Cells, names: list[str], bucket_of: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------------------------
# The example stream
# ---------------------------------------------------------------------------------------------------------------


class ScMulanExampleStream(BatchStream):
    """Endless, exactly reproducible stream of collated training batches.

    Example ``k`` (a global index over all ranks): epoch ``e = k // N`` and position ``p = k % N`` pick cell
    ``cells[perm_e[p]]`` (``perm_e`` a permutation seeded by ``(seed, e)``); the generator
    ``default_rng([seed, 0, k])`` then draws its task (among the cell's supported tasks, by weight), its
    next-state partner, metadata subset and gene order. Micro-batch ``m`` of rank ``r`` out of ``W`` holds
    examples ``(m * W + r) * batch_size + i``. ``skip_batches`` starts at micro-batch ``skip_batches`` in O(1),
    so a resumed run continues exactly where the killed one stopped.

    Args:
        cells: the training cells' data.
        sampler: builds one example from a cell.
        cell_ids: global ids of the cells to draw from.
        support: ``[N, n_tasks]`` per-cell supported tasks (columns follow ``sampler.task_names``).
        bucket_of, buckets: next-state partners (see :func:`next_state_partners`).
        batch_size: sentences per micro-batch.
        seed: base seed.
        skip_batches: micro-batches (per rank) already consumed.
    """

    def __init__(
        self,
        cells: _Cells,
        sampler: TaskSampler,
        cell_ids: np.ndarray,
        support: np.ndarray,
        bucket_of: np.ndarray,
        buckets: list[np.ndarray],
        *,
        batch_size: int,
        seed: int,
        skip_batches: int = 0,
        stream: int = 0,
    ) -> None:
        super().__init__(skip_batches=skip_batches)
        self.cells = cells
        self.sampler = sampler
        self.cell_ids = np.asarray(cell_ids, dtype=np.int64)
        self.support = support
        self.bucket_of = bucket_of
        self.buckets = buckets
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stream = int(stream)  # 0 = training draws, 1 = validation draws (independent generators)
        self._perm: tuple[int, np.ndarray] | None = None

    def _cell_at(self, k: int) -> int:
        n = self.cell_ids.size
        epoch, pos = divmod(int(k), n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 7, epoch]).permutation(n))
        return int(self.cell_ids[self._perm[1][pos]])

    def draw(self, k: int, cell: int | None = None) -> tuple[int, str, int | None, np.random.Generator]:
        """Cell, task, partner and the generator (ready for the example's remaining draws) of example ``k``."""
        rng = np.random.default_rng([self.seed, self.stream, int(k)])
        if cell is None:
            cell = self._cell_at(k)
        ok = self.support[cell]
        names = [t for t, s in zip(self.sampler.task_names, ok, strict=True) if s]
        w = np.array([self.sampler.tasks[t] for t in names], dtype=np.float64)
        task = names[int(rng.choice(len(names), p=w / w.sum()))]
        partner = None
        if task == "next_state":
            bucket = self.buckets[self.bucket_of[cell]]
            partner = int(bucket[int(rng.integers(bucket.size))])
        return cell, task, partner, rng

    def examples(self, ks: Sequence[int], cells: Sequence[int] | None = None) -> list[TrainExample]:
        """The examples ``ks`` (optionally for given cells instead of the epoch order)."""
        draws = [self.draw(k, None if cells is None else cells[i]) for i, k in enumerate(ks)]
        need = [d[0] for d in draws] + [d[2] for d in draws if d[2] is not None]
        uniq = np.unique(np.asarray(need, dtype=np.int64))
        x = self.cells.rows(uniq)
        row_of = dict(zip(uniq.tolist(), range(uniq.size), strict=True))
        out = []
        for cell, task, partner, rng in draws:
            next_row = None if partner is None else x[row_of[partner]]
            ex = self.sampler.example(
                x[row_of[cell]], self.cells.meta_of(cell), rng, next_row=next_row, task=task
            )
            assert ex is not None  # the task was forced
            out.append(ex)
        return out

    def batch(self, m: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """Collated micro-batch ``m`` of ``rank``."""
        first = (int(m) * world + rank) * self.batch_size
        return collate_examples(self.examples(range(first, first + self.batch_size)), self.sampler.vocab)


class _ValExamples(torch.utils.data.Dataset):
    """One fixed example per held-out cell (map-style, so Lightning shards it across ranks)."""

    def __init__(self, stream: ScMulanExampleStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return int(self.stream.cell_ids.size)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        cells = [int(self.stream.cell_ids[i]) for i in idx]
        return collate_examples(self.stream.examples(idx, cells), self.stream.sampler.vocab)


# ---------------------------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------------------------


def train(
    data: AnnData | PathLike | Sequence[AnnData | PathLike],
    out: PathLike,
    config: ScMulanTrainConfig | None = None,
    *,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train (or fine-tune, with ``config.init_from``) scMulan on cells with metadata; returns ``RUN_DIR/model``.

    Args:
        data: an AnnData, an ``.h5ad`` path (opened backed), or a list of them; raw counts (``layers['counts']``
            or ``X``) unless ``config.pre_normalized``. Never modified.
        out: the run directory. If it already holds a run, training resumes from its last checkpoint.
        config: run settings; defaults to the tiny preset, annotation + generation on ``obs['cell_type']``.
        callbacks: extra Lightning callbacks.

    Returns:
        ``RUN_DIR/model``, an msfm scMulan checkpoint (``inference.load_model`` loads it).

    Raises:
        MsfmInputError: missing metadata columns (the message lists the obs columns), no usable cells, a task
            with no cell to learn from, invalid settings.
    """
    config = config or ScMulanTrainConfig()
    datasets = _open(data)
    try:
        return _train(datasets, Path(out), config, callbacks)
    finally:
        for ds in datasets:
            if ds.opened and ds.adata.isbacked:
                ds.adata.file.close()


def _open(data: Any) -> list[_Dataset]:
    from msfm.data import read

    items = [data] if isinstance(data, AnnData | str | os.PathLike) else list(data or [])
    if not items:
        msg = "No training data given: pass an AnnData, an .h5ad path, or a list of them (raw counts + obs metadata)."
        raise MsfmInputError(msg)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, AnnData):
            out.append(_Dataset(item, f"adata[{i}]", False))
        elif isinstance(item, str | os.PathLike):
            path = Path(item)
            backed = "r" if path.suffix == ".h5ad" else False
            out.append(_Dataset(read(path, backed=backed), str(path), True))
        else:
            msg = f"Training data item {i} is a {type(item).__name__}; expected an AnnData or a file path."
            raise MsfmInputError(msg)
    return out


def _check_columns(datasets: list[_Dataset], config: ScMulanTrainConfig) -> None:
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


def _raw_meta(datasets: list[_Dataset], config: ScMulanTrainConfig) -> dict[str, np.ndarray]:
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


def _gene_universe() -> GenePanel:
    """Human symbols the 'data' vocabulary may contain: the scFoundation panel plus the official scMulan genes."""
    symbols = list(GenePanel.scfoundation().symbols)
    have = set(symbols)
    symbols += [g for g in CellSentenceVocab.official().genes if g not in have]
    return GenePanel.from_symbols(symbols, name="human-symbols")


def _data_genes(
    datasets: list[_Dataset], sources: list[CellSource], config: ScMulanTrainConfig
) -> tuple[list[str], dict[str, Any]]:
    """Harmonised symbols of the data's genes, reduced to the top ``n_genes`` highly variable ones."""
    universe = _gene_universe()
    maps = []
    for ds in datasets:
        m = harmonize_genes(
            ds.adata.var,
            universe,
            gene_column=config.gene_column,
            species=config.species,
            use_aliases=config.use_aliases,
            min_panel_fraction=0.0,
            warn_panel_fraction=0.0,
        )
        if m.n_mapped == 0:
            msg = (
                f"None of the {m.n_input} genes of {ds.name} maps to a human gene symbol (e.g. "
                f"{list(m.input_names[:5])}). Pass gene_column= (a var column with symbols), or species='mouse'."
            )
            raise MsfmInputError(msg)
        maps.append(m)
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


def _vocabulary(
    datasets: list[_Dataset],
    sources: list[CellSource],
    raw_meta: dict[str, np.ndarray],
    config: ScMulanTrainConfig,
    init_vocab: CellSentenceVocab | None,
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
        base, info = init_vocab, {"source": "init_from", "path": config.init_from}
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


def _meta_ids(raw_meta: dict[str, np.ndarray], vocab: CellSentenceVocab) -> dict[str, np.ndarray]:
    out = {}
    for cat, values in raw_meta.items():
        codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
        table = np.array([vocab.id(u) for u in uniques], dtype=np.int64)
        ids = np.full(values.size, -1, dtype=np.int64)
        ids[codes >= 0] = table[codes[codes >= 0]]
        out[cat] = ids
    return out


def _build_model(
    config: ScMulanTrainConfig, vocab: CellSentenceVocab, init: Any
) -> tuple[ScMulan, ScMulanConfig]:
    if init is not None:
        shape_changes = sorted(set(config.model_overrides) - _FINETUNE_OVERRIDES)
        if shape_changes:
            msg = (
                f"model_overrides {shape_changes} would change the shape of the checkpoint given by init_from; "
                f"fine-tuning only allows {sorted(_FINETUNE_OVERRIDES)}."
            )
            raise MsfmInputError(msg)
        model = grow_model(init.model, init.vocab, vocab, seed=config.seed)
        if config.model_overrides:
            cfg = model.config.model_copy(update=config.model_overrides)
            grown = ScMulan(cfg)
            grown.load_state_dict(model.state_dict(), strict=True)
            model = grown
        return model.train(), model.config
    overrides = dict(config.model_overrides)
    if overrides.get("vocab_size", len(vocab)) != len(vocab):
        logger.warning(
            "model_overrides vocab_size=%s replaced by the vocabulary size %d",
            overrides["vocab_size"],
            len(vocab),
        )
    overrides["vocab_size"] = len(vocab)
    cfg = preset_config(config.preset, family="scmulan", **overrides)
    torch.manual_seed(config.seed)
    return ScMulan(cfg), cfg


def _world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def _train(datasets: list[_Dataset], out: Path, config: ScMulanTrainConfig, callbacks: Sequence[Any]) -> Path:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    _check_columns(datasets, config)
    sources = [
        CellSource(ds.adata, layer=config.layer, pre_normalized=config.pre_normalized) for ds in datasets
    ]
    raw_meta = _raw_meta(datasets, config)
    init = load_model(config.init_from, device="cpu") if config.init_from else None
    vocab, added, vocab_info = _vocabulary(
        datasets, sources, raw_meta, config, None if init is None else init.vocab, out
    )
    for cat, toks in added.items():
        logger.info("vocabulary: added %d %s token(s): %s", len(toks), cat, toks[:20])
    logger.info("vocabulary: %r", vocab)

    panel = GenePanel.from_symbols(list(vocab.genes), name="scmulan-vocabulary")
    mappings = []
    for ds in datasets:
        m = harmonize_genes(
            ds.adata.var,
            panel,
            gene_column=config.gene_column,
            species=config.species,
            use_aliases=config.use_aliases,
            min_panel_fraction=0.0,
        )
        if m.n_mapped == 0:
            msg = (
                f"None of the {m.n_input} genes of {ds.name} is a gene of the vocabulary ({len(panel)} genes, e.g. "
                f"{list(panel.symbols[:5])}). Check gene_column= / species=, or use vocabulary='data'."
            )
            raise MsfmInputError(msg)
        mappings.append(m)
    cells = _Cells(sources, mappings, _meta_ids(raw_meta, vocab), vocab)

    model, model_cfg = _build_model(config, vocab, init)
    sampler = TaskSampler(
        vocab,
        tasks=config.tasks,
        n_levels=model_cfg.n_levels,
        gene_order=config.gene_order,
        max_genes=config.max_genes,
        meta_prompt_prob=config.meta_prompt_prob,
        max_length=model_cfg.max_length,
    )

    # Next-state partners over every usable cell (validation pairs) and over training cells only.
    time = group = None
    if "next_state" in sampler.task_names:
        time = np.concatenate(
            [
                _time_values(ds.adata.obs[config.time_key], f"{config.time_key!r} of {ds.name}")
                for ds in datasets
            ]
        )
        group = (
            np.zeros(cells.n, dtype=np.int64)
            if config.pair_key is None
            else _codes(
                np.concatenate([ds.adata.obs[config.pair_key].astype(object).to_numpy() for ds in datasets])
            )
        )
    no_pairs = (np.full(cells.n, -1, dtype=np.int64), [])
    has_genes = cells.n_expr > 0
    bucket_all, buckets_all = no_pairs if time is None else _pair_buckets(time, group, has_genes)
    support = _support(cells, sampler.task_names, bucket_all)
    _check_support(support, sampler, cells, config, time)
    eligible = np.flatnonzero(support.any(axis=1))

    rng = np.random.default_rng([config.seed, 5])
    n_val = round(config.val_fraction * eligible.size)
    shuffled = rng.permutation(eligible)
    val_cells, train_cells = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
    in_train = np.zeros(cells.n, dtype=bool)
    in_train[train_cells] = True
    bucket_train, buckets_train = (
        no_pairs if time is None else _pair_buckets(time, group, has_genes & in_train)
    )
    support_train = _support(cells, sampler.task_names, bucket_train)
    train_cells = train_cells[support_train[train_cells].any(axis=1)]
    if train_cells.size == 0:
        msg = f"No training cell is left after holding out {n_val} validation cells; lower val_fraction."
        raise MsfmInputError(msg)
    logger.info(
        "scMulan training: %d training and %d validation cells (%s)",
        train_cells.size,
        val_cells.size,
        sampler.tasks,
    )

    opts = config.trainer
    accumulate = opts.accumulate
    skip = resume_step(out) * accumulate
    if skip:
        logger.info("resuming: skipping the %d micro-batches per rank already trained on", skip)
    stream = ScMulanExampleStream(
        cells,
        sampler,
        train_cells,
        support_train,
        bucket_train,
        buckets_train,
        batch_size=config.batch_size,
        seed=config.seed,
        skip_batches=skip,
    )
    # Own generators: creating the iterators draws nothing from the global RNG, which the engine restores on
    # resume, so a resumed run continues with the same random stream (dropout).
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_loader = None
    trainer_kwargs: dict[str, Any] = {}
    if val_cells.size:
        val_stream = ScMulanExampleStream(
            cells,
            sampler,
            val_cells,
            support,
            bucket_all,
            buckets_all,
            batch_size=config.batch_size,
            seed=config.seed,
            stream=1,
        )
        val_ds = _ValExamples(val_stream)
        val_loader = torch.utils.data.DataLoader(
            val_ds,
            batch_size=config.batch_size,
            shuffle=False,
            collate_fn=val_ds.collate,
            generator=torch.Generator().manual_seed(config.seed + 1),
        )
        # The training stream never ends an epoch, so validation runs every N optimiser steps.
        interval = (
            opts.val_check_interval
            if isinstance(opts.val_check_interval, int)
            else opts.checkpoint_every_n_steps
        )
        trainer_kwargs = {"val_check_interval": int(interval) * accumulate, "check_val_every_n_epoch": None}
    else:
        trainer_kwargs = {"limit_val_batches": 0}

    objective = functools.partial(scmulan_loss, config=config.loss)
    module = MsfmLightningModule(model, objective, config.optim)
    export = ExportCallback(
        family="scmulan",
        config=model_cfg,
        gene_panel=list(vocab.genes),
        gene_panel_name="scmulan",
        preprocessing=preprocessing_record(n_levels=model_cfg.n_levels, gene_order=config.gene_order),
        extra_meta={
            "source": "msfm-scmulan-train",
            "vocabulary": vocab.to_dict(),
            "vocabulary_sha256": vocab.sha256(),
            "vocabulary_origin": vocab_info,
            "vocabulary_added": added,
            "init_from": config.init_from,
            "tasks": sampler.tasks,
            "n_train_cells": int(train_cells.size),
            "n_val_cells": int(val_cells.size),
            "run_config": config.model_dump(mode="json"),
            "gene_mapping": [m.report for m in mappings],
        },
    )
    wrap = [ScMulanBlock] if opts.strategy.startswith("fsdp") else None

    def make_trainer(options: TrainerOptions) -> Any:
        return build_trainer(
            options, out, callbacks=[export, *callbacks], fsdp_wrap_layers=wrap, trainer_kwargs=trainer_kwargs
        )

    trainer = make_trainer(opts)
    if opts.max_steps == -1:
        # An endless stream has no epochs: turn max_epochs into steps over the training cells.
        per_step = config.batch_size * _world_size(trainer) * accumulate
        steps = int(opts.max_epochs or 1) * max(1, math.ceil(train_cells.size / per_step))
        logger.info("max_epochs=%s -> max_steps=%d", opts.max_epochs, steps)
        opts = opts.model_copy(update={"max_steps": steps, "max_epochs": None})
        trainer = make_trainer(opts)

    if trainer.is_global_zero and rank_zero_only.rank == 0:
        vocab.save(out / VOCAB_FILE)
    run_config = config.model_copy(update={"trainer": opts}).model_dump(mode="json")
    fit(trainer, module, loader, out, val_dataloaders=val_loader, run_config=run_config)
    return out / "model"


def _check_support(
    support: np.ndarray,
    sampler: TaskSampler,
    cells: _Cells,
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
