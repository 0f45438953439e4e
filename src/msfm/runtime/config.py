"""Settings files and overrides: the one way every family builds a typed settings object.

A run's settings come from three places, in this order of precedence: flat overrides (keyword arguments or CLI
options), a YAML/JSON file, and the defaults of the pydantic class. :func:`build_settings` merges them the same way
for every family: a flat key names a top-level field, or a field of exactly one nested section (``lr`` ->
``optim.lr``, ``devices`` -> ``trainer.devices``); a dotted key (``optim.lr``) names a nested field explicitly.
Unknown keys and invalid values raise :class:`~msfm.errors.MsfmInputError` naming the field.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import PathLike

__all__ = ["build_settings", "read_config_file", "settings_error", "validate_settings"]

Settings = TypeVar("Settings", bound=BaseModel)


def read_config_file(path: PathLike, *, what: str = "settings") -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON settings file, not yet validated.

    Args:
        path: the file.
        what: what the fields configure, for the error message (e.g. ``"GestTrainConfig"``).

    Returns:
        The mapping (empty for an empty file).

    Raises:
        MsfmInputError: If the file is missing, unparsable or not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        msg = f"Config file {p} does not exist."
        raise MsfmInputError(msg)
    text = p.read_text()
    try:
        data = yaml.safe_load(text) if p.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        msg = f"Cannot parse the config file {p}: {err}"
        raise MsfmInputError(msg) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        msg = f"Config file {p} must hold a mapping of {what} fields; got a {type(data).__name__}."
        raise MsfmInputError(msg)
    return data


def settings_error(err: ValidationError, what: str) -> MsfmInputError:
    """One readable message for a pydantic validation error: the field, the problem and the value given."""
    lines = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "(settings)"
        given = e.get("input")
        shown = f" (got {given!r})" if not isinstance(given, Mapping) else ""
        lines.append(f"{where}: {e.get('msg')}{shown}")
    more = f" (+{len(err.errors()) - 5} more)" if len(err.errors()) > 5 else ""
    return MsfmInputError(f"Invalid {what} settings: " + "; ".join(lines) + more + ".")


def validate_settings(cls: type[Settings], data: Mapping[str, Any], what: str | None = None) -> Settings:
    """``cls.model_validate(data)`` with errors turned into :class:`MsfmInputError`."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise settings_error(err, what or cls.__name__) from err


def _sections(cls: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Top-level fields of ``cls`` that are themselves settings classes (``trainer``, ``optim``, ``loss``)."""
    out = {}
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = ann
    return out


def _route(cls: type[BaseModel], key: str) -> tuple[str, ...]:
    """Where a flat or dotted override key lands: ``("lr",) -> ("optim", "lr")``."""
    sections = _sections(cls)
    if "." in key:
        head, rest = key.split(".", 1)
        if head in sections:
            return (head, *_route(sections[head], rest))
        if head in cls.model_fields and rest:
            return (head, rest)  # a plain mapping field, e.g. model_overrides.dim
    if key in cls.model_fields:
        return (key,)
    owners = [name for name, sub in sections.items() if key in sub.model_fields]
    if len(owners) == 1:
        return (owners[0], key)
    known = sorted(set(cls.model_fields) | {k for sub in sections.values() for k in sub.model_fields})
    if len(owners) > 1:
        msg = f"Setting {key!r} is ambiguous between sections {owners}; write it as '{owners[0]}.{key}'."
        raise MsfmInputError(msg)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    msg = f"Unknown {cls.__name__} setting {key!r}.{hint} Known settings: {', '.join(known)}."
    raise MsfmInputError(msg)


def build_settings(
    cls: type[Settings],
    *,
    base: Settings | Mapping[str, Any] | None = None,
    file: PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    what: str | None = None,
) -> Settings:
    """Typed settings from a base (object, mapping or file) plus flat overrides.

    Args:
        cls: the pydantic settings class.
        base: starting settings (an instance or a mapping); with ``file``, the file's fields go on top of it.
        file: a YAML/JSON file of fields (nested sections as mappings).
        overrides: flat (``lr``) or dotted (``optim.lr``) keys; ``None`` values are ignored, so unset CLI options
            never replace a file's value.
        what: name used in error messages (default: the class name).

    Returns:
        The validated settings.

    Raises:
        MsfmInputError: unreadable file, unknown or ambiguous key, or an invalid value.
    """
    if isinstance(base, BaseModel):
        data: dict[str, Any] = base.model_dump()
    else:
        data = dict(base or {})
    full_base = isinstance(base, BaseModel)
    if file is not None:
        data = _deep_merge(data, read_config_file(file, what=what or cls.__name__))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        path = _route(cls, key)
        node = data
        for part in path[:-1]:
            current = node.get(part)
            if isinstance(current, BaseModel):
                current = current.model_dump()
            if current is None:
                current = {}
            if not isinstance(current, Mapping):
                msg = f"Setting {part!r} must be a mapping to take {key!r}; it is {current!r}."
                raise MsfmInputError(msg)
            node[part] = dict(current)
            node = node[part]
        node[path[-1]] = value
    if not full_base:
        data = _with_section_defaults(cls, data)
    return validate_settings(cls, data, what)


def _with_section_defaults(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Partial sections (``optim: {lr: 0.1}``) start from the section's default in ``cls``, not from the section
    class's own defaults: a family may default ``optim`` to ``OptimConfig(warmup_steps=100)``."""
    out = dict(data)
    for name, section in _sections(cls).items():
        given = out.get(name)
        if not isinstance(given, Mapping):
            continue
        default = cls.model_fields[name].get_default(call_default_factory=True)
        base = default.model_dump() if isinstance(default, BaseModel) else {}
        out[name] = _with_section_defaults(section, _deep_merge(base, given))
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out
