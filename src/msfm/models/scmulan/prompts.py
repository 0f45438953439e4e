"""Metadata prompts of generation and perturbation: what a user may pass, turned into one dict per prompt.

A prompt maps vocabulary categories to values, e.g. ``{"organ": "Blood", "cell_type": "T cell", "sex": "M"}``.
Prompts may be given as

* a mapping, or a list of mappings;
* a text ``"organ=Blood,cell_type=T cell"`` (``;`` separates pairs when a value holds a comma);
* a DataFrame with one column per category (one row per prompt; NaN or empty = leave the category out);
* an AnnData whose ``obs`` columns are the categories;
* the path of a ``.csv`` / ``.tsv`` table (as the DataFrame) or of an ``.h5ad`` (as the AnnData);
* a list mixing texts, mappings and table paths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.errors import MsfmInputError

__all__ = ["Prompts", "meta_obs", "parse_prompt", "prompt_records", "read_prompt_table"]

Prompts = (
    Mapping[str, Any] | Sequence[Mapping[str, Any] | str] | pd.DataFrame | AnnData | str | os.PathLike[str]
)
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")


def parse_prompt(text: str) -> dict[str, str]:
    """``'organ=Blood,cell_type=T cell'`` (or ``;``-separated) -> ``{"organ": "Blood", "cell_type": "T cell"}``."""
    sep = ";" if ";" in text else ","
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(sep)):
        if not part:
            continue
        if "=" not in part:
            msg = (
                f"Prompt {text!r}: {part!r} is not 'category=value'. Write e.g. 'organ=Blood,cell_type=T cell' "
                "(categories: organ, region, cell_type, coarse_cell_type, age, status, technology, sex), or give "
                "the path of a .csv/.tsv table of prompts."
            )
            raise MsfmInputError(msg)
        key, value = (s.strip() for s in part.split("=", 1))
        if not key or not value:
            msg = f"Prompt {text!r}: empty category or value in {part!r}."
            raise MsfmInputError(msg)
        out[key] = value
    if not out:
        msg = f"Prompt {text!r} holds no 'category=value' pair."
        raise MsfmInputError(msg)
    return out


def read_prompt_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A ``.csv`` (comma) or ``.tsv``/``.tab``/``.txt`` (tab) table: one row per prompt, one column per category."""
    p = Path(path)
    if not p.is_file():
        msg = f"Prompt table {p} does not exist."
        raise MsfmInputError(msg)
    sep = "," if p.suffix.lower() == ".csv" else "\t"
    table = pd.read_csv(p, sep=sep, dtype=str)
    if table.empty:
        msg = f"Prompt table {p} has no rows; expected one row per prompt, one column per category."
        raise MsfmInputError(msg)
    return table


def _is_path(value: Any) -> bool:
    if isinstance(value, os.PathLike):
        return True
    return (
        isinstance(value, str)
        and "=" not in value
        and Path(value).suffix.lower() in (*TABLE_SUFFIXES, ".h5ad")
    )


def _records_of(item: Any) -> list[Any]:
    if isinstance(item, pd.DataFrame):
        return item.to_dict("records")
    if isinstance(item, AnnData):
        return item.obs.to_dict("records")
    if isinstance(item, Mapping):
        return [dict(item)]
    if _is_path(item):
        path = Path(item)
        if path.suffix.lower() == ".h5ad":
            from msfm.data import read

            return _records_of(read(path))
        return _records_of(read_prompt_table(path))
    if isinstance(item, str):
        return [parse_prompt(item)]
    return [item]


def prompt_records(prompts: Prompts) -> list[dict[str, Any]]:
    """One ``{category: value}`` dict per prompt (see the module docstring for what ``prompts`` may be).

    Raises:
        MsfmInputError: no prompt, or something that is not a prompt.
    """
    if isinstance(prompts, Sequence) and not isinstance(prompts, str):
        records = [r for item in prompts for r in _records_of(item)]
    elif isinstance(prompts, pd.DataFrame | AnnData | Mapping | str | os.PathLike):
        records = _records_of(prompts)
    else:
        msg = (
            f"prompts must be a dict such as {{'organ': 'Blood', 'cell_type': 'T cell'}}, a list of such dicts, a "
            f"text 'organ=Blood,cell_type=T cell', a DataFrame (or an AnnData's obs, or a .csv/.tsv file) with one "
            f"column per category; got {type(prompts).__name__}."
        )
        raise MsfmInputError(msg)
    if not records:
        msg = "prompts is empty; give at least one prompt (a dict of category -> value)."
        raise MsfmInputError(msg)
    bad = [i for i, r in enumerate(records) if not isinstance(r, Mapping)]
    if bad:
        msg = f"prompt {bad[0]} is a {type(records[bad[0]]).__name__}; every prompt must be a dict of category -> value."
        raise MsfmInputError(msg)
    return [dict(r) for r in records]


def meta_obs(records: Sequence[Mapping[str, Any]], repeat: int) -> pd.DataFrame:
    """``obs`` columns of generated cells: one categorical column per prompt category, each prompt ``repeat`` times."""
    cols: list[str] = []
    for r in records:
        cols.extend(str(k) for k in r if str(k) not in cols)
    data: dict[str, Any] = {}
    for c in cols:
        vals = [r.get(c) for r in records]
        vals = [None if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in vals]
        data[c] = pd.Categorical(np.repeat(np.array(vals, dtype=object), repeat))
    return pd.DataFrame(data)
