"""What every scMulan verb does around its computation: split its keyword options, check its output, record it.

* :func:`split_options`: a verb's ``**options`` hold decoding options (:class:`~msfm.models.scmulan.decoding.
  DecodeOptions`) and reading options (:class:`~msfm.data.CellReadOptions`); a misspelt one gets "did you mean".
* :func:`check_out` / :func:`write_out`: ``out=`` is checked before any compute and written atomically.
* :func:`record`: the ``uns`` record of a run (parameters, checkpoint provenance, gene mapping).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from msfm.data import CellReadOptions, GeneMapping
from msfm.errors import MsfmInputError
from msfm.models.scmulan.decoding import DecodeOptions
from msfm.runtime.jsonable import to_uns
from msfm.runtime.kwargs import did_you_mean
from msfm.runtime.loaded import Loaded

__all__ = ["check_positive", "record", "split_options"]


def split_options(
    fn: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    decode: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    base: DecodeOptions | None = None,
    reads: bool = True,
) -> tuple[DecodeOptions, CellReadOptions]:
    """Decoding and reading options of one call of the verb ``fn``.

    Args:
        fn: the verb (its parameter names are offered for misspelt keys).
        options: the verb's ``**options``.
        decode: the decoding options that apply to the verb.
        defaults: the verb's decoding defaults.
        base: the verb's ``decoding=`` object.
        reads: the verb reads cells (reading options apply).

    Raises:
        MsfmInputError: an unknown or inapplicable key (with the closest names), or an invalid value.
    """
    own = [p for p in inspect.signature(fn).parameters if p not in ("options",)]
    decode = tuple(decode)
    decoding = {k: v for k, v in options.items() if k in DecodeOptions.model_fields}
    rest = {k: v for k, v in options.items() if k not in decoding}
    verb = f"msfm.scmulan.{fn.__name__}"
    if reads:
        read = CellReadOptions.parse(rest, verb_parameters=[*own, *decode])
    else:
        if rest:
            msg = (
                f"{verb} got unknown keyword argument(s) {did_you_mean(rest, [*own, *decode])}. Its decoding options are "
                f"{', '.join(decode)} (see msfm.scmulan.DecodeOptions)."
            )
            raise MsfmInputError(msg)
        read = CellReadOptions()
    return DecodeOptions.parse(decoding, verb=verb, accepted=decode, defaults=defaults, base=base), read


def check_positive(value: Any, name: str) -> int:
    """``value`` as an int >= 1, or an ``MsfmInputError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"{name} must be a positive integer, got {value!r}."
        raise MsfmInputError(msg)
    return int(value)


def _provenance(loaded: Loaded) -> dict[str, Any]:
    extra = loaded.extra
    return {
        "path": str(loaded.path) if loaded.path is not None else "",
        "msfm_version": loaded.meta.get("msfm_version"),
        "source": extra.get("source"),
        "official_file": extra.get("official_file"),
        "official_sha256": extra.get("official_sha256"),
        "vocabulary_sha256": extra.get("vocabulary_sha256"),
        "created": loaded.meta.get("created"),
    }


def record(
    loaded: Loaded,
    params: Mapping[str, Any],
    mapping: GeneMapping | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """The ``uns`` record of a run: ``params``, ``checkpoint`` provenance, ``input`` kind and ``gene_mapping``."""
    out: dict[str, Any] = {"params": dict(params), "checkpoint": _provenance(loaded)}
    if kind is not None:
        out["input"] = {"kind": kind}
    rec = to_uns(out)
    if mapping is not None:
        rec["gene_mapping"] = mapping.to_uns()
    return rec
