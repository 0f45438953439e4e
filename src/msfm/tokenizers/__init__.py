"""Tokenizers: panel-aligned count rows -> model input tensors."""

from __future__ import annotations

from msfm.tokenizers.cell_sentence import (
    CellSentenceTokenizer,
    CellSentenceVocab,
    Sentences,
    bin_levels,
)
from msfm.tokenizers.gene_panel import (
    SCFOUNDATION_NUM_GENES,
    EncodedCells,
    ScFoundationTokenizer,
    TargetDepth,
    depth_tokens,
    normalize_rows,
)

__all__ = [
    "SCFOUNDATION_NUM_GENES",
    "CellSentenceTokenizer",
    "CellSentenceVocab",
    "EncodedCells",
    "ScFoundationTokenizer",
    "Sentences",
    "TargetDepth",
    "bin_levels",
    "depth_tokens",
    "normalize_rows",
]
