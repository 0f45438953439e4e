"""Old names keep working for one release, with a ``DeprecationWarning`` that names the new call."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["deprecated", "moved_names", "warn_deprecated"]

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (removed in the next release)."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next msfm release; use {new} instead.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def deprecated(old: str, new: str) -> Callable[[F], F]:
    """Decorator for a kept-for-one-release wrapper: warns on every call, then runs it."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            warn_deprecated(old, new)
            return fn(*args, **kwargs)

        wrapper.__doc__ = f"Deprecated: use {new}.\n\n" + (fn.__doc__ or "")
        return wrapper  # type: ignore[return-value]

    return decorate


def moved_names(package: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving names that moved: ``old name -> "new.module:new_name"``.

    Each access warns with the new location, then returns the object found there.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        module, _, attr = moved[name].partition(":")
        attr = attr or name
        warn_deprecated(f"{package}.{name}", f"{module}.{attr}")
        return getattr(importlib.import_module(module), attr)

    return __getattr__
