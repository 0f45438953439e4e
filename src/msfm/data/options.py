"""How a verb reads its data: one typed options object for cells and one for spatial data, documented once.

Every verb of every family takes these as keyword arguments (``**read_options``)::

    msfm.scfoundation.embed(adata, ckpt, layer="raw", gene_column="gene_ids")
    msfm.gest.embed(adata, ckpt, pre_normalized=True, scale=0.5)

and the CLI offers them as the same options on every command (``--layer``, ``--gene-column``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from msfm.errors import MsfmInputError
from msfm.runtime.kwargs import did_you_mean

__all__ = ["CellReadOptions", "SpatialReadOptions"]


class CellReadOptions(BaseModel):
    """Which matrix of an AnnData to read and how its genes map onto a model's genes.

    Attributes:
        layer: matrix to read; default ``layers["counts"]`` when present, else ``X`` if it holds non-negative
            integers.
        pre_normalized: the matrix already holds log1p-normalised values (normalised over all of each cell's
            genes); they are used as they are, with a warning. Values above 20 (TPM, CPM, counts) or integer-only
            values are refused.
        gene_column: ``var`` column holding gene symbols or Ensembl IDs (default: ``var_names``).
        species: ``"mouse"`` maps mouse genes onto the human genes through orthologs.
        use_aliases: map previous and alias symbols onto current ones.
        min_panel_fraction: fewer of the model's genes found than this fraction is an error.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str | None = None
    pre_normalized: bool = False
    gene_column: str | None = None
    species: Literal["human", "mouse"] = "human"
    use_aliases: bool = True
    min_panel_fraction: float = Field(0.01, ge=0.0, le=1.0)

    @classmethod
    def parse(cls, options: Mapping[str, Any], *, verb_parameters: Iterable[str] = ()) -> CellReadOptions:
        """Validate keyword arguments a verb did not recognise as its own.

        Args:
            options: the keyword arguments (``**read_options`` of a verb).
            verb_parameters: the verb's own parameter names, offered as suggestions for a misspelt key.

        Raises:
            MsfmInputError: an unknown key (with the closest names) or an invalid value.
        """
        known = set(cls.model_fields)
        unknown = [k for k in options if k not in known]
        if unknown:
            own = (
                f"Its own keywords are: {', '.join(sorted(set(verb_parameters)))}; r"
                if verb_parameters
                else "R"
            )
            msg = (
                f"Unknown keyword argument(s) {did_you_mean(unknown, known | set(verb_parameters))}. {own}eading options are: "
                f"{', '.join(sorted(known))} (see msfm.data.{cls.__name__})."
            )
            raise MsfmInputError(msg)
        try:
            return cls(**options)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = f"Invalid reading option {where}={first.get('input')!r}: {first.get('msg')}."
            raise MsfmInputError(msg) from err


class SpatialReadOptions(CellReadOptions):
    """:class:`CellReadOptions` plus where the coordinates are and what their unit is.

    Attributes:
        spatial_key: ``obsm`` key of the coordinates.
        scale: µm per coordinate unit (default: ``uns["msfm_spatial"]["um_per_unit"]``, else for scanpy-style
            Visium pixels ``65 / spot_diameter_fullres`` with a warning, else 1). Coordinates whose neighbour
            spacing cannot be µm (mm, nm) are refused with the likely scale.
        section_key: ``obs`` column naming the section (slide) of each cell.
        duplicates: cells at identical coordinates: ``"error"``, ``"keep"`` or ``"jitter"`` (seeded sub-micron).
        min_panel_fraction: here 0.5: a spatial model needs most of its genes.
    """

    spatial_key: str = "spatial"
    scale: float | None = Field(None, gt=0.0)
    section_key: str | None = None
    duplicates: Literal["error", "keep", "jitter"] = "error"
    min_panel_fraction: float = Field(0.5, ge=0.0, le=1.0)
