"""``warn_once``: a warning that a loop or a repeated read would otherwise print many times, shown once per process."""

from __future__ import annotations

import threading
import warnings

__all__ = ["warn_once"]

_SEEN: set[tuple[type[Warning], str]] = set()
_LOCK = threading.Lock()


def warn_once(message: str, category: type[Warning] = UserWarning, *, stacklevel: int = 2) -> bool:
    """Emit ``message`` as a warning the first time this process sees it (same category and text); later calls
    are silent. Returns True when the warning was emitted.

    Python's own "default" filter already dedupes per call site, but a message reached from several call sites
    (every reader, every verb) or under an "always" filter (pytest, Lightning) would repeat; this keys on the
    text instead.
    """
    key = (category, message)
    with _LOCK:
        if key in _SEEN:
            return False
        _SEEN.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def _reset_for_tests() -> None:
    """Forget every warning seen so far (tests only)."""
    with _LOCK:
        _SEEN.clear()
