"""scFoundation pretraining: read-depth-aware downsampling, MAE masking and the masked MSE loss.

Upstream (``biomap-research/scFoundation``, commit ``d09626a``) never released pretraining code: no
data loader, no downsampling, no masking. This module re-derives the procedure from

* Hao et al., "Large-scale foundation model on single-cell transcriptomics", Nature Methods 21 (2024)
  (read-depth-aware, "RDA", pretraining; paper text partly recalled, see the field descriptions);
* Gong et al., "xTrimoGene", NeurIPS 2023 (asymmetric MAE: the encoder sees only unmasked non-zero
  genes, the decoder sees every position);
* the printed config of the released ``models.ckpt`` (``value_mask_prob 0.3``, ``zero_mask_prob 0.03``,
  ``mae_encoder_max_seq_len 15000``) and ``model/training_hyperparameter.txt`` (AdamW, lr 1e-4,
  9,766 warm-up steps, weight decay 0, gradient clip 1, 1,024 cells per optimiser step).

Every field of the configs below says where its default comes from: ``[cfg]``/``[code]`` = read from
upstream files, ``(recalled)`` = from memory of the paper, ``(inferred)`` = our reading of indirect
evidence, ``(ours)`` = not documented anywhere, chosen by us.

One training batch is made in four steps (:func:`make_pretrain_batch`):

1. **Downsample** (:func:`downsample_counts`): raw counts ``c`` -> input counts ``c'`` with
   ``c'_g ~ Binomial(c_g, gamma)``, ``gamma ~ Beta(a, b)``; some cells keep full depth.
2. **Mask** (:func:`sample_mask`): a fraction of the non-zero input genes and of the zero input genes.
3. **Tokenise**: encoder tokens = unmasked non-zero input genes (ascending gene id) + T + S;
   decoder input = every gene's input value, masked positions flagged; target = full-depth values.
4. **Loss** (:func:`pretrain_loss`): MSE between predicted and full-depth expression on masked positions.

The batch keys and shapes follow ``docs/architecture.md`` ("scFoundation tensors").
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from msfm.engine.objective import LossOutput
from msfm.errors import MsfmInputError
from msfm.tokenizers.gene_panel import normalize_rows

logger = logging.getLogger(__name__)

__all__ = [
    "NUM_GENES",
    "DownsampleConfig",
    "DownsampleResult",
    "LossOutput",
    "MaskResult",
    "MaskingConfig",
    "ObjectiveConfig",
    "PretrainCollator",
    "PretrainConfig",
    "build_optimizer",
    "downsample_counts",
    "make_pretrain_batch",
    "pretrain_loss",
    "sample_mask",
]

#: Panel size of the released model; the T, S and padding position ids follow it (G, G+1, G+2).
NUM_GENES = 19264


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


class DownsampleConfig(BaseModel):
    """Read-depth-aware (RDA) binomial downsampling of one raw count vector per cell.

    Per cell: with probability ``keep_full_depth_prob`` (or when the cell is shallower than
    ``min_total_for_downsampling``) the input is the raw vector (then S = T). Otherwise a rate
    ``gamma ~ Beta(beta_a, beta_b)`` is drawn, clipped to ``[max(min_rate, min_input_total / total), max_rate]``,
    and every count is thinned, ``c'_g ~ Binomial(c_g, gamma)``. A thinned cell whose total is still
    below ``min_input_total`` (binomial noise) falls back to full depth.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Turn RDA off to train a plain MAE (upstream ablation 02 did this)."
    )
    keep_full_depth_prob: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="(paper, recalled) about half of the cells keep full depth, so S = T is also seen.",
    )
    min_total_for_downsampling: float = Field(
        1000.0,
        ge=0.0,
        description="(paper, recalled) cells with fewer total counts are never downsampled: already shallow.",
    )
    beta_a: float = Field(
        2.0,
        gt=0.0,
        description="(ours; the paper's Beta prior parameters are not known) Beta(2, 2): mean rate 0.5, mass away from 0 and 1.",
    )
    beta_b: float = Field(2.0, gt=0.0, description="(ours) second Beta shape parameter, see beta_a.")
    min_rate: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="(ours) lower clip of gamma: below 5% a cell keeps too few genes to say anything about it.",
    )
    max_rate: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="(ours) upper clip of gamma; 1 leaves the Beta draw as is (Beta draws are < 1).",
    )
    min_input_total: float = Field(
        100.0,
        ge=0.0,
        description=(
            "(ours) minimum input depth: gamma is floored at min_input_total / total and a cell whose thinned "
            "total is still smaller keeps full depth, so inputs never collapse to a handful of counts."
        ),
    )

    @model_validator(mode="after")
    def _check_rates(self) -> DownsampleConfig:
        if self.min_rate > self.max_rate:
            msg = f"DownsampleConfig: min_rate={self.min_rate} is above max_rate={self.max_rate}; expected min_rate <= max_rate."
            raise ValueError(msg)
        return self


