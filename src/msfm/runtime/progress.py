"""Progress bars: one look for every long-running verb, silenced by ``progress=False`` (CLI ``--quiet``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["progress_bar", "progress_iter"]

T = TypeVar("T")


#: Seconds between redraws when stderr is a file or a pipe (a terminal redraws in place every 0.1 s).
LOG_INTERVAL_S = 15.0


def _min_interval() -> float:
    # A terminal overwrites the bar in place; a log file or pipe keeps every redraw, so there it is drawn seldom.
    isatty = getattr(sys.stderr, "isatty", None)
    return 0.1 if callable(isatty) and isatty() else LOG_INTERVAL_S


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "cell") -> Any:
    """A tqdm bar (context manager with ``update(n)``), disabled when ``enabled`` is False; redrawn every
    :data:`LOG_INTERVAL_S` seconds only when stderr is not a terminal (``make demo > log``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, leave=False, mininterval=_min_interval()
    )


def progress_iter(items: Sequence[T], desc: str, *, enabled: bool = True, unit: str = "item") -> Iterator[T]:
    """Yield ``items`` one by one behind a bar that advances after each item's work (for loops whose body is too
    long to indent under ``with progress_bar(...)``); the bar is closed when the loop ends or breaks."""
    with progress_bar(len(items), desc, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)
