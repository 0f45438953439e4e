"""One entry point for model APIs: validate an AnnData's counts and map its genes onto a model's panel."""

from __future__ import annotations

from typing import Literal

from anndata import AnnData

from msfm.data.genes import GeneMapping, GenePanel, harmonize_genes
from msfm.data.source import CellSource
from msfm.errors import MsfmInputError

__all__ = ["prepare_cells"]


def prepare_cells(
    adata: AnnData,
    panel: GenePanel,
    *,
    layer: str | None = None,
    pre_normalized: bool = False,
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
) -> tuple[CellSource, GeneMapping]:
    """Row access to the count matrix (validated under the count contract) and the gene mapping onto ``panel``.

    Raises:
        MsfmInputError: for something other than an AnnData, an unusable matrix, or too few panel genes
            (``harmonize_genes`` raises below ``min_panel_fraction`` of the panel).
    """
    if not isinstance(adata, AnnData):
        msg = f"Expected an AnnData (cells x genes), got {type(adata).__name__}. Read files with msfm.data.read()."
        raise MsfmInputError(msg)
    source = CellSource(adata, layer=layer, pre_normalized=pre_normalized)
    mapping = harmonize_genes(
        adata.var,
        panel,
        gene_column=gene_column,
        species=species,
        use_aliases=use_aliases,
        min_panel_fraction=min_panel_fraction,
    )
    return source, mapping
