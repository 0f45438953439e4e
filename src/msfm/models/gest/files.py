"""What GeST verbs read and write: the data argument (AnnData, file or Visium folder) and their outputs.

Outputs are checked and written with :func:`msfm.runtime.h5ad.check_output` and
:func:`msfm.runtime.h5ad.write_output`, as in every family.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anndata import AnnData

from msfm.data.spatial import as_spatial_anndata

__all__ = ["DataLike", "input_path", "read_data"]

#: What every GeST verb accepts as ``data``: an AnnData, a file msfm reads, or a Visium ``outs`` folder.
DataLike = AnnData | str | os.PathLike[str]


def input_path(data: Any) -> Path | None:
    """The path ``data`` was given as (None for an AnnData in memory)."""
    return None if isinstance(data, AnnData) else Path(data)


def read_data(data: DataLike, *, copy: bool = False) -> AnnData:
    """The AnnData to work on (see :func:`msfm.data.spatial.as_spatial_anndata`)."""
    return as_spatial_anndata(data, copy=copy)
