"""What travels with scFoundation results: the preprocessing record of a checkpoint and the ``uns`` record of a verb."""

from __future__ import annotations

from typing import Any

from msfm.data import GeneMapping
from msfm.runtime.loaded import Loaded
from msfm.runtime.precision import PrecisionChoice

__all__ = ["preprocessing_record", "uns_record"]


def preprocessing_record(pre_normalized: bool = False, panel_name: str = "scfoundation") -> dict[str, Any]:
    """How inputs are turned into model values; saved with every checkpoint."""
    return {
        "counts": "raw counts; layers['counts'] else integer X",
        "normalization": "log1p(count / total * 1e4), float64 then float32"
        if not pre_normalized
        else "as given",
        "target_sum": 1e4,
        "log1p": True,
        "depth_tokens": {"S": "log10(total counts on the panel)", "T": "tN | aY (S+Y) | fX (log10(total*X))"},
        "gene_panel": f"{panel_name} (input genes always re-indexed onto the panel; genes.txt)",
    }


def uns_record(
    loaded: Loaded,
    mapping: GeneMapping,
    kind: str,
    params: dict[str, Any],
    precision: PrecisionChoice | None = None,
) -> dict[str, Any]:
    """``uns[key_added][verb]``: parameters, input kind (``counts``/``normalized``), checkpoint, gene mapping, and
    the precision that ran (``{"requested", "chosen", "reason"}``, see :func:`msfm.runtime.precision.resolve_precision`).
    """
    record = {
        "params": params,
        "input": {"kind": kind},
        "checkpoint": {
            "path": loaded.path,
            "msfm_version": loaded.meta.get("msfm_version"),
            "source": loaded.extra.get("source"),
        },
        "gene_mapping": mapping.to_uns(),
    }
    if precision is not None:
        record["precision"] = precision.record()
    return record