class MaskingConfig(BaseModel):
    """Which input positions are hidden from the encoder and reconstructed by the decoder.

    Non-zero input genes are masked with an exact per-cell count (``value_mask_prob * n`` with stochastic
    rounding, clamped so that at least ``min_masked_nonzero`` are masked and ``min_visible_nonzero`` stay
    visible when the cell has enough genes). Zero input genes are masked independently with probability
    ``zero_mask_prob``: with ~17,000 zeros a cell the count is already concentrated, and a Bernoulli
    draw avoids sorting every zero gene of every cell.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    value_mask_prob: float = Field(
        0.3, ge=0.0, le=1.0, description="[cfg] fraction of NON-ZERO input genes masked."
    )
    zero_mask_prob: float = Field(
        0.03, ge=0.0, le=1.0, description="[cfg] fraction of ZERO input genes masked."
    )
    encoder_max_len: int = Field(
        15000,
        ge=3,
        description="[cfg; semantics inferred] mae_encoder_max_seq_len: cap on encoder tokens, T and S included.",
    )
    encoder_overflow: Literal["mask", "drop"] = Field(
        "mask",
        description=(
            "(ours) visible genes beyond the cap: 'mask' hides them like masked genes (they enter the loss, so the "
            "decoder never sees a value the encoder did not); 'drop' leaves them out of the encoder only (the "
            "decoder still sees their value, they are not in the loss)."
        ),
    )
    min_masked_nonzero: int = Field(
        1,
        ge=0,
        description="(ours) a cell with >= 2 non-zero genes always has a masked non-zero gene to learn from.",
    )
    min_visible_nonzero: int = Field(
        1,
        ge=0,
        description="(ours) keep at least one non-zero gene visible so the encoder sees some expression.",
    )


class ObjectiveConfig(BaseModel):
    """How a pretraining batch is made: downsampling, masking and normalisation (no optimiser settings).

    This is the ``objective`` section of :class:`msfm.models.scfoundation.pretraining.ScFoundationTrainConfig`;
    the optimiser and trainer have their own sections there, so a flat ``lr=`` names one field only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    downsample: DownsampleConfig = Field(default_factory=DownsampleConfig, description="RDA downsampling.")
    masking: MaskingConfig = Field(default_factory=MaskingConfig, description="MAE masking.")
    target_sum: float = Field(
        1e4, gt=0.0, description="[code] values are log1p(c / sum(c) * 1e4), as at inference."
    )
    pad_to_multiple_of: int = Field(
        1,
        ge=1,
        description="(ours) pad the encoder length to a multiple (e.g. 16 for tensor cores, as GEARS did).",
    )


