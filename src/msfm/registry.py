"""Named model presets (timm-style): ``register_model``, ``create_model``, ``list_models``.

A preset is a function that builds a model and accepts config overrides as keyword arguments::

    @register_model("scfoundation-tiny")
    def scfoundation_tiny(**overrides: Any) -> ScFoundation:
        ...

    model = msfm.registry.create_model("scfoundation-tiny", encoder_depth=1)

Preset modules of every family are imported on first use of the registry, so importing ``msfm`` stays
cheap. A family adds its ``presets`` module to ``PRESET_MODULES``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from torch import nn

from msfm.errors import MsfmInputError

__all__ = ["PRESET_MODULES", "ModelEntry", "create_model", "get_model_entry", "list_models", "register_model"]

# Modules whose import registers presets; one per family.
PRESET_MODULES: tuple[str, ...] = (
    "msfm.models.scfoundation.presets",
    "msfm.models.scmulan.presets",
    "msfm.models.roam.presets",
    "msfm.models.gest.presets",
)

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """One registered preset.

    Attributes:
        name: preset name, e.g. ``"scfoundation-tiny"``.
        family: model family, e.g. ``"scfoundation"`` (the first part of the name by default).
        builder: function ``(**overrides) -> nn.Module``.
        description: first line of the builder's docstring.
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}
_loaded = False


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


@overload
def register_model(fn: Builder, /) -> Builder: ...
@overload
def register_model(
    name: str | None = None, /, *, family: str | None = None
) -> Callable[[Builder], Builder]: ...


def register_model(
    fn_or_name: Builder | str | None = None, /, *, family: str | None = None
) -> Builder | Callable[[Builder], Builder]:
    """Register a preset builder, as ``@register_model`` or ``@register_model("name")``.

    Without a name the function name is used with ``_`` turned into ``-``
    (``scfoundation_tiny`` -> ``scfoundation-tiny``).

    Args:
        fn_or_name: the builder (bare decorator) or the preset name.
        family: model family; default: the name up to the first ``-``.

    Returns:
        The builder unchanged (or a decorator that returns it).

    Raises:
        ValueError: if the name is already registered by a different function.
    """

    def decorate(fn: Builder, name: str | None) -> Builder:
        key = _normalise(name or fn.__name__)
        existing = _REGISTRY.get(key)
        if existing is not None and existing.builder.__qualname__ != fn.__qualname__:
            msg = f"model {key!r} is already registered by {existing.builder.__module__}.{existing.builder.__qualname__}."
            raise ValueError(msg)
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ModelEntry(
            name=key,
            family=family or key.split("-", 1)[0],
            builder=fn,
            description=doc[0] if doc else "",
        )
        return fn

    if callable(fn_or_name):
        return decorate(fn_or_name, None)
    return lambda fn: decorate(fn, fn_or_name)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    for module in PRESET_MODULES:
        importlib.import_module(module)
    _loaded = True


def list_models(pattern: str | None = None) -> list[str]:
    """Names of all registered presets, sorted, optionally filtered by a shell-style pattern.

    Args:
        pattern: e.g. ``"scfoundation-*"``; ``None`` lists everything.

    Returns:
        Sorted preset names.
    """
    _ensure_loaded()
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    return [name for name in names if fnmatch.fnmatch(name, _normalise(pattern))]


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of one preset.

    Args:
        name: preset name (``_`` and ``-`` are interchangeable, case is ignored).

    Returns:
        The entry.

    Raises:
        MsfmInputError: for an unknown name, with the closest registered names.
    """
    _ensure_loaded()
    key = _normalise(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = (
            f"unknown model {name!r}.{hint} Registered models: {', '.join(sorted(_REGISTRY))}. "
            f"See msfm.registry.list_models()."
        )
        raise MsfmInputError(msg)
    return _REGISTRY[key]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered preset with randomly initialised weights.

    Args:
        name: preset name, e.g. ``"scfoundation-tiny"``.
        **overrides: config fields that replace the preset's values.

    Returns:
        The model (on the current default device; use ``with torch.device("meta"):`` to build large
        presets without allocating weights).

    Raises:
        MsfmInputError: for an unknown name or invalid overrides.

    Example:
        >>> model = create_model("scfoundation-tiny", encoder_depth=1)
    """
    return get_model_entry(name).builder(**overrides)
