"""Single-cell input layer: readers, the count contract, gene harmonisation, samplers and writers.

See ``docs/architecture.md`` ("Single-cell input contract").
"""

from __future__ import annotations

from msfm.data.genes import GeneMapping, GenePanel, harmonize_genes
from msfm.data.normalize import log1p_cp10k, normalized_rows
from msfm.data.options import CellReadOptions, SpatialReadOptions
from msfm.data.prepare import prepare_cells
from msfm.data.readers import SUPPORTED_FORMATS, as_anndata, read, read_many
from msfm.data.samplers import BlockShuffleSampler, LengthBucketBatchSampler
from msfm.data.source import CellChunk, CellSource
from msfm.data.writers import write_h5ad_streaming

__all__ = [
    "SUPPORTED_FORMATS",
    "BlockShuffleSampler",
    "CellChunk",
    "CellReadOptions",
    "CellSource",
    "GeneMapping",
    "GenePanel",
    "LengthBucketBatchSampler",
    "SpatialReadOptions",
    "as_anndata",
    "harmonize_genes",
    "log1p_cp10k",
    "normalized_rows",
    "prepare_cells",
    "read",
    "read_many",
    "write_h5ad_streaming",
]
