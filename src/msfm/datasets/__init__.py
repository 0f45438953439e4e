"""Offline datasets (no downloads): real single-cell data read from files that installed packages ship.

Example:
    >>> import msfm
    >>> adata = msfm.datasets.pbmc68k()          # 700 PBMCs x 765 genes, raw counts, 10 cell types
    >>> kang = msfm.datasets.kang_pbmc()       # doctest: +SKIP  # 13,999 PBMCs, control vs IFN-beta stimulated
    >>> msfm.datasets.list_datasets()["pbmc68k"]["licence"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from msfm.datasets.constructed_drugs import constructed_drug_response, constructed_sensitivity
from msfm.datasets.kang import kang_pbmc
from msfm.datasets.pbmc import pbmc68k, pbmc68k_resampled, write_backed_h5ad
from msfm.datasets.spatial import scc_st, semi_real_tissue, visium_demo

__all__ = [
    "constructed_drug_response",
    "constructed_sensitivity",
    "kang_pbmc",
    "list_datasets",
    "pbmc68k",
    "pbmc68k_resampled",
    "scc_st",
    "semi_real_tissue",
    "visium_demo",
    "write_backed_h5ad",
]


def list_datasets() -> dict[str, dict[str, Any]]:
    """The datasets msfm provides, with shape, labels, provenance and licence (nothing is read or downloaded).

    Returns:
        ``{name: info}``; ``info`` holds ``function``, ``description``, ``shape``, ``counts``, ``labels``,
        ``source``, ``licence``, ``citation`` and ``derived``.
    """
    from msfm.datasets import pbmc
    from msfm.datasets.constructed_drugs import constructed_info
    from msfm.datasets.histology import histology_info
    from msfm.datasets.kang import kang_info
    from msfm.datasets.spatial import spatial_info

    return {
        "pbmc68k": {
            "function": "msfm.datasets.pbmc68k()",
            "description": "PBMCs from 10x 'Fresh 68k PBMCs (Donor A)', subset shipped by scanpy",
            "shape": (700, 765),
            "counts": "raw UMI counts, recovered exactly from scanpy's log-normalised raw.X and n_counts",
            "labels": "obs['cell_type'] (10 bulk_labels), obs['louvain'] (11 clusters)",
            "source": f"scanpy package data: scanpy/{pbmc._PBMC_FILE} (sha256 {pbmc._PBMC_SHA256_PREFIX}...)",
            "licence": pbmc._LICENCE,
            "citation": pbmc._CITATION,
            "derived": False,
        },
        "pbmc68k_resampled": {
            "function": "msfm.datasets.pbmc68k_resampled(n_cells, seed); msfm.datasets.write_backed_h5ad(path, n_cells)",
            "description": "scale-test data: pbmc68k cells resampled with replacement, counts binomially thinned",
            "shape": ("n_cells", 765),
            "counts": "integer counts (thinned copies of real cells)",
            "labels": "obs['cell_type'] of the source cell",
            "source": "derived from pbmc68k",
            "licence": pbmc._LICENCE,
            "citation": pbmc._CITATION,
            "derived": True,
        },
        **kang_info(),
        **constructed_info(),
        **histology_info(),
        **spatial_info(),
    }
