"""scMulan vocabulary and cell-sentence ("c-sentence") tokenizer.

A c-sentence is a sequence of *words* ``(token, level)``:

* gene words: a gene symbol and its expression level ``1..n_levels``, binned relative to the cell's own maximum;
* metadata words: the value itself is the token (``Heart``, ``T cell``, ``60 year``), with level 0;
* a task word (``<PCT>`` annotation, ``<SPToken1>`` generation, ``<SPToken3>`` organ/region), with level 0.

The official scMulan release (GitHub ``SuperBianC/scMulan``) builds annotation prompts as
``[expressed genes in reverse-alphabetical order] + [<PCT>]`` with levels from
``np.digitize(v, np.linspace(0, max, 11), right=True)``; this module reproduces those prompts exactly (see
``tests/fixtures/scmulan/README.md`` section 2.1) while working on sparse rows, in batches, and with clear errors.

Everything here is numpy/scipy; torch only appears in the padding helpers that produce model inputs. The
vocabulary (token table, task tokens, the official ids) is :mod:`msfm.tokenizers.cell_sentence_vocab`; its names
are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from msfm.errors import MsfmInputError
from msfm.tokenizers.cell_sentence_vocab import (
    ANNOTATE,
    END,
    GENERATE,
    NEXT_STATE,
    OFFICIAL_CATEGORY_KEYS,
    ORGAN_REGION,
    CellSentenceVocab,
    _is_missing,
    _is_task_token,
    _suggest,
)

__all__ = [
    "ANNOTATE",
    "END",
    "GENERATE",
    "NEXT_STATE",
    "OFFICIAL_CATEGORY_KEYS",
    "ORGAN_REGION",
    "CellSentenceTokenizer",
    "CellSentenceVocab",
    "Sentences",
    "bin_levels",
]

# ---------------------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sentences:
    """Variable-length c-sentences stored flat (CSR-like).

    Sentence ``i`` is ``ids[indptr[i]:indptr[i+1]]`` with levels ``levels[indptr[i]:indptr[i+1]]``.

    Shape:
        ids: ``[total]`` int64; levels: ``[total]`` int64; indptr: ``[n + 1]`` int64.
    """

    ids: np.ndarray
    levels: np.ndarray
    indptr: np.ndarray

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64).ravel()
        self.levels = np.asarray(self.levels, dtype=np.int64).ravel()
        self.indptr = np.asarray(self.indptr, dtype=np.int64).ravel()
        if (
            self.ids.shape != self.levels.shape
            or self.indptr.size == 0
            or self.indptr[0] != 0
            or self.indptr[-1] != self.ids.size
            or np.any(np.diff(self.indptr) < 0)
        ):
            msg = (
                f"Inconsistent Sentences: {self.ids.size} ids, {self.levels.size} levels, indptr from "
                f"{self.indptr[:1]} to {self.indptr[-1:]}; expected equal sizes and a non-decreasing indptr from 0 "
                "to the number of ids."
            )
            raise MsfmInputError(msg)

    def __len__(self) -> int:
        return self.indptr.size - 1

    def lengths(self) -> np.ndarray:
        """Length of each sentence.

        Shape:
            ``[n]`` int64.
        """
        return np.diff(self.indptr)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, levels)`` of sentence ``i`` (views)."""
        n = len(self)
        if not -n <= i < n:
            msg = f"Sentence index {i} is out of range for {n} sentences."
            raise MsfmInputError(msg)
        i %= n
        lo, hi = self.indptr[i], self.indptr[i + 1]
        return self.ids[lo:hi], self.levels[lo:hi]

    @classmethod
    def from_lists(cls, ids_list: Sequence[Sequence[int]], levels_list: Sequence[Sequence[int]]) -> Sentences:
        """Pack per-sentence id and level sequences."""
        if len(ids_list) != len(levels_list):
            msg = (
                f"Got {len(ids_list)} id sequences but {len(levels_list)} level sequences; they must pair up."
            )
            raise MsfmInputError(msg)
        ids = [np.asarray(a, dtype=np.int64).ravel() for a in ids_list]
        lv = [np.asarray(a, dtype=np.int64).ravel() for a in levels_list]
        for k, (a, b) in enumerate(zip(ids, lv, strict=True)):
            if a.size != b.size:
                msg = f"Sentence {k} has {a.size} ids but {b.size} levels."
                raise MsfmInputError(msg)
        indptr = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([a.size for a in ids], out=indptr[1:])
        empty = np.zeros(0, dtype=np.int64)
        return cls(np.concatenate([empty, *ids]), np.concatenate([empty, *lv]), indptr)

    @classmethod
    def repeat(cls, ids: Sequence[int], levels: Sequence[int], n: int) -> Sentences:
        """The same sentence ``n`` times."""
        ids_a = np.asarray(ids, dtype=np.int64).ravel()
        lv_a = np.asarray(levels, dtype=np.int64).ravel()
        return cls(np.tile(ids_a, n), np.tile(lv_a, n), np.arange(n + 1, dtype=np.int64) * ids_a.size)


