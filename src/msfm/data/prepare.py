"""One entry point for model APIs: validate an AnnData's counts and map its genes onto a model's panel."""

from __future__ import annotations

from typing import Any

from anndata import AnnData

from msfm.data.genes import GeneMapping, GenePanel, harmonize_genes
from msfm.data.options import CellReadOptions
from msfm.data.source import CellSource
from msfm.errors import MsfmInputError

__all__ = ["prepare_cells"]


def prepare_cells(
    adata: AnnData,
    panel: GenePanel,
    options: CellReadOptions | None = None,
    **read_options: Any,
) -> tuple[CellSource, GeneMapping]:
    """Row access to the count matrix (validated under the count contract) and the gene mapping onto ``panel``.

    Args:
        adata: cells x genes (in memory or backed).
        panel: the model's genes.
        options: how to read ``adata``; or give the fields as keyword arguments (:class:`CellReadOptions`).

    Raises:
        MsfmInputError: for something other than an AnnData, an unusable matrix, or too few panel genes
            (``harmonize_genes`` raises below ``min_panel_fraction`` of the panel).
    """
    if options is None:
        options = CellReadOptions.parse(read_options)
    elif read_options:
        options = options.model_copy(
            update=dict(CellReadOptions.parse(read_options).model_dump(exclude_unset=True))
        )
    if not isinstance(adata, AnnData):
        msg = f"Expected an AnnData (cells x genes), got {type(adata).__name__}. Read files with msfm.data.read()."
        raise MsfmInputError(msg)
    source = CellSource(adata, layer=options.layer, pre_normalized=options.pre_normalized)
    mapping = harmonize_genes(
        adata.var,
        panel,
        gene_column=options.gene_column,
        species=options.species,
        use_aliases=options.use_aliases,
        min_panel_fraction=options.min_panel_fraction,
        # a stricter minimum moves the warning threshold with it (the minimum may not exceed it)
        warn_panel_fraction=max(0.5, options.min_panel_fraction),
    )
    return source, mapping
