"""Single-cell input layer: readers, the count contract, gene harmonisation, samplers and writers.

See ``docs/architecture.md`` ("Single-cell input contract").
"""

from __future__ import annotations

from msfm.data.genes import GeneMapping, GenePanel, harmonize_genes
from msfm.data.prepare import prepare_cells
from msfm.data.readers import SUPPORTED_FORMATS, read, read_many
from msfm.data.samplers import BlockShuffleSampler, LengthBucketBatchSampler
from msfm.data.source import CellChunk, CellSource
from msfm.data.writers import write_h5ad_streaming

__all__ = [
    "SUPPORTED_FORMATS",
    "BlockShuffleSampler",
    "CellChunk",
    "CellSource",
    "GeneMapping",
    "GenePanel",
    "LengthBucketBatchSampler",
    "harmonize_genes",
    "prepare_cells",
    "read",
    "read_many",
    "write_h5ad_streaming",
]