def _concat_rows(parts: Sequence[Sentences]) -> Sentences:
    """Concatenate sentences position-wise: row i of the result is row i of every part, in order."""
    n = len(parts[0])
    lengths = np.zeros(n, dtype=np.int64)
    for p in parts:
        lengths += p.lengths()
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    ids = np.empty(indptr[-1], dtype=np.int64)
    levels = np.empty(indptr[-1], dtype=np.int64)
    offset = indptr[:-1].copy()  # where the next part starts inside each output row
    for p in parts:
        plen = p.lengths()
        within = np.arange(p.ids.size, dtype=np.int64) - np.repeat(p.indptr[:-1], plen)
        dest = np.repeat(offset, plen) + within
        ids[dest] = p.ids
        levels[dest] = p.levels
        offset += plen
    return Sentences(ids, levels, indptr)


# ---------------------------------------------------------------------------------------------------------------
# Binning
# ---------------------------------------------------------------------------------------------------------------


def bin_levels(values: np.ndarray, n_levels: int = 10) -> np.ndarray:
    """Per-cell relative binning of one cell's expressed values (the official scMulan rule).

    ``bins = np.linspace(0, max, n_levels + 1)`` in float64 and ``level = np.digitize(v, bins, right=True)``, so
    ``v`` in ``(bins[k-1], bins[k]]`` gets level ``k`` and the cell's maximum gets ``n_levels``. Values are cast
    to float64 first: numpy 1.x (the official pin) computes these bins in float64, numpy 2 would use float32.

    Args:
        values: the cell's expressed values, all > 0 (drop zeros before calling).
        n_levels: number of levels.

    Returns:
        Levels in ``1..n_levels``.

    Shape:
        values: ``[k]``; returns ``[k]`` int64.

    Example:
        >>> bin_levels(np.array([0.35, 1.2, 2.8, 3.1, 0.7])).tolist()
        [2, 4, 10, 10, 3]
    """
    v = np.asarray(values).astype(np.float64, copy=False).ravel()
    if v.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        msg = (
            "bin_levels() needs finite values > 0 (the expressed genes of one cell); got min "
            f"{np.nanmin(v) if not np.all(np.isnan(v)) else 'nan'} with NaN/inf={bool(np.any(~np.isfinite(v)))}. "
            "Drop zeros before binning."
        )
        raise MsfmInputError(msg)
    bins = np.linspace(0.0, v.max(), int(n_levels) + 1)
    return np.digitize(v, bins, right=True).astype(np.int64)


def _row_levels(values: np.ndarray, row_max: np.ndarray, n_levels: int) -> np.ndarray:
    """Vectorised :func:`bin_levels` for many cells at once, bit-identical to it.

    ``np.linspace(0, m, n+1)`` computes ``bins[j] = j * (m / n)`` (plus 0.0) with the last bin set to ``m``;
    ``digitize(right=True)`` counts the bins strictly below ``v``. ``bins[0] = 0 < v`` always counts and
    ``bins[n] = m >= v`` never does, so ``level = 1 + #{j in 1..n-1 : j * step < v}``.

    Shape:
        values: ``[nnz]`` (> 0); row_max: ``[nnz]`` (each entry's row maximum); returns ``[nnz]`` int64.
    """
    v = values.astype(np.float64, copy=False)
    step = row_max.astype(np.float64, copy=False) / n_levels
    level = np.ones(v.shape, dtype=np.int64)
    for j in range(1, n_levels):
        level += float(j) * step < v
    return level


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

GeneOrder = Literal["reverse", "forward", "random"]


