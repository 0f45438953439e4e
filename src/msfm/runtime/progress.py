"""Progress bars: one look for every long-running verb, silenced by ``progress=False`` (CLI ``--quiet``)."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "cell") -> Any:
    """A tqdm bar (context manager with ``update(n)``), disabled when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)
