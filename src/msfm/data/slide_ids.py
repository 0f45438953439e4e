"""Slide ids: the one check every slide id passes before it names a file or a folder.

Slide ids come from tables, ``--slides`` lists and file names, and msfm builds paths from them
(``features/<id>.h5``, ``heatmaps/<id>/``). An id such as ``../../victim`` would then point outside the folder
the user chose, and an ``--overwrite`` could delete it. Every reader of slide ids calls :func:`check_slide_id`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from msfm.errors import MsfmInputError

__all__ = ["check_slide_id", "check_slide_ids"]

# Characters that separate path components on some platform, or end a C string.
_FORBIDDEN = ("/", "\\", "\x00")


def check_slide_id(slide_id: Any, source: str = "slide ids") -> str:
    """The slide id, stripped, if it can safely name a file inside an output folder.

    Args:
        slide_id: the id as read (any type; turned into text).
        source: where it came from (a table and row, an option, a file), for the error message.

    Returns:
        The stripped id.

    Raises:
        MsfmInputError: for an empty id, ``.``/``..``, an id starting with ``.``, or one containing a path
            separator or a NUL character.
    """
    sid = str(slide_id).strip()
    if not sid or sid in (".", "..") or sid.startswith(".") or any(c in sid for c in _FORBIDDEN):
        msg = (
            f"Invalid slide id {slide_id!r} ({source}): slide ids name output files and folders, so they must be "
            "non-empty, must not start with '.' and must not contain '/', '\\' or NUL. Fix the slide_id column "
            "or the slide list."
        )
        raise MsfmInputError(msg)
    return sid


def check_slide_ids(slide_ids: Iterable[Any], source: str = "slide ids") -> list[str]:
    """:func:`check_slide_id` for every id of a list, in order."""
    return [check_slide_id(s, source) for s in slide_ids]