class CellSentenceTokenizer:
    """Expression rows and metadata -> c-sentences -> padded model inputs, and generated sentences -> matrices.

    Args:
        vocab: the token table.
        n_levels: expression levels (official: 10; level 0 is for non-gene words).
        gene_order: ``"reverse"`` (official inference order: gene ids strictly decreasing), ``"forward"``
            (ascending ids) or ``"random"`` (a fresh permutation per cell, for training; needs ``rng``).
        max_genes: keep only the top ``max_genes`` genes of a cell by value (ties: lower gene id first);
            ``None`` keeps every expressed gene.
    """

    def __init__(
        self,
        vocab: CellSentenceVocab,
        *,
        n_levels: int = 10,
        gene_order: GeneOrder = "reverse",
        max_genes: int | None = None,
    ):
        if not isinstance(vocab, CellSentenceVocab):
            msg = f"vocab must be a CellSentenceVocab, got {type(vocab).__name__}. Use CellSentenceVocab.official()."
            raise MsfmInputError(msg)
        if isinstance(n_levels, bool) or not isinstance(n_levels, int | np.integer) or n_levels < 1:
            msg = f"n_levels={n_levels!r} is not valid; expected an integer >= 1 (official scMulan: 10)."
            raise MsfmInputError(msg)
        if gene_order not in ("reverse", "forward", "random"):
            msg = f"gene_order={gene_order!r} is not valid; expected 'reverse' (official), 'forward' or 'random'."
            raise MsfmInputError(msg)
        if max_genes is not None and (
            isinstance(max_genes, bool) or not isinstance(max_genes, int | np.integer) or max_genes < 1
        ):
            msg = f"max_genes={max_genes!r} is not valid; expected None (keep all) or an integer >= 1."
            raise MsfmInputError(msg)
        self.vocab = vocab
        self.n_levels = int(n_levels)
        self.gene_order: GeneOrder = gene_order
        self.max_genes = None if max_genes is None else int(max_genes)
        # Fast lookups for prompt building: category -> set of allowed values.
        self._allowed = {k: frozenset(v) for k, v in vocab.categories.items()}
        self._task_tokens = frozenset(t for t in vocab.tokens if _is_task_token(t))

    def __repr__(self) -> str:
        return (
            f"CellSentenceTokenizer({self.vocab!r}, n_levels={self.n_levels}, gene_order={self.gene_order!r}, "
            f"max_genes={self.max_genes})"
        )

    # -- expression -> gene words --------------------------------------------------------------------------------

    def _check_matrix(self, X: Any, what: str) -> sp.csr_matrix:
        """CSR in canonical form (sorted indices, no duplicates), validated; never densifies a sparse input."""
        if sp.issparse(X):
            csr = sp.csr_matrix(X)
        elif isinstance(X, np.ndarray) and X.ndim == 2:
            csr = sp.csr_matrix(X)
        else:
            msg = (
                f"{what} needs a 2-d scipy sparse matrix (or numpy array) of shape [n_cells, {len(self.vocab.genes)}]"
                f", got {type(X).__name__}. Pass adata.X after aligning its genes to vocab.genes."
            )
            raise MsfmInputError(msg)
        n_genes = len(self.vocab.genes)
        if csr.shape[1] != n_genes:
            msg = (
                f"{what} got {csr.shape[1]} gene columns, but the vocabulary has {n_genes} genes. Align the columns "
                "to vocab.genes first (e.g. msfm.data.harmonize_genes), filling absent genes with 0."
            )
            raise MsfmInputError(msg)
        if not csr.has_canonical_format:
            csr = csr.copy()  # never change the caller's matrix
            csr.sum_duplicates()
        data = csr.data
        if data.size and not np.issubdtype(data.dtype, np.number):
            msg = f"{what} got values of dtype {data.dtype}; expected a numeric (float) matrix."
            raise MsfmInputError(msg)
        bad = ~np.isfinite(data) | (data < 0)
        if np.any(bad):
            pos = int(np.argmax(bad))
            row = int(np.searchsorted(csr.indptr, pos, side="right") - 1)
            col = int(csr.indices[pos])
            msg = (
                f"{what}: cell (row) {row} has the value {float(data[pos])} for gene {self.vocab.genes[col]!r}. Expected "
                "finite values >= 0 (log1p-normalised expression); remove or fix NaN, inf and negative values."
            )
            raise MsfmInputError(msg)
        return csr

    @staticmethod
    def _expressed(csr: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row, column and value of every entry > 0 (explicit zeros dropped), in row-major order.

        Shape:
            three ``[nnz_positive]`` arrays (int64, int64, values' dtype).
        """
        keep = csr.data > 0
        rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))[keep]
        return rows, csr.indices[keep].astype(np.int64), csr.data[keep]

    def _levels_of(self, rows: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
        """Per-entry level with bins over each row's expressed values."""
        row_max = np.zeros(n_rows, dtype=np.float64)
        np.maximum.at(row_max, rows, values.astype(np.float64))
        return _row_levels(values, row_max[rows], self.n_levels)

    def gene_sentences(self, X: Any, *, rng: np.random.Generator | None = None) -> Sentences:
        """Gene words of each cell: expressed genes (> 0), their levels, in the configured order.

        Args:
            X: ``[n_cells, len(vocab.genes)]`` sparse (CSR preferred), columns in ``vocab.genes`` order, values
                already log1p-normalised (e.g. :func:`msfm.tokenizers.normalize_rows`). Never densified.
            rng: random generator, required for ``gene_order="random"``.

        Returns:
            One sentence per cell (empty for a cell with no expressed gene; the caller decides what to do).

        Raises:
            MsfmInputError: wrong shape, NaN/inf/negative values (naming the first bad row), missing ``rng``.

        Shape:
            X: ``[n, G]``; result: ``n`` sentences.
        """
        csr = self._check_matrix(X, "gene_sentences()")
        if self.gene_order == "random" and rng is None:
            msg = "gene_order='random' needs a random generator: call gene_sentences(X, rng=np.random.default_rng(seed))."
            raise MsfmInputError(msg)
        n = csr.shape[0]
        rows, cols, vals = self._expressed(csr)
        levels = self._levels_of(rows, vals, n)

        if self.max_genes is not None:
            # Rank inside each row by value (descending), ties by lower column (= lower gene id).
            order = np.lexsort((cols, -vals.astype(np.float64), rows))
            counts = np.bincount(rows, minlength=n)
            starts = np.repeat(np.cumsum(counts) - counts, counts)
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size) - starts
            keep = rank < self.max_genes
            rows, cols, levels = rows[keep], cols[keep], levels[keep]

        # Entries are row-major with ascending columns; only the order inside each row changes.
        if self.gene_order == "reverse":
            order = np.lexsort((-cols, rows))
        elif self.gene_order == "random":
            assert rng is not None
            order = np.lexsort((rng.random(cols.size), rows))
        else:
            order = np.arange(cols.size)
        rows, cols, levels = rows[order], cols[order], levels[order]

        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return Sentences(self.vocab.gene_ids[cols], levels, indptr)

    # -- prompts -------------------------------------------------------------------------------------------------

    def _meta_words(self, meta: Mapping[str, Any], cell: int | None) -> list[int]:
        where = "" if cell is None else f" (cell {cell})"
        if not isinstance(meta, Mapping):
            msg = (
                f"Metadata{where} must be a mapping such as {{'organ': 'Heart'}}, got {type(meta).__name__}."
            )
            raise MsfmInputError(msg)
        ids: list[int] = []
        for key, value in meta.items():
            if key not in self._allowed:
                self.vocab._category(str(key))  # raises with the list of categories
            if _is_missing(value) or value == CellSentenceVocab.UNCLASSIFIED:
                continue
            if not isinstance(value, str):
                msg = (
                    f"Metadata value {value!r} for category {key!r}{where} is a {type(value).__name__}; expected a "
                    f"token string such as those in vocab.categories[{key!r}]."
                )
                raise MsfmInputError(msg)
            if value not in self._allowed[key]:
                allowed = self.vocab.categories[key]
                shown = ", ".join(repr(a) for a in allowed[:20]) + (" ..." if len(allowed) > 20 else "")
                msg = (
                    f"Metadata value {value!r} for category {key!r}{where} is not in the vocabulary. Allowed values "
                    f"({len(allowed)}): {shown}.{_suggest(value, allowed)} Map your labels onto these tokens, or "
                    "drop the key (or use 'Unclassified') to leave it out of the prompt."
                )
                raise MsfmInputError(msg)
            ids.append(self.vocab.id(value))
        return ids

    def _prefix_words(self, prefix: Sequence[tuple[str, int]], cell: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        levels: list[int] = []
        for word in prefix:
            if isinstance(word, str) or not isinstance(word, Sequence) or len(word) != 2:
                msg = f"answer_prefix of cell {cell} must hold (token, level) pairs such as ('SPI1', 8); got {word!r}."
                raise MsfmInputError(msg)
            token, level = word
            if (
                isinstance(level, bool)
                or not isinstance(level, int | np.integer)
                or not 0 <= level <= self.n_levels
            ):
                msg = (
                    f"answer_prefix of cell {cell}: level {level!r} for {token!r} is not valid; expected an integer "
                    f"in 0..{self.n_levels}."
                )
                raise MsfmInputError(msg)
            ids.append(self.vocab.id(token))
            levels.append(int(level))
        return ids, levels

    def prompts(
        self,
        genes: Sentences | None,
        *,
        meta: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
        task: str,
        answer_prefix: Sequence[Sequence[tuple[str, int]]] | None = None,
    ) -> Sentences:
        """Model inputs: ``[meta words, gene words, task token, answer-prefix words]`` per cell.

        Meta and task words have level 0. Answer-prefix words come after the task token, as if already generated
        (in-silico perturbation: ``[Bone marrow, Haematopoietic stem cell, <SPToken1>, SPI1@8]``).

        Args:
            genes: gene sentences from :meth:`gene_sentences`, or ``None`` for a metadata-only prompt.
            meta: one mapping for all cells or one per cell, ``category -> value token``; words follow the
                mapping's order. ``None``, NaN and ``'Unclassified'`` values are left out.
            task: the task token, e.g. :data:`ANNOTATE`, :data:`GENERATE`, :data:`ORGAN_REGION`.
            answer_prefix: per cell, ``(token, level)`` pairs with levels in ``0..n_levels``.

        Returns:
            One sentence per cell. The number of cells comes from ``genes``, a per-cell ``meta`` or
            ``answer_prefix`` (which must agree), else 1.

        Raises:
            MsfmInputError: unknown task, category or value (with the allowed values and close matches),
                mismatched numbers of cells, bad answer-prefix words.
        """
        if not isinstance(task, str) or task not in self._task_tokens:
            got = task if isinstance(task, str) else type(task).__name__
            msg = (
                f"task={got!r} is not a task token of this vocabulary. Use ANNOTATE ('<PCT>'), GENERATE "
                f"('<SPToken1>'), ORGAN_REGION ('<SPToken3>') or NEXT_STATE ('<SPToken2>')."
                f"{_suggest(got, self._task_tokens) if isinstance(task, str) else ''}"
            )
            raise MsfmInputError(msg)
        if genes is not None and not isinstance(genes, Sentences):
            msg = f"genes must be Sentences (from gene_sentences()) or None, got {type(genes).__name__}."
            raise MsfmInputError(msg)
        if meta is not None and not isinstance(meta, Mapping) and not isinstance(meta, Sequence):
            msg = (
                f"meta must be a mapping (same for all cells) or a list of mappings (one per cell), got "
                f"{type(meta).__name__}. For a DataFrame pass df.to_dict('records')."
            )
            raise MsfmInputError(msg)

        sizes: dict[str, int] = {}
        if genes is not None:
            sizes["genes"] = len(genes)
        if meta is not None and not isinstance(meta, Mapping):
            sizes["meta"] = len(meta)
        if answer_prefix is not None:
            sizes["answer_prefix"] = len(answer_prefix)
        if len(set(sizes.values())) > 1:
            msg = f"prompts() got different numbers of cells: {sizes}. Give one entry per cell in each."
            raise MsfmInputError(msg)
        n = next(iter(sizes.values())) if sizes else 1

        parts: list[Sentences] = []
        if isinstance(meta, Mapping):
            ids = self._meta_words(meta, None)
            parts.append(Sentences.repeat(ids, [0] * len(ids), n))
        elif meta is not None:
            meta_ids = [self._meta_words(m, i) for i, m in enumerate(meta)]
            parts.append(Sentences.from_lists(meta_ids, [[0] * len(m) for m in meta_ids]))
        if genes is not None:
            parts.append(genes)
        parts.append(Sentences.repeat([self.vocab.id(task)], [0], n))
        if answer_prefix is not None:
            words = [self._prefix_words(p, i) for i, p in enumerate(answer_prefix)]
            parts.append(Sentences.from_lists([w[0] for w in words], [w[1] for w in words]))
        return _concat_rows(parts)

    # -- padding -------------------------------------------------------------------------------------------------

    def _pad(
        self, sentences: Sentences, idx: Sequence[int] | None, pad_id: int, *, left: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sel = np.arange(len(sentences)) if idx is None else np.asarray(idx, dtype=np.int64).ravel()
        if sel.size and (sel.min() < -len(sentences) or sel.max() >= len(sentences)):
            msg = f"Sentence indices {sel.tolist()[:10]} are out of range for {len(sentences)} sentences."
            raise MsfmInputError(msg)
        sel = sel % max(len(sentences), 1)  # negative indices; never modify the caller's array
        starts = sentences.indptr[sel]
        lengths = sentences.indptr[sel + 1] - starts
        b, t = sel.size, int(lengths.max()) if sel.size else 0
        ids = np.full((b, t), pad_id, dtype=np.int64)
        levels = np.zeros((b, t), dtype=np.int64)
        mask = np.zeros((b, t), dtype=bool)
        if t:
            pos = np.arange(t)[None, :]
            if left:
                mask = pos >= (t - lengths)[:, None]
                src = starts[:, None] + pos - (t - lengths)[:, None]
            else:
                mask = pos < lengths[:, None]
                src = starts[:, None] + pos
            ids[mask] = sentences.ids[src[mask]]
            levels[mask] = sentences.levels[src[mask]]
        return torch.from_numpy(ids), torch.from_numpy(levels), torch.from_numpy(mask)

    def left_pad(
        self, sentences: Sentences, idx: Sequence[int] | None = None, *, pad_id: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch of sentences, padded at the start (for generation: every prompt ends at the last position).

        scMulan has no position embeddings, so left padding plus a key-padding mask changes nothing for the real
        tokens.

        Args:
            sentences: the sentences.
            idx: which ones (default all), in that order.
            pad_id: id written into padding positions (level 0 there).

        Returns:
            ``(ids, levels, attention_mask)``; the mask is True on real tokens.

        Shape:
            each ``[b, t]`` with ``t`` the longest selected sentence; int64, int64, bool.
        """
        return self._pad(sentences, idx, pad_id, left=True)

    def right_pad(
        self, sentences: Sentences, idx: Sequence[int] | None = None, *, pad_id: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`left_pad` but padded at the end (for training).

        Shape:
            each ``[b, t]``; int64, int64, bool.
        """
        return self._pad(sentences, idx, pad_id, left=False)

    # -- back to matrices ----------------------------------------------------------------------------------------

    def sentences_to_matrix(
        self, ids_list: Sequence[np.ndarray], levels_list: Sequence[np.ndarray]
    ) -> sp.csr_matrix:
        """Generated gene words -> expression rows of ``level / n_levels``.

        Non-gene tokens (metadata, task, ``<E>``, padding) are ignored; a gene that occurs twice keeps its LAST
        level; absent genes are 0.

        Shape:
            ``n`` sentences -> ``[n, len(vocab.genes)]`` float32 CSR.
        """
        sent = Sentences.from_lists(
            [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a for a in ids_list],
            [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a for a in levels_list],
        )
        n = len(sent)
        rows = np.repeat(np.arange(n, dtype=np.int64), sent.lengths())
        keep = self.vocab.is_gene(sent.ids)
        rows, ids, levels = rows[keep], sent.ids[keep], sent.levels[keep]
        bad = (levels < 0) | (levels > self.n_levels)
        if np.any(bad):
            pos = int(np.argmax(bad))
            msg = (
                f"Sentence {int(rows[pos])} gives gene {self.vocab.tokens[ids[pos]]!r} the level {int(levels[pos])}; "
                f"expected 0..{self.n_levels}."
            )
            raise MsfmInputError(msg)
        cols = np.searchsorted(self.vocab.gene_ids, ids)
        # Last occurrence wins: sort by (row, col, position descending) and keep the first of each (row, col).
        position = np.arange(ids.size)
        order = np.lexsort((-position, cols, rows))
        rows, cols, levels = rows[order], cols[order], levels[order]
        first = np.ones(rows.size, dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        rows, cols, levels = rows[first], cols[first], levels[first]
        values = (levels / self.n_levels).astype(np.float32)
        out = sp.csr_matrix((values, (rows, cols)), shape=(n, len(self.vocab.genes)), dtype=np.float32)
        out.eliminate_zeros()  # a generated level 0 means "not expressed"
        return out

    def binned_matrix(self, X: Any) -> sp.csr_matrix:
        """Real cells in the space of generated ones: ``level / n_levels`` of each expressed gene, per cell.

        Shape:
            ``[n, G]`` -> ``[n, G]`` float32 CSR.
        """
        csr = self._check_matrix(X, "binned_matrix()")
        n = csr.shape[0]
        rows, cols, vals = self._expressed(csr)
        levels = self._levels_of(rows, vals, n)
        values = (levels / self.n_levels).astype(np.float32)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return sp.csr_matrix((values, cols, indptr), shape=csr.shape)
