"""The input and output steps every scFoundation verb shares: reading options, the input file, the output file."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msfm.data import CellReadOptions

__all__ = ["h5ad_file", "parse_read_options"]


def parse_read_options(verb: Callable[..., Any], read_options: dict[str, Any]) -> CellReadOptions:
    """The verb's ``**read_options`` as :class:`CellReadOptions` (a misspelt keyword gets "did you mean")."""
    return CellReadOptions.parse(read_options, verb_parameters=inspect.signature(verb).parameters)


def h5ad_file(data: Any) -> Path | None:
    """``data`` as a path when it names an ``.h5ad`` file (which can be streamed backed), else None."""
    if isinstance(data, str | os.PathLike) and Path(data).suffix == ".h5ad":
        return Path(data)
    return None
