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
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from msfm.errors import CheckpointError, MsfmInputError
from msfm.runtime.atomic import PathLike
from msfm.runtime.kwargs import did_you_mean

__all__ = [
    "MAX_DEPTH",
    "MAX_DIM",
    "MAX_HEADS",
    "MAX_MLP_RATIO",
    "MAX_VOCAB",
    "build_settings",
    "checkpoint_config",
    "checkpoint_config_error",
    "describe_field",
    "read_config_file",
    "settings_error",
    "validate_settings",
]

Settings = TypeVar("Settings", bound=BaseModel)

# Bounds of model config fields, shared by every family (``Field(le=MAX_DEPTH)``): far above every released model,
# low enough that a damaged or hostile ``config.json`` fails validation instead of building until memory runs out.
# The parameter count of the whole model is checked too (msfm.runtime.weights_check.MAX_PARAMETERS).
#: Layers of one stack.
MAX_DEPTH = 256
#: Attention heads.
MAX_HEADS = 256
#: Widths (model, head, hidden, feature dimensions).
MAX_DIM = 65_536
#: Hidden-size multipliers of feed-forward blocks.
MAX_MLP_RATIO = 64
#: Vocabulary-like sizes: genes, tokens, meta-cells, classes.
MAX_VOCAB = 4_194_304


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


# --- config.json of a checkpoint -------------------------------------------------------------------------------

_PROBLEMS = {
    "int_parsing": "is not an integer",
    "int_type": "is not an integer",
    "int_from_float": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "finite_number": "is not a finite number",
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
    "string_type": "is not a string",
    "literal_error": "is not an allowed value",
    "greater_than": "is out of range",
    "greater_than_equal": "is out of range",
    "less_than": "is out of range",
    "less_than_equal": "is out of range",
    "too_short": "has too few items",
    "too_long": "has too many items",
    "tuple_type": "is not a list",
    "list_type": "is not a list",
    "dict_type": "is not a mapping",
    "model_type": "is not a mapping",
    "none_required": "must be null",
}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(annotation, False)``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], nullable
        return annotation, nullable
    return annotation, False


def _type_words(annotation: Any) -> str:
    ann, nullable = _unwrap(annotation)
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        ann = typing.get_args(ann)[0]
        origin = typing.get_origin(ann)
    if ann is bool:
        text = "true or false"
    elif ann is int:
        text = "an integer"
    elif ann is float:
        text = "a number"
    elif ann is str:
        text = "a string"
    elif origin is typing.Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    elif origin in (tuple, list):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        inner = _type_words(args[0]) if args else "values"
        n = len(typing.get_args(ann))
        fixed = n if origin is tuple and Ellipsis not in typing.get_args(ann) else None
        text = f"a list of {fixed} items, each {inner}" if fixed else f"a list, each item {inner}"
    elif origin is dict:
        text = "a mapping"
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        text = f"a mapping of {ann.__name__} fields"
    else:
        text = f"a value of type {getattr(ann, '__name__', ann)}"
    return text + (" or null" if nullable else "")


def _bounds(metadata: list[Any]) -> str:
    lo = hi = None
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            lo = f"[{m.ge}"
        elif getattr(m, "gt", None) is not None:
            lo = f"({m.gt}"
        if getattr(m, "le", None) is not None:
            hi = f"{m.le}]"
        elif getattr(m, "lt", None) is not None:
            hi = f"{m.lt})"
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f" {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return ""


def describe_field(cls: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """What the field at ``loc`` (a pydantic error location) accepts: ``"an integer in [0, 256]"``.

    An item of a list field (``("depths", 0)``) is described as the item. Returns None when ``loc`` names no
    declared field.
    """
    model: Any = cls
    annotation: Any = None
    metadata: list[Any] = []
    for part in loc:
        if isinstance(part, int):
            ann, _ = _unwrap(annotation)
            args = [a for a in typing.get_args(ann) if a is not Ellipsis]
            if typing.get_origin(ann) not in (tuple, list) or not args:
                return None
            fixed = Ellipsis not in typing.get_args(ann) and typing.get_origin(ann) is tuple
            annotation = args[part] if fixed and part < len(args) else args[0]
            metadata = []
            if typing.get_origin(annotation) is typing.Annotated:
                metadata = [m for m in annotation.__metadata__ for m in getattr(m, "metadata", [m])]
                annotation = typing.get_args(annotation)[0]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        annotation, metadata = field.annotation, list(field.metadata)
        model, _ = _unwrap(annotation)
    if annotation is None:
        return None
    ann, nullable = _unwrap(annotation)
    return _type_words(ann) + _bounds(metadata) + (" or null" if nullable else "")


def _known_fields(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model, _ = _unwrap(model.model_fields[part].annotation)
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def checkpoint_config_error(err: ValidationError, cls: type[BaseModel], path: PathLike) -> CheckpointError:
    """One message for a ``config.json`` that does not validate: each bad field with its value, what it accepts,
    and the fix.

    ``<path> is damaged: field 'depth' = 'twelve' is not an integer; expected an integer in [0, 256]; fix the file
    or re-export the checkpoint.`` Unknown fields are named with the closest known ones and the list of known fields.
    """
    problems = []
    errors = err.errors()
    for e in errors[:5]:
        loc = tuple(e.get("loc", ()))
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            parent = loc[:-1]
            known = _known_fields(cls, parent)
            where = f" of {_field_name(parent)}" if parent else ""
            problems.append(
                f"unknown field {did_you_mean([_field_name(loc[-1:])], known)}{where}; known fields: {', '.join(known)}"
            )
            continue
        if kind == "missing":
            expected = describe_field(cls, loc)
            problems.append(f"field {_field_name(loc)!r} is missing; expected {expected}")
            continue
        given = e.get("input")
        problem = _PROBLEMS.get(kind)
        if problem is None:  # a model validator's own message (already says what is wrong and how to fix it)
            text = str(e.get("msg", "")).removeprefix("Value error, ")
            problems.append(f"field {_field_name(loc)!r}: {text}" if loc else text)
            continue
        expected = describe_field(cls, loc)
        shown = "" if isinstance(given, Mapping) else f" = {given!r}"
        item = f"field {_field_name(loc)!r}{shown} {problem}"
        problems.append(item + (f"; expected {expected}" if expected else f" ({e.get('msg')})"))
    more = f" (+{len(errors) - 5} more problems)" if len(errors) > 5 else ""
    msg = f"{path} is damaged: " + "; ".join(problems) + more + "; fix the file or re-export the checkpoint."
    return CheckpointError(msg)


def checkpoint_config(cls: type[Settings], data: Any, path: PathLike) -> Settings:
    """``cls.model_validate(data)`` for the ``config`` of a checkpoint's ``config.json``.

    Raises:
        CheckpointError: naming each bad field, its value, what it accepts and the fix (see
            :func:`checkpoint_config_error`).
    """
    if not isinstance(data, Mapping):
        msg = f"{path}: 'config' holds a {type(data).__name__}; expected a mapping of {cls.__name__} fields. Re-export the checkpoint."
        raise CheckpointError(msg)
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise checkpoint_config_error(err, cls, path) from err
