"""Named model presets, timm-style: ``list_models``, ``preset_config``, ``create_model``.

A preset is a config class, a model class and the config fields that differ from the class defaults. Every family
registers its presets the same way, in its ``presets`` module::

    register_preset("scmulan-tiny", ScMulan, ScMulanConfig, "Tiny scMulan for CPU tests.", dim=128, depth=4)

    config = msfm.registry.preset_config("scmulan-tiny", vocab_size=500)   # typed config, overrides applied
    model = msfm.registry.create_model("scmulan-tiny", depth=2)            # randomly initialised model

Preset modules are imported on first use, so ``import msfm`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ValidationError
from torch import nn

from msfm.errors import MsfmInputError
from msfm.runtime.registry import Registry, normalise_name

__all__ = [
    "PRESET_MODULES",
    "ModelEntry",
    "create_model",
    "get_model_entry",
    "list_models",
    "preset_config",
    "register_model",
    "register_preset",
]

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
        family: model family, e.g. ``"scfoundation"`` (the part of the name before the first ``-`` by default).
        builder: ``(**overrides) -> nn.Module``.
        description: one line.
        config_class: the family's config class (None for a builder registered without one).
        fields: config fields that differ from ``config_class``'s defaults.
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    description: str
    config_class: type[BaseModel] | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> BaseModel:
        """The typed config of this preset with ``overrides`` applied.

        Raises:
            MsfmInputError: the entry has no config class, or an override is unknown or invalid.
        """
        if self.config_class is None:
            msg = f"Model {self.name!r} was registered without a config class; it has no preset config."
            raise MsfmInputError(msg)
        unknown = sorted(set(overrides) - set(self.config_class.model_fields))
        if unknown:
            msg = (
                f"{self.config_class.__name__} has no field(s) {unknown} (preset {self.name!r}); its fields are "
                f"{sorted(self.config_class.model_fields)}."
            )
            raise MsfmInputError(msg)
        try:
            return self.config_class(**{**self.fields, **overrides})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = f"Invalid config for preset {self.name!r}: {where}: {first.get('msg')} (overrides {overrides})."
            raise MsfmInputError(msg) from err


_REGISTRY: Registry[ModelEntry] = Registry("model", hint="See msfm.registry.list_models().")
_loaded = False


def register_preset(
    name: str,
    model_class: Callable[[Any], nn.Module],
    config_class: type[BaseModel],
    description: str,
    *,
    family: str | None = None,
    **fields: Any,
) -> ModelEntry:
    """Register a preset: a model class, its config class and the fields that differ from the defaults."""
    key = normalise_name(name)
    holder: dict[str, ModelEntry] = {}

    def build(**overrides: Any) -> nn.Module:
        return model_class(holder["entry"].config(**overrides))

    entry = ModelEntry(
        name=key,
        family=family or key.split("-", 1)[0],
        builder=build,
        description=description,
        config_class=config_class,
        fields=dict(fields),
    )
    holder["entry"] = entry
    existing = _REGISTRY._entries.get(key)
    if existing is not None and (existing.config_class, dict(existing.fields)) == (
        config_class,
        dict(fields),
    ):
        return existing  # a module imported twice registers the same preset again
    return _REGISTRY.register(key, entry)


@overload
def register_model(fn: Builder, /) -> Builder: ...
@overload
def register_model(
    name: str | None = None, /, *, family: str | None = None
) -> Callable[[Builder], Builder]: ...


def register_model(
    fn_or_name: Builder | str | None = None, /, *, family: str | None = None
) -> Builder | Callable[[Builder], Builder]:
    """Register a builder function ``(**overrides) -> nn.Module`` that has no preset config (e.g. a custom model).

    Used as ``@register_model`` (the function name with ``_`` -> ``-`` is the preset name) or
    ``@register_model("name")``. Family presets use :func:`register_preset` instead.
    """

    def decorate(fn: Builder, name: str | None) -> Builder:
        key = normalise_name(name or fn.__name__)
        existing = _REGISTRY._entries.get(key)
        if existing is not None and existing.builder.__qualname__ != fn.__qualname__:
            msg = f"model {key!r} is already registered by {existing.builder.__module__}.{existing.builder.__qualname__}."
            raise ValueError(msg)
        doc = (fn.__doc__ or "").strip().splitlines()
        entry = ModelEntry(
            name=key, family=family or key.split("-", 1)[0], builder=fn, description=doc[0] if doc else ""
        )
        _REGISTRY.register(key, entry, replace=True)
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
    """Names of all registered presets, sorted, optionally filtered by a shell-style pattern (``"gest-*"``)."""
    _ensure_loaded()
    return _REGISTRY.names(pattern)


def get_model_entry(name: str, *, family: str | None = None) -> ModelEntry:
    """The registry entry of one preset.

    Args:
        name: preset name (``_`` and ``-`` are interchangeable, case is ignored).
        family: with a family, ``"tiny"`` also finds ``"<family>-tiny"``, and a preset of another family is an
            error.

    Raises:
        MsfmInputError: an unknown name (with the closest registered names) or a preset of another family.
    """
    _ensure_loaded()
    key = normalise_name(name)
    if family is not None and key not in _REGISTRY and f"{family}-{key}" in _REGISTRY:
        key = f"{family}-{key}"
    entry = _REGISTRY.get(key)
    if family is not None and entry.family != family:
        options = ", ".join(list_models(f"{family}-*"))
        msg = f"{name!r} is a {entry.family} preset, not a {family} one. {family} presets: {options}."
        raise MsfmInputError(msg)
    return entry


def preset_config(name: str, *, family: str | None = None, **overrides: Any) -> Any:
    """The typed config of a preset with field overrides.

    Raises:
        MsfmInputError: unknown preset, preset of another family, or invalid overrides.

    Example:
        >>> cfg = preset_config("scmulan-tiny", vocab_size=100)  # doctest: +SKIP
    """
    return get_model_entry(name, family=family).config(**overrides)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered preset with randomly initialised weights.

    Args:
        name: preset name, e.g. ``"scfoundation-tiny"``.
        **overrides: config fields that replace the preset's values.

    Returns:
        The model (on the current default device; use ``with torch.device("meta"):`` to build large presets
        without allocating weights).

    Raises:
        MsfmInputError: for an unknown name or invalid overrides.
    """
    return get_model_entry(name).builder(**overrides)
