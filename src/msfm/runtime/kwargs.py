"""Unknown keyword arguments, named with the closest known ones ("did you mean")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(keys: Iterable[str], candidates: Iterable[str]) -> str:
    """``"'layr' (did you mean 'layer'?), 'x'"``: each unknown key with up to two close candidates."""
    known = sorted(set(candidates))
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    return ", ".join(parts)
