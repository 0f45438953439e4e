"""scFoundation inputs from panel-aligned count rows: normalisation, depth tokens T/S, token sequences, batches.

Follows the official preprocessing (GitHub ``biomap-research/scFoundation``, ``model/get_embedding.py`` L143-181,
commit ``d09626a``): per cell ``x_g = log1p(c_g / sum(c) * 1e4)`` computed in float64 and cast to float32,
``S = log10(sum(c))`` and the target depth ``T`` from a spec ``tN`` (T = N), ``aY`` (T = S + Y) or ``fX``
(T = log10(sum(c) * X)). Gene position ids are the panel positions ``0..G-1``; ``G`` is T, ``G + 1`` is S and
``G + 2`` is padding (``docs/architecture.md``, "scFoundation tensors").

Deliberate differences from the official code, all documented in ``docs/scfoundation.md``:

* T and S are always the last two tokens (the official encoder drops any value <= 0, including T or S).
* A cell with zero counts has ``S = 0.0`` (``log10(0)`` is undefined) and is flagged in ``EncodedCells.zero_count``;
  its token sequence is just T and S.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from msfm.data.normalize import canonical_csr, log1p_cp10k, row_totals
from msfm.errors import MsfmInputError

__all__ = [
    "SCFOUNDATION_NUM_GENES",
    "EncodedCells",
    "ScFoundationTokenizer",
    "TargetDepth",
    "depth_tokens",
    "normalize_rows",
]

#: Genes in the scFoundation panel; T, S and padding ids follow.
SCFOUNDATION_NUM_GENES = 19264

_SPEC_RE = re.compile(r"^\s*([taf])\s*(\d+(?:\.\d*)?|\.\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TargetDepth:
    """Target-depth specification of scFoundation (the official ``--tgthighres``).

    Attributes:
        mode: ``"t"`` fixed T = value; ``"a"`` T = S + value (additive, log10 scale); ``"f"`` T = log10(total * value).
        value: the number after the letter.

    Example:
        >>> TargetDepth.parse("a5")
        TargetDepth(mode='a', value=5.0)
    """

    mode: Literal["t", "a", "f"]
    value: float

    @classmethod
    def parse(cls, spec: str | TargetDepth) -> TargetDepth:
        """Parse ``"t4"``, ``"a5"``, ``"f1"`` (any non-negative number after the letter; ``f`` needs > 0).

        Raises:
            MsfmInputError: for any other form (the message lists the accepted ones).
        """
        if isinstance(spec, TargetDepth):
            return spec
        match = _SPEC_RE.match(str(spec))
        if match is None or (match.group(1).lower() == "f" and float(match.group(2)) <= 0):
            msg = (
                f"Target depth {spec!r} is not valid. Accepted forms: 't<N>' (T = N, e.g. 't4'), 'a<Y>' (T = S + Y, "
                "e.g. 'a5' for 10^5-fold read-depth enhancement), 'f<X>' with X > 0 (T = log10(total * X), e.g. 'f1' "
                "to keep the cell's own depth)."
            )
            raise MsfmInputError(msg)
        return cls(match.group(1).lower(), float(match.group(2)))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.mode}{self.value:g}"


#: ``log1p(c / sum(c) * 1e4)`` over the given genes (the scFoundation values): the one normalisation of msfm.
normalize_rows = log1p_cp10k


def depth_tokens(totals: np.ndarray, target: str | TargetDepth) -> tuple[np.ndarray, np.ndarray]:
    """Depth tokens ``(T, S)`` from per-cell totals, float64.

    ``S = log10(total)``. Cells with ``total == 0`` get ``S = 0.0`` (flag them with ``totals == 0``); then ``a``
    gives ``T = value`` and ``f`` gives ``T = log10(value)``.

    Args:
        totals: ``[n]`` per-cell totals (read depth over the panel genes).
        target: target-depth spec, see :class:`TargetDepth`.

    Returns:
        ``(T, S)``, each ``[n]`` float64.
    """
    spec = TargetDepth.parse(target)
    totals = np.asarray(totals, dtype=np.float64).ravel()
    zero = totals <= 0
    safe = np.where(zero, 1.0, totals)
    s = np.where(zero, 0.0, np.log10(safe))
    if spec.mode == "t":
        t = np.full_like(s, spec.value)
    elif spec.mode == "a":
        t = s + spec.value
    else:
        t = np.where(zero, np.log10(spec.value), np.log10(safe * spec.value))
    return t, s


@dataclass(frozen=True, eq=False)
class EncodedCells:
    """Token sequences of ``n`` cells in a flat (CSR-like) layout.

    Cell ``i`` owns ``gene_ids[indptr[i]:indptr[i+1]]`` and the same slice of ``values``: its non-zero genes in
    ascending panel id, then T (id ``G``) and S (id ``G + 1``).

    Attributes:
        indptr: ``[n + 1]`` int64 offsets.
        gene_ids: ``[nnz + 2n]`` int64 position ids.
        values: ``[nnz + 2n]`` float32 token values.
        T: ``[n]`` float64 target depth.
        S: ``[n]`` float64 source depth.
        zero_count: ``[n]`` bool, cells without counts (S defined as 0).
        num_genes: panel size ``G``.
        target_depth: the spec used.
        pre_normalized: whether values were used as given.
    """

    indptr: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray
    T: np.ndarray
    S: np.ndarray
    zero_count: np.ndarray
    num_genes: int
    target_depth: str
    pre_normalized: bool

    @property
    def lengths(self) -> np.ndarray:
        """``[n]`` sequence length of each cell (non-zero genes + 2)."""
        return np.diff(self.indptr)

    def __len__(self) -> int:
        return len(self.indptr) - 1


class ScFoundationTokenizer:
    """Turn panel-aligned count rows into scFoundation encoder/decoder inputs.

    Args:
        num_genes: panel size ``G`` (19,264 for the released models). Ids: genes ``0..G-1``, T ``G``, S ``G+1``,
            padding ``G+2``.

    Example:
        >>> tok = ScFoundationTokenizer()
        >>> enc = tok.encode(panel_counts, "t4")         # doctest: +SKIP
        >>> batch = tok.collate(enc, [0, 1, 2])          # values / gene_ids / padding_mask
    """

    def __init__(self, num_genes: int = SCFOUNDATION_NUM_GENES) -> None:
        if num_genes < 1:
            msg = f"num_genes must be >= 1; received {num_genes}."
            raise MsfmInputError(msg)
        self.num_genes = int(num_genes)
        self.t_id = self.num_genes
        self.s_id = self.num_genes + 1
        self.pad_id = self.num_genes + 2

    def encode(
        self,
        counts: sp.spmatrix | sp.sparray | np.ndarray,
        target_depth: str | TargetDepth,
        *,
        pre_normalized: bool = False,
    ) -> EncodedCells:
        """Normalise rows and build token sequences.

        Args:
            counts: ``[n, G]`` raw counts in panel order (``GeneMapping.apply`` output), or log-normalised values with
                ``pre_normalized=True``.
            target_depth: ``"t4"``, ``"a5"``, ``"f1"``, ... (see :class:`TargetDepth`).
            pre_normalized: use the values as given; S is then ``log10`` of their sum (official behaviour, not a read
                depth; warns).

        Returns:
            :class:`EncodedCells`.

        Raises:
            MsfmInputError: wrong number of columns, or negative / non-finite values.
        """
        spec = TargetDepth.parse(target_depth)
        csr = sp.csr_matrix(counts)
        if csr.shape[1] != self.num_genes:
            msg = (
                f"encode expects {self.num_genes} columns in panel order; received {csr.shape[1]}. Map the genes "
                "first: `mapping = msfm.data.harmonize_genes(adata.var, panel)` then `mapping.apply(counts)`."
            )
            raise MsfmInputError(msg)
        if csr.data.size and (not np.isfinite(csr.data).all() or csr.data.min() < 0):
            msg = "encode received negative or non-finite values; pass validated rows (msfm.data.CellSource)."
            raise MsfmInputError(msg)
        csr = canonical_csr(csr)
        totals = row_totals(csr)
        if pre_normalized:
            warnings.warn(
                "pre_normalized=True: values are used as given and S = log10(sum of the log-normalised values), as "
                "in the official scFoundation code; S is then not a read depth.",
                UserWarning,
                stacklevel=2,
            )
            values = sp.csr_matrix(csr, dtype=np.float32)
        else:
            values = normalize_rows(csr)
        values.eliminate_zeros()
        t, s = depth_tokens(totals, spec)
        n = csr.shape[0]
        nnz_row = np.diff(values.indptr)
        indptr = np.concatenate([[0], np.cumsum(nnz_row + 2)]).astype(np.int64)
        gene_ids = np.empty(indptr[-1], dtype=np.int64)
        token_values = np.empty(indptr[-1], dtype=np.float32)
        # Gene tokens go to every slot except the last two of each cell.
        is_gene = np.ones(indptr[-1], dtype=bool)
        is_gene[indptr[1:] - 1] = False
        is_gene[indptr[1:] - 2] = False
        gene_ids[is_gene] = values.indices
        token_values[is_gene] = values.data
        gene_ids[indptr[1:] - 2] = self.t_id
        gene_ids[indptr[1:] - 1] = self.s_id
        token_values[indptr[1:] - 2] = t.astype(np.float32)
        token_values[indptr[1:] - 1] = s.astype(np.float32)
        return EncodedCells(
            indptr=indptr,
            gene_ids=gene_ids,
            values=token_values,
            T=t,
            S=s,
            zero_count=totals <= 0 if n else np.zeros(0, dtype=bool),
            num_genes=self.num_genes,
            target_depth=str(spec),
            pre_normalized=bool(pre_normalized),
        )

    def _check(self, encoded: EncodedCells, idx: np.ndarray) -> np.ndarray:
        if encoded.num_genes != self.num_genes:
            msg = (
                f"EncodedCells were made for {encoded.num_genes} genes; this tokenizer has {self.num_genes}."
            )
            raise MsfmInputError(msg)
        idx = np.asarray(idx, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= len(encoded)):
            msg = f"Cell indices must lie in [0, {len(encoded)}); received min {idx.min()}, max {idx.max()}."
            raise MsfmInputError(msg)
        return idx

    def collate(
        self,
        encoded: EncodedCells,
        idx: np.ndarray | list[int],
        *,
        full: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Pad the token sequences of cells ``idx`` into a batch.

        Args:
            encoded: output of :meth:`encode`.
            idx: cells to batch, in batch order.
            full: also add ``full_values`` (see :meth:`full_values`).

        Returns:
            ``values [b, n]`` float32 (padding 0), ``gene_ids [b, n]`` int64 (padding ``G + 2``), ``padding_mask
            [b, n]`` bool (True at padding), where ``n`` is the longest sequence in the batch.
        """
        idx = self._check(encoded, idx)
        starts, stops = encoded.indptr[idx], encoded.indptr[idx + 1]
        lengths = stops - starts
        width = int(lengths.max()) if idx.size else 0
        b = idx.size
        values = np.zeros((b, width), dtype=np.float32)
        gene_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        cols = np.arange(width)
        real = cols[None, :] < lengths[:, None]
        src = (starts[:, None] + cols[None, :])[real]
        values[real] = encoded.values[src]
        gene_ids[real] = encoded.gene_ids[src]
        batch = {
            "values": torch.from_numpy(values),
            "gene_ids": torch.from_numpy(gene_ids),
            "padding_mask": torch.from_numpy(~real),
        }
        if full:
            batch["full_values"] = self.full_values(encoded, idx)
        return batch

    def full_values(self, encoded: EncodedCells, idx: np.ndarray | list[int]) -> torch.Tensor:
        """Dense decoder input ``[b, G + 2]`` float32: every gene's value (0 where not expressed), then T and S.

        This equals the official 19,266-long model input vector for each cell.
        """
        idx = self._check(encoded, idx)
        out = np.zeros((idx.size, self.num_genes + 2), dtype=np.float32)
        for row, i in enumerate(idx):
            lo, hi = encoded.indptr[i], encoded.indptr[i + 1]
            out[row, encoded.gene_ids[lo:hi]] = encoded.values[lo:hi]
        return torch.from_numpy(out)
