"""The option groups GeST verbs share, declared once: generation options and the reading options.

Verbs take both as keyword arguments::

    msfm.gest.generate(adata, ckpt, query=held, mode="weighted", side_um=400, pre_normalized=True)

``mode``, ``temperature``, ``side_um``, ``tile_um``, ``max_context`` and ``use_cache`` are
:class:`GenerationOptions` (also accepted as one object, ``generation=GenerationOptions(...)``); everything else
is a reading option of :class:`msfm.data.SpatialReadOptions`. A misspelt keyword raises with the closest names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from msfm.data.options import SpatialReadOptions
from msfm.errors import MsfmInputError

__all__ = ["GenerationOptions", "Mode", "nest_read_options", "split_options"]

Mode = Literal["pick", "weighted", "sample"]


class GenerationOptions(BaseModel):
    """How GeST generates cells (``generate``, ``perturb``, ``evaluate``).

    Attributes:
        mode: ``pick`` (meta-cell profile of the most likely token, the paper's "picking"), ``weighted``
            (probability-weighted profile, "GeST-W") or ``sample`` (a token drawn at ``temperature``).
        temperature: softmax temperature of ``sample``.
        side_um: window side in µm (default: the trained side).
        tile_um: side of the tiles queries are grouped into (default: half the window side).
        max_context: known cells per window, the nearest to its centre (default: half the trained ``max_cells``).
        use_cache: KV-cached decoding (False recomputes every step: same result, slower).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "pick"
    temperature: float = Field(1.0, gt=0.0)
    side_um: float | None = Field(None, gt=0.0)
    tile_um: float | None = Field(None, gt=0.0)
    max_context: int | None = Field(None, ge=1)
    use_cache: bool = True


def split_options(
    options: Mapping[str, Any],
    *,
    verb_parameters: Iterable[str],
    generation: GenerationOptions | None = None,
    default_mode: Mode = "pick",
    generation_keys: Iterable[str] | None = None,
) -> tuple[GenerationOptions, SpatialReadOptions]:
    """Split a verb's keyword arguments into generation options and reading options, validating both.

    Args:
        options: the verb's ``**options``.
        verb_parameters: the verb's own parameter names (suggested for a misspelt key).
        generation: a :class:`GenerationOptions` object; keyword arguments go on top of it.
        default_mode: ``mode`` when neither ``generation`` nor the keywords set it.
        generation_keys: the generation options this verb accepts (default: all).

    Raises:
        MsfmInputError: an unknown key (with the closest names) or an invalid value.
    """
    keys = set(GenerationOptions.model_fields if generation_keys is None else generation_keys)
    given = {k: v for k, v in options.items() if k in keys}
    rest = {k: v for k, v in options.items() if k not in keys}
    read = SpatialReadOptions.parse(rest, verb_parameters=[*verb_parameters, *sorted(keys)])
    base = generation if generation is not None else GenerationOptions(mode=default_mode)
    if not isinstance(base, GenerationOptions):
        msg = f"generation= must be a msfm.gest.GenerationOptions; got {type(base).__name__}."
        raise MsfmInputError(msg)
    try:
        gen = GenerationOptions(**{**base.model_dump(), **given})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = f"Invalid generation option {where}={first.get('input')!r}: {first.get('msg')}."
        raise MsfmInputError(msg) from err
    return gen, read


def nest_read_options(data: Any) -> Any:
    """Move reading options written at the top level of a settings mapping (older files) into ``read``.

    Used as a ``mode="before"`` validator of the training settings classes, so that ``pre_normalized: true`` at
    the top of a YAML file still means ``read.pre_normalized``.
    """
    if not isinstance(data, Mapping):
        return data
    fields = set(SpatialReadOptions.model_fields)
    top = {k: v for k, v in data.items() if k in fields}
    if not top:
        return data
    out = {k: v for k, v in data.items() if k not in fields}
    read = out.get("read")
    if isinstance(read, BaseModel):
        read = read.model_dump()
    out["read"] = {**dict(read or {}), **top}
    return out
