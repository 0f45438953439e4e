"""The cells of the scFoundation official fixture as an AnnData (shared by the tests; ``pythonpath`` has tests/)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import scipy.sparse as sp
from safetensors import safe_open
from safetensors.numpy import load_file

IO_FILE = Path(__file__).parent / "fixtures" / "scfoundation" / "tiny_official_io.safetensors"


def official_cells() -> ad.AnnData:
    """The raw counts the official code embedded (cells x source genes, official cell ids and gene symbols)."""
    with safe_open(IO_FILE, "np") as f:
        meta = f.metadata()
    a = ad.AnnData(X=sp.csr_matrix(load_file(IO_FILE)["source_counts"]))
    a.var_names = json.loads(meta["source_gene_symbols"])
    a.obs_names = json.loads(meta["cell_ids"])
    return a


def official_cells_h5ad(folder: Path) -> Path:
    """:func:`official_cells` written to ``folder/cells.h5ad``."""
    path = folder / "cells.h5ad"
    official_cells().write_h5ad(path)
    return path