class PretrainConfig(ObjectiveConfig):
    """The reference pretraining recipe: :class:`ObjectiveConfig` plus the upstream optimiser settings.

    :func:`build_optimizer` turns the optimiser fields into an AdamW optimiser with a warm-up schedule;
    :meth:`optim_kwargs` gives them under the engine's names.
    """

    lr: float = Field(1e-4, gt=0.0, description="[code] AdamW learning rate (= max_lr).")
    weight_decay: float = Field(0.0, ge=0.0, description="[code] no weight decay.")
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="(ours) not in upstream files: AdamW defaults."
    )
    eps: float = Field(1e-8, gt=0.0, description="(ours) not in upstream files: AdamW default.")
    warmup_steps: int = Field(9766, ge=0, description="[code] linear warm-up optimiser steps (~10 M cells).")
    max_steps: int | None = Field(
        None,
        ge=1,
        description=(
            "(ours) total optimiser steps for the decay; None: flat after warm-up in build_optimizer, "
            "the engine's estimate of the run length in optim_kwargs()."
        ),
    )
    lr_decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="(inferred; scheduler type unknown) decay after warm-up when max_steps is set."
    )
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="(ours) final lr as a fraction of lr.")
    grad_clip_norm: float = Field(1.0, gt=0.0, description="[code] gradient clipping (norm).")
    effective_batch_size: int = Field(
        1024, ge=1, description="[code] cells per optimiser step (128 global batch x 8 accumulation)."
    )
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "bf16-mixed", description="[code] upstream trained in bf16."
    )

    def optim_kwargs(self) -> dict[str, Any]:
        """The optimiser fields under the names of ``msfm.engine.module.OptimConfig``.

        Returns:
            ``lr``, ``weight_decay``, ``betas``, ``eps``, ``warmup_steps``, ``schedule``, ``min_lr_ratio``,
            ``total_steps``: ``OptimConfig(**config.optim_kwargs())`` gives the engine the reference recipe.
        """
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "betas": self.betas,
            "eps": self.eps,
            "warmup_steps": self.warmup_steps,
            "schedule": self.lr_decay,
            "min_lr_ratio": self.min_lr_ratio,
            "total_steps": self.max_steps,
        }


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownsampleResult:
    """Output of :func:`downsample_counts`.

    Shape:
        ``counts``: ``[b, g]`` CSR (explicit zeros removed, sorted indices); the rest ``[b]``.
    """

    counts: sp.csr_matrix
    rate: np.ndarray  # gamma used per cell, 1.0 where the cell kept full depth
    downsampled: np.ndarray  # bool
    source_total: np.ndarray  # float64, sum of the input counts (S = log10 of it)
    target_total: np.ndarray  # float64, sum of the raw counts (T = log10 of it)


@dataclass(frozen=True)
class MaskResult:
    """Output of :func:`sample_mask`, aligned with the CSR it was drawn for.

    Shape:
        ``masked_nonzero``, ``dropped``: ``[nnz]`` (aligned with ``counts.data``);
        ``masked_zero``: ``[b, g]``.
    """

    masked_nonzero: np.ndarray
    dropped: np.ndarray
    masked_zero: np.ndarray


class _HasExpression(Protocol):
    expression: torch.Tensor | None


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def _as_csr(rows: Any, num_genes: int) -> sp.csr_matrix:
    """Stack rows (a sparse matrix, a 2-D array, or a sequence of 1-row/1-D rows) into a clean CSR."""
    if sp.issparse(rows):
        csr = sp.csr_matrix(rows, dtype=np.float64)
    elif isinstance(rows, torch.Tensor):
        csr = sp.csr_matrix(rows.detach().cpu().numpy().astype(np.float64, copy=False))
    elif isinstance(rows, np.ndarray):
        arr = rows[None, :] if rows.ndim == 1 else rows
        csr = sp.csr_matrix(arr.astype(np.float64, copy=False))
    elif isinstance(rows, Sequence | Iterable):
        items = list(rows)
        if not items:
            msg = "PretrainCollator received an empty batch; expected at least one count row."
            raise MsfmInputError(msg)
        stacked = []
        for item in items:
            if sp.issparse(item):
                stacked.append(sp.csr_matrix(item, dtype=np.float64).reshape(1, -1))
            else:
                arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
                stacked.append(sp.csr_matrix(arr.astype(np.float64, copy=False).reshape(1, -1)))
        csr = sp.vstack(stacked, format="csr")
    else:
        msg = f"Expected count rows as a scipy sparse matrix, numpy array or a list of rows; got {type(rows).__name__}."
        raise MsfmInputError(msg)
    if csr.shape[1] != num_genes:
        msg = (
            f"Count rows have {csr.shape[1]} columns; expected {num_genes} panel-aligned genes. "
            "Map the data onto the gene panel first (msfm.data.harmonize_genes(...).apply)."
        )
        raise MsfmInputError(msg)
    if not np.all(np.isfinite(csr.data)) or (csr.data < 0).any():
        msg = "Count rows contain negative, NaN or infinite values; expected raw non-negative counts."
        raise MsfmInputError(msg)
    csr = csr.copy()  # never modify the caller's matrix in place
    csr.sum_duplicates()  # also sorts the column indices
    csr.eliminate_zeros()
    return csr


