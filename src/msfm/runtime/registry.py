"""``Registry``: named entries with helpful errors. Model presets and ROAM patch encoders are registries."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from msfm.errors import MsfmInputError

__all__ = ["Registry", "normalise_name"]

T = TypeVar("T")


def normalise_name(name: str) -> str:
    """Lower case, ``_`` -> ``-``, surrounding spaces removed: ``"ScFoundation_Tiny" -> "scfoundation-tiny"``."""
    return str(name).strip().lower().replace("_", "-")


class Registry(Generic[T]):
    """Entries by normalised name.

    Args:
        what: what the entries are, for messages (``"model preset"``, ``"patch encoder"``).
        hint: where to look for the names, appended to the unknown-name error.
        normalise: how names are compared (default :func:`normalise_name`: case and ``_``/``-`` are ignored).
    """

    def __init__(self, what: str, hint: str = "", normalise: Callable[[str], str] = normalise_name) -> None:
        self.what = what
        self.hint = hint
        self.normalise = normalise
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name``; a second, different entry under one name raises unless ``replace``."""
        key = self.normalise(name)
        if key in self._entries and not replace and self._entries[key] is not entry:
            msg = f"A {self.what} named {key!r} is already registered; choose another name."
            raise ValueError(msg)
        self._entries[key] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry of ``name``.

        Raises:
            MsfmInputError: unknown name, with the closest registered names.
        """
        key = self.normalise(name)
        if key not in self._entries:
            close = difflib.get_close_matches(key, list(self._entries), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            tail = f" {self.hint}" if self.hint else ""
            msg = f"Unknown {self.what} {name!r}.{hint} Registered: {', '.join(sorted(self._entries))}.{tail}"
            raise MsfmInputError(msg)
        return self._entries[key]

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by a shell pattern (``"scmulan-*"``)."""
        names = sorted(self._entries)
        if pattern is None:
            return names
        return [n for n in names if fnmatch.fnmatch(n, self.normalise(pattern))]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.normalise(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
