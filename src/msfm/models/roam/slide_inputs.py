"""Which slides to preprocess: slide files, folders, CSV tables or a DataFrame -> unique slide ids and paths."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from msfm.data.slide_ids import check_slide_id
from msfm.data.slides import SLIDE_EXTENSIONS
from msfm.errors import MsfmInputError

__all__ = ["collect_slides", "parse_shard"]


def _rows_from_table(df: pd.DataFrame, *, base: Path, source: str) -> list[tuple[str, Path]]:
    if "path" not in df.columns:
        msg = (
            f"Slide table {source} has columns {list(df.columns)}; expected a 'path' column (one slide file per row) "
            "and optionally 'slide_id'."
        )
        raise MsfmInputError(msg)
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        raw = rec["path"]
        if raw is None or (isinstance(raw, float) and np.isnan(raw)) or not str(raw).strip():
            msg = f"Slide table {source}: row {i} has an empty 'path'."
            raise MsfmInputError(msg)
        p = Path(str(raw).strip()).expanduser()
        if not p.is_absolute():
            p = base / p
        sid = rec.get("slide_id")
        if sid is None or (isinstance(sid, float) and np.isnan(sid)) or not str(sid).strip():
            sid = p.stem
        rows.append((check_slide_id(sid, f"{source}, row {i}"), p))
    return rows


def _is_under(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def collect_slides(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | pd.DataFrame,
    *,
    exclude: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Resolve slide inputs into a table of unique slide ids and paths, sorted by slide id.

    Args:
        inputs: Slide files, folders (searched recursively for :data:`SLIDE_EXTENSIONS`; hidden files skipped),
            CSV files with a ``path`` column (+ optional ``slide_id``; relative paths are relative to the CSV's
            folder), or a DataFrame with those columns.
        exclude: A folder whose files are never taken as slides (the output folder, which holds QC PNGs).

    Returns:
        DataFrame with columns ``slide_id``, ``path`` (slide id = file stem unless the table gives one).

    Raises:
        MsfmInputError: A path that does not exist, a folder without slides, a table without ``path``, or two
            slides with the same id.
    """
    excl = Path(exclude) if exclude is not None else None
    rows: list[tuple[str, Path]] = []
    if isinstance(inputs, pd.DataFrame):
        rows = _rows_from_table(inputs, base=Path.cwd(), source="(DataFrame)")
    else:
        items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
        if not items:
            msg = "No slides given. Pass slide files, folders of slides or a CSV with a 'path' column."
            raise MsfmInputError(msg)
        for item in items:
            p = Path(item).expanduser()
            if p.is_dir():
                found = sorted(
                    f
                    for f in p.rglob("*")
                    if f.suffix.lower() in SLIDE_EXTENSIONS
                    and not f.name.startswith(".")
                    and f.is_file()
                    and not _is_under(f, excl)
                )
                if not found:
                    msg = f"Folder {p} holds no slides (searched recursively for {', '.join(SLIDE_EXTENSIONS)})."
                    raise MsfmInputError(msg)
                rows += [(check_slide_id(f.stem, str(f)), f) for f in found]
            elif p.is_file() and p.suffix.lower() == ".csv":
                try:
                    table = pd.read_csv(p)
                except Exception as err:
                    msg = f"Cannot read the slide table {p} as CSV: {err}."
                    raise MsfmInputError(msg) from err
                rows += _rows_from_table(table, base=p.parent, source=str(p))
            elif p.is_file():
                rows.append((check_slide_id(p.stem, str(p)), p))
            else:
                msg = f"Slide input {p} does not exist. Pass slide files, folders or a CSV with a 'path' column."
                raise MsfmInputError(msg)
    # The same file reached twice (a folder and a file in it) is one slide; two files with one id are an error.
    seen: dict[str, Path] = {}
    dups: dict[str, list[str]] = {}
    for sid, p in rows:
        if sid in seen:
            if seen[sid].resolve() != p.resolve():
                dups.setdefault(sid, [str(seen[sid])]).append(str(p))
            continue
        seen[sid] = p
    if dups:
        shown = "; ".join(f"{k}: {v}" for k, v in list(dups.items())[:5])
        msg = (
            f"{len(dups)} slide id(s) are used by more than one file ({shown}{' ...' if len(dups) > 5 else ''}). "
            "Output files are named by slide id, so ids must be unique: rename the files or pass a CSV with "
            "'path' and unique 'slide_id' columns."
        )
        raise MsfmInputError(msg)
    table = pd.DataFrame({"slide_id": list(seen), "path": [str(p) for p in seen.values()]})
    return table.sort_values("slide_id", kind="stable").reset_index(drop=True)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based ``i``) or ``(i, n)`` -> ``(i, n)``, checked; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in (text.split("/") if isinstance(text, str) else text))
    except (ValueError, TypeError) as err:
        msg = f"shard {text!r} must look like 'i/n' with 0 <= i < n, e.g. '0/4' for the first of 4 shards."
        raise MsfmInputError(msg) from err
    if n < 1 or not 0 <= i < n:
        msg = (
            f"shard {text!r}: need n >= 1 and 0 <= i < n (shards are numbered from 0), e.g. '0/4' ... '3/4'."
        )
        raise MsfmInputError(msg)
    return i, n