def _row_of_nonzeros(csr: sp.csr_matrix) -> np.ndarray:
    """Row index of every stored entry of ``csr``, shape ``[nnz]``."""
    return np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))


# --------------------------------------------------------------------------------------------------
# 1. Read-depth-aware downsampling
# --------------------------------------------------------------------------------------------------


def downsample_counts(
    counts: sp.csr_matrix, config: DownsampleConfig, rng: np.random.Generator
) -> DownsampleResult:
    """Draw a lower-depth input profile for every cell (binomial thinning, vectorised over non-zeros).

    Args:
        counts: Raw counts, one cell a row, any number of columns. Non-integer counts are rounded for
            the binomial draw (with a warning); the caller's matrix is not modified.
        config: Downsampling parameters.
        rng: Source of every random draw; the result is a function of ``rng``'s state and the data.

    Returns:
        The thinned counts and per-cell bookkeeping (rate, whether thinned, both totals).

    Shape:
        counts: ``[b, g]`` -> ``DownsampleResult.counts`` ``[b, g]``.
    """
    csr = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    csr.sum_duplicates()
    b = csr.shape[0]
    row_of = _row_of_nonzeros(csr)
    target_total = np.bincount(row_of, weights=csr.data, minlength=b).astype(np.float64)

    # Draw the per-cell variates for every cell, thinned or not, so a cell's draws do not depend on
    # the decisions taken for the cells before it.
    u_keep = rng.random(b)
    gamma = rng.beta(config.beta_a, config.beta_b, size=b)
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = np.where(target_total > 0, config.min_input_total / target_total, np.inf)
    floor = np.maximum(floor, config.min_rate)
    rate = np.minimum(np.maximum(gamma, floor), config.max_rate)

    candidate = (
        np.full(b, config.enabled)
        & (u_keep >= config.keep_full_depth_prob)
        & (target_total >= config.min_total_for_downsampling)
        & (target_total > 0)
    )
    data = csr.data.copy()
    sel = candidate[row_of]
    if sel.any():
        n = data[sel]
        n_int = np.rint(n)
        if not np.array_equal(n, n_int):
            warnings.warn(
                "Binomial downsampling received non-integer counts; they are rounded for the draw. "
                "Pretraining expects raw UMI/read counts.",
                UserWarning,
                stacklevel=2,
            )
        data[sel] = rng.binomial(n_int.astype(np.int64), rate[row_of[sel]])
    source_total = np.bincount(row_of, weights=data, minlength=b)

    # Binomial noise can still leave a cell below the minimum depth: that cell keeps full depth.
    too_shallow = candidate & (source_total < config.min_input_total)
    if too_shallow.any():
        restore = too_shallow[row_of]
        data[restore] = csr.data[restore]
        source_total[too_shallow] = target_total[too_shallow]
    downsampled = candidate & ~too_shallow

    out = sp.csr_matrix((data, csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    out.eliminate_zeros()
    return DownsampleResult(
        counts=out,
        rate=np.where(downsampled, rate, 1.0),
        downsampled=downsampled,
        source_total=source_total.astype(np.float64),
        target_total=target_total,
    )


# --------------------------------------------------------------------------------------------------
# 2. Masking
# --------------------------------------------------------------------------------------------------


def sample_mask(counts: sp.csr_matrix, config: MaskingConfig, rng: np.random.Generator) -> MaskResult:
    """Choose the masked non-zero genes, the masked zero genes and the encoder overflow per cell.

    Args:
        counts: Input (downsampled) counts with sorted indices and no explicit zeros.
        config: Masking parameters.
        rng: Source of every random draw.

    Returns:
        Masks aligned with ``counts.data`` (non-zero genes) and a dense mask of the zero genes.

    Shape:
        counts: ``[b, g]`` -> ``masked_nonzero``/``dropped`` ``[nnz]``, ``masked_zero`` ``[b, g]``.
    """
    b, g = counts.shape
    nnz_per_row = np.diff(counts.indptr)
    row_of = _row_of_nonzeros(counts)

    # Exact per-cell count with stochastic rounding: the expectation is value_mask_prob * n exactly,
    # and small cells do not end up fully masked or fully visible by chance.
    k = np.floor(config.value_mask_prob * nnz_per_row + rng.random(b)).astype(np.int64)
    hi = np.maximum(nnz_per_row - config.min_visible_nonzero, 0)
    lo = np.minimum(config.min_masked_nonzero, hi)
    k = np.clip(k, lo, hi)

    # Rank the non-zeros of each row in a random order; the first k are masked, the next `overflow`
    # (visible genes beyond the encoder cap) are masked or dropped.
    keys = rng.random(counts.nnz)
    order = np.lexsort((keys, row_of))
    rank = np.empty(counts.nnz, dtype=np.int64)
    rank[order] = np.arange(counts.nnz) - counts.indptr[row_of[order]]
    masked_nonzero = rank < k[row_of]

    max_genes = config.encoder_max_len - 2  # T and S always take two encoder slots
    overflow = np.maximum(nnz_per_row - k - max_genes, 0)
    beyond = (rank >= k[row_of]) & (rank < (k + overflow)[row_of])
    if config.encoder_overflow == "mask":
        masked_nonzero |= beyond
        dropped = np.zeros(counts.nnz, dtype=bool)
    else:
        dropped = beyond

    is_nonzero = np.zeros((b, g), dtype=bool)
    is_nonzero[row_of, counts.indices] = True
    masked_zero = (rng.random((b, g), dtype=np.float32) < config.zero_mask_prob) & ~is_nonzero
    return MaskResult(masked_nonzero=masked_nonzero, dropped=dropped, masked_zero=masked_zero)


# --------------------------------------------------------------------------------------------------
# 3. Batch construction
# --------------------------------------------------------------------------------------------------


def make_pretrain_batch(
    counts: Any,
    config: ObjectiveConfig,
    rng: np.random.Generator,
    *,
    num_genes: int = NUM_GENES,
) -> dict[str, torch.Tensor]:
    """Turn panel-aligned raw count rows into one pretraining batch.

    Cells with zero total count are dropped (with a warning): they have no depth (log10(0)) and no
    expression to reconstruct; pretraining QC (``min_genes=200``) removes them upstream anyway.

    Args:
        counts: Raw counts ``[b, num_genes]``: a scipy sparse matrix, a 2-D array, or a list of rows.
        config: Downsampling, masking and normalisation settings.
        rng: Source of every random draw (downsampling, then masking).
        num_genes: Panel size ``G``; position ids ``G`` = T, ``G + 1`` = S, ``G + 2`` = padding.

    Returns:
        The batch dict of ``docs/architecture.md``: ``values``, ``gene_ids``, ``padding_mask``,
        ``full_values``, ``full_mask``, ``target``, ``loss_mask``.

    Raises:
        MsfmInputError: Wrong number of columns, negative/NaN counts, or no cell with a count.

    Shape:
        counts: ``[b, G]`` -> ``values``/``gene_ids``/``padding_mask`` ``[b', n]``, ``full_values``/
        ``full_mask`` ``[b', G + 2]``, ``target``/``loss_mask`` ``[b', G]`` (``b'`` = cells with counts).
    """
    csr = _as_csr(counts, num_genes)
    totals = np.asarray(csr.sum(axis=1)).ravel()
    if (totals <= 0).any():
        n_empty = int((totals <= 0).sum())
        if n_empty == csr.shape[0]:
            msg = f"All {n_empty} cells of the batch have zero counts; expected cells with expression (QC first)."
            raise MsfmInputError(msg)
        warnings.warn(
            f"{n_empty} of {csr.shape[0]} cells have zero total count and are left out of the pretraining batch.",
            UserWarning,
            stacklevel=2,
        )
        csr = csr[totals > 0]
    b, g = csr.shape
    t_id, s_id, pad_id = g, g + 1, g + 2

    ds = downsample_counts(csr, config.downsample, rng)
    inp = ds.counts
    mask = sample_mask(inp, config.masking, rng)
    row_of = _row_of_nonzeros(inp)
    # The tokenizer's normalisation (float64, divide then multiply), so pretraining inputs match inference.
    inp_values = normalize_rows(inp, target_sum=config.target_sum).data
    depth_t = np.log10(ds.target_total).astype(np.float32)
    depth_s = np.log10(ds.source_total).astype(np.float32)

    # Encoder tokens: visible non-zero genes in ascending gene id (CSR order), then T, then S.
    in_encoder = ~mask.masked_nonzero & ~mask.dropped
    enc_rows = row_of[in_encoder]
    n_genes_enc = np.bincount(enc_rows, minlength=b)
    lengths = n_genes_enc + 2
    n = int(lengths.max())
    n = int(math.ceil(n / config.pad_to_multiple_of) * config.pad_to_multiple_of)
    start = np.concatenate([[0], np.cumsum(n_genes_enc)[:-1]])
    pos = np.arange(enc_rows.size) - start[enc_rows]
    values = np.zeros((b, n), dtype=np.float32)
    gene_ids = np.full((b, n), pad_id, dtype=np.int64)
    values[enc_rows, pos] = inp_values[in_encoder]
    gene_ids[enc_rows, pos] = inp.indices[in_encoder]
    cells = np.arange(b)
    values[cells, n_genes_enc] = depth_t
    gene_ids[cells, n_genes_enc] = t_id
    values[cells, n_genes_enc + 1] = depth_s
    gene_ids[cells, n_genes_enc + 1] = s_id
    padding_mask = np.arange(n)[None, :] >= lengths[:, None]

    # Decoder input: every gene's input value (0 for zero genes); masked positions carry 0 and are
    # flagged so that the model swaps in its mask embedding.
    full_values = np.zeros((b, g + 2), dtype=np.float32)
    full_values[row_of, inp.indices] = inp_values
    full_mask = np.zeros((b, g + 2), dtype=bool)
    full_mask[:, :g] = mask.masked_zero
    full_mask[row_of[mask.masked_nonzero], inp.indices[mask.masked_nonzero]] = True
    full_values[full_mask] = 0.0
    full_values[:, t_id] = depth_t
    full_values[:, s_id] = depth_s

    # Target: the raw (full-depth) profile, normalised the same way.
    target = normalize_rows(csr, target_sum=config.target_sum).toarray()

    return {
        "values": torch.from_numpy(values),
        "gene_ids": torch.from_numpy(gene_ids),
        "padding_mask": torch.from_numpy(padding_mask),
        "full_values": torch.from_numpy(full_values),
        "full_mask": torch.from_numpy(full_mask),
        "target": torch.from_numpy(target),
        "loss_mask": torch.from_numpy(full_mask[:, :g].copy()),
    }


class PretrainCollator:
    """DataLoader ``collate_fn`` that builds pretraining batches from raw count rows.

    Randomness: the main process draws from ``numpy.random.default_rng([seed, 0])``. Inside a DataLoader
    worker the generator is re-seeded from ``[seed, 1 + worker_id, worker_seed]`` where ``worker_seed`` is
    the seed torch hands that worker (fresh every epoch, itself deterministic when the DataLoader gets a
    seeded ``generator``), so workers never repeat each other's masks and epochs differ.

    Args:
        config: Pretraining settings (downsampling, masking, normalisation); defaults if None.
        num_genes: Panel size ``G`` of the rows.
        seed: Seed of the collator's generator.

    Example:
        >>> collate = PretrainCollator(PretrainConfig(), seed=0)
        >>> loader = torch.utils.data.DataLoader(rows, batch_size=8, collate_fn=collate)  # doctest: +SKIP
    """

    def __init__(
        self, config: ObjectiveConfig | None = None, *, num_genes: int = NUM_GENES, seed: int = 0
    ) -> None:
        self.config = config if config is not None else ObjectiveConfig()
        self.num_genes = num_genes
        self.seed = seed
        self._rng = np.random.default_rng([seed, 0])
        self._worker_key: tuple[int, int] | None = None

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            key = (info.id, info.seed)
            if key != self._worker_key:
                self._worker_key = key
                self._rng = np.random.default_rng([self.seed, 1 + info.id, info.seed % (2**63)])
        return self._rng

    def __call__(self, rows: Any, *, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        """Build a batch; ``rng`` overrides the collator's own generator for this call.

        Shape:
            rows: ``[b, G]`` -> see :func:`make_pretrain_batch`.
        """
        return make_pretrain_batch(
            rows, self.config, rng if rng is not None else self._generator(), num_genes=self.num_genes
        )


# --------------------------------------------------------------------------------------------------
# 4. Loss and optimiser
# --------------------------------------------------------------------------------------------------


def _masked_mse(sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``sq`` over ``mask``; 0 when the mask is empty (no NaN in the logs)."""
    return sq.masked_fill(~mask, 0.0).sum() / mask.sum().clamp_min(1)


def pretrain_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Masked-position MSE between predicted and full-depth normalised expression.

    Every masked position of the batch weighs the same (a cell with more masked genes weighs more),
    the usual MAE reduction. Components split the masked positions by their target: ``target > 0``
    (``mse_masked_nonzero``) and ``target == 0`` (``mse_masked_zero``); a masked gene that is zero in
    the input but non-zero at full depth counts as non-zero, which is the read-depth enhancement case.

    Args:
        model: A ScFoundation model (``forward(batch).expression``).
        batch: A pretraining batch (:func:`make_pretrain_batch`).

    Returns:
        ``LossOutput`` with ``loss`` and components ``loss``, ``mse_masked_nonzero``, ``mse_masked_zero``;
        ``n`` = number of cells.

    Raises:
        ValueError: The model returned no expression (built without the output head).

    Shape:
        ``model(batch).expression`` ``[b, G + 2]``; ``target``/``loss_mask`` ``[b, G]``.
    """
    out: _HasExpression = model(batch)
    if out.expression is None:
        msg = (
            "pretrain_loss needs model(batch).expression, got None; build the model with its expression head."
        )
        raise ValueError(msg)
    target = batch["target"].float()
    loss_mask = batch["loss_mask"].bool()
    g = target.shape[1]
    pred = out.expression[:, :g].float()
    sq = (pred - target).square()
    loss = _masked_mse(sq, loss_mask)
    with torch.no_grad():
        nonzero = loss_mask & (target > 0)
        components = {
            "loss": loss.detach(),
            "mse_masked_nonzero": _masked_mse(sq.detach(), nonzero),
            "mse_masked_zero": _masked_mse(sq.detach(), loss_mask & ~nonzero),
        }
    return LossOutput(loss=loss, components=components, n=int(target.shape[0]))


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: PretrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up, then flat (``max_steps=None``) or a cosine/linear decay.

    Gradient clipping (``config.grad_clip_norm``) is the trainer's job.

    Args:
        parameters: Parameters to optimise.
        config: Pretraining settings (``lr``, ``betas``, ``eps``, ``weight_decay``, schedule fields).

    Returns:
        The optimiser and a per-step scheduler (call ``scheduler.step()`` after each optimiser step).
    """
    optimizer = torch.optim.AdamW(
        parameters, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total is None or config.lr_decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.lr_decay == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
