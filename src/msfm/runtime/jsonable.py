"""Plain values for JSON files and for ``adata.uns``: the one sanitiser of reports, records and attributes.

Two targets differ only in what they refuse: strict JSON has no NaN (it becomes ``None``); an h5ad ``uns`` has no
``None`` and no mixed lists (``None`` becomes ``""``, a mixed list becomes a ``{"0": ..., "1": ...}`` mapping).
Both turn numpy scalars and arrays, paths, tuples, sets, bytes and pydantic models into plain Python values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["to_jsonable", "to_uns"]


def _common(value: Any) -> tuple[bool, Any]:
    """``(done, value)`` for the conversions both targets share."""
    if hasattr(value, "model_dump"):
        return False, value.model_dump(mode="json")
    if isinstance(value, np.ndarray):
        return False, value.tolist()
    if isinstance(value, np.generic):
        return False, value.item()
    if isinstance(value, bytes):
        return True, value.decode("utf-8", errors="replace")
    if isinstance(value, os.PathLike):
        return True, os.fspath(value)
    return False, value


def to_jsonable(value: Any) -> Any:
    """Strict-JSON values: mappings with string keys, lists, str, int, float (finite), bool and None.

    NaN and infinities become ``None``; tuples and sets become lists; anything else unknown becomes its ``str``.
    """
    done, value = _common(value)
    if done:
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | range):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def to_uns(value: Any) -> Any:
    """Values ``anndata`` can write into ``uns``: no None, homogeneous lists, plain scalars.

    ``None`` becomes ``""``; a list of strings or of numbers stays a list; a mixed list becomes a mapping keyed by
    position; anything else unknown becomes its ``str``.
    """
    done, value = _common(value)
    if done:
        return value
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return {str(k): to_uns(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | range):
        items = [to_uns(v) for v in value]
        if all(isinstance(v, str) for v in items):
            return items
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in items) or all(
            isinstance(v, bool) for v in items
        ):
            return items
        return {str(i): v for i, v in enumerate(items)}
    if isinstance(value, str | int | float | bool):
        return value
    return str(value)
