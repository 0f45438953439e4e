"""Tokenizers: panel-aligned count rows -> model input tensors; spatial windows -> GeST cell sequences."""

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
from msfm.tokenizers.spatial import (
    MetaCellVocab,
    Window,
    WindowSampler,
    normalize_positions,
    serialize,
    tile_windows,
    window_cells,
)

__all__ = [
    "SCFOUNDATION_NUM_GENES",
    "CellSentenceTokenizer",
    "CellSentenceVocab",
    "EncodedCells",
    "MetaCellVocab",
    "ScFoundationTokenizer",
    "Sentences",
    "TargetDepth",
    "Window",
    "WindowSampler",
    "bin_levels",
    "depth_tokens",
    "normalize_positions",
    "normalize_rows",
    "serialize",
    "tile_windows",
    "window_cells",
]
