"""Lazy package exports: ``import msfm`` and ``import msfm.models.<family>`` stay fast and side-effect free."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any], *, whole_modules: bool = False
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` that import an export on first access.

    Args:
        package: the package's name, for error messages.
        exports: public name -> module that defines it (or, with ``whole_modules``, the module itself).
        namespace: the package's ``globals()``; a resolved export is cached there.
        whole_modules: the names are modules to import, not attributes of them.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = importlib.import_module(exports[name])
            value = module if whole_modules else getattr(module, name)
            namespace[name] = value
            return value
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
