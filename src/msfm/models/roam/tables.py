"""Slide tables: reading CSV/TSV tables as text, slide-id lists, label cells and label maps.

Every ROAM verb that takes slides (``predict``, ``cascade``, ``heatmap``, ``train``, ``evaluate``) reads them here,
and every slide id goes through :func:`msfm.data.slide_ids.check_slide_id` (ids name files under the output and
feature folders).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msfm.data.slide_ids import check_slide_ids
from msfm.errors import MsfmInputError

__all__ = [
    "SLIDE_ID",
    "as_table",
    "parse_label_map",
    "prob_column",
    "read_table",
    "slide_ids_from",
    "value_text",
]

SLIDE_ID = "slide_id"


def prob_column(class_name: str, prefix: str = "") -> str:
    """Name of the probability column of a class (``prob_<class>``, or ``<prefix>_prob_<class>``)."""
    return f"{prefix}_prob_{class_name}" if prefix else f"prob_{class_name}"


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV/TSV slide table with every value as a string (empty cells -> NaN), so ``1`` stays ``"1"``.

    Raises:
        MsfmInputError: If the file does not exist or cannot be parsed.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Table {path} does not exist."
        raise MsfmInputError(msg)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        msg = f"Cannot read the table {path}: {err}. Expected a CSV with a header row."
        raise MsfmInputError(msg) from err


def as_table(table: Any, what: str = "table") -> pd.DataFrame:
    """A copy of a DataFrame, the ``table`` of a result (``predict``/``cascade``), or a CSV/TSV read as text.

    Raises:
        MsfmInputError: anything else, or an unreadable file.
    """
    if isinstance(getattr(table, "table", None), pd.DataFrame):
        table = table.table
    if isinstance(table, pd.DataFrame):
        return table.copy()
    if isinstance(table, str | os.PathLike):
        return read_table(table)
    msg = f"The {what} must be a DataFrame or a CSV/TSV path; got {type(table).__name__}."
    raise MsfmInputError(msg)


def slide_ids_from(slides: Any, *, column: str = SLIDE_ID) -> list[str]:
    """Slide ids from a list, a DataFrame (``slide_id`` column) or a CSV path.

    Raises:
        MsfmInputError: If the table has no such column, the CSV does not exist, an id is invalid, or ids repeat.
    """
    if isinstance(slides, str | os.PathLike):
        slides = read_table(slides)
    if isinstance(slides, pd.DataFrame):
        if column not in slides.columns:
            msg = f"The slide table has no {column!r} column; its columns are {list(slides.columns)[:20]}."
            raise MsfmInputError(msg)
        ids = check_slide_ids(slides[column].tolist(), f"column {column!r}")
    else:
        ids = check_slide_ids(slides)
    dup = sorted(s for s, n in Counter(ids).items() if n > 1)
    if dup:
        msg = f"Slide ids repeat: {dup[:10]}. Each slide must appear once."
        raise MsfmInputError(msg)
    return ids


def value_text(value: Any) -> str | None:
    """A table cell as label text: None for empty/NaN, integral floats without '.0' (pandas int columns with gaps)."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    text = str(value).strip()
    return text or None


def parse_label_map(text: str | Mapping[str, Any] | None) -> dict[str, str] | None:
    """``"0=normal,1=gliosis,2=tumour,3=tumour"`` (raw value = class name) or a mapping -> ``{raw: class}``.

    Raises:
        MsfmInputError: On a part without ``=``.
    """
    if text is None:
        return None
    if isinstance(text, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in text.items()}
    out: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if "=" not in part:
            msg = f"label map {text!r}: expected VALUE=CLASS pairs separated by commas, e.g. '2=tumour,3=tumour'."
            raise MsfmInputError(msg)
        raw, name = (s.strip() for s in part.split("=", 1))
        out[raw] = name
    return out
