"""Weights checked against the model a checkpoint's ``config.json`` describes, before anything big is allocated.

Every family loader goes through :func:`build_checked_model`:

1. the model is built on the ``meta`` device (no memory), its parameter count is checked against
   :data:`MAX_PARAMETERS` (a ``config.json`` asking for a model larger than any msfm family refuses, naming its
   largest fields);
2. the tensors the model expects (name, shape, dtype) are compared with the ``model.safetensors`` header, read with
   ``safetensors.safe_open`` (no tensor data is read): missing, unexpected, wrongly shaped and wrongly typed tensors
   raise one :class:`~msfm.errors.CheckpointError` naming the first few of each;
3. only then is the real model built and the tensors loaded.

Legitimate differences:

* tied weights (one parameter under two names) may be stored once, under either name;
* non-persistent buffers are not in ``state_dict`` and so never expected;
* a checkpoint saved in a lower (or higher) floating precision on purpose (a run trained with
  ``precision="bf16-true"`` exports bfloat16 weights) is accepted when *all* its floating tensors share that one
  dtype; they are cast to the model's dtype on load. A single floating tensor in another dtype than the rest, an
  integer tensor where a floating one belongs (or the reverse), or an integer tensor of another width is refused.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from msfm.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_PARAMETERS",
    "TensorSpec",
    "build_checked_model",
    "check_parameter_count",
    "check_tensors",
    "model_tensor_specs",
    "read_safetensors_header",
    "read_safetensors_tensors",
]

#: Largest model (parameters, buffers included) a checkpoint may describe: 20 billion, above every msfm family's
#: largest release (scMulan 369 M, scFoundation 119 M) by far, and below what a single machine could build.
MAX_PARAMETERS = 20_000_000_000

#: How many keys of each kind an error names.
SHOWN = 5

# safetensors dtype codes -> torch dtype names
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
_FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor (``dtype`` is torch's name: ``"float32"``, ``"int64"``, ...)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def floating(self) -> bool:
        """Whether the dtype is a floating-point one."""
        return self.dtype in _FLOATING

    def describe(self) -> str:
        """``float32[8, 4]``."""
        return f"{self.dtype}[{', '.join(str(s) for s in self.shape)}]"


# Initialisers that only fill values: on a meta tensor there are none, and torch's meta kernels for the random ones
# are slow (milliseconds per call, seconds for a deep model).
_VALUE_INITS = frozenset(
    {
        "normal_", "uniform_", "zero_", "fill_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
        "xavier_uniform_", "xavier_normal_", "ones_", "zeros_", "constant_", "orthogonal_",
    }
)  # fmt: skip


class _NoValueInit(TorchFunctionMode):
    """Skip value initialisers of meta tensors (shapes and dtypes are all a meta build is for)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _VALUE_INITS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, TensorSpec]:
    """Name, shape and dtype of every tensor in a ``.safetensors`` file, without reading tensor data.

    Raises:
        CheckpointError: The file is missing, truncated or not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            out = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                code = sl.get_dtype()
                out[name] = TensorSpec(
                    tuple(int(s) for s in sl.get_shape()), _ST_DTYPES.get(code, code.lower())
                )
    except (SafetensorError, OSError, ValueError) as err:
        msg = f"Cannot read {p}: {err}. The weights file is damaged; re-export or re-download the checkpoint."
        raise CheckpointError(msg) from err
    return out


def read_safetensors_tensors(
    path: str | os.PathLike[str], *, device: str = "cpu", names: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (all, or only ``names``).

    Raises:
        CheckpointError: The file cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt", device=device) as fh:
            wanted = list(fh.keys()) if names is None else [n for n in fh.keys() if n in set(names)]
            return {name: fh.get_tensor(name) for name in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = f"Cannot read {p}: {err}. The weights file is damaged; re-export or re-download the checkpoint."
        raise CheckpointError(msg) from err


def model_tensor_specs(model: nn.Module) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """What ``model.state_dict()`` holds, and its tied names.

    Works on a model built on the ``meta`` device (shapes and dtypes only).

    Returns:
        ``(specs, tied)``: the spec of every state-dict entry, and ``alias -> first name`` for entries that are the
        same tensor object as an earlier entry (tied weights).
    """
    specs: dict[str, TensorSpec] = {}
    tied: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        specs[name] = TensorSpec(tuple(int(s) for s in value.shape), _dtype_name(value.dtype))
        key = id(value)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return specs, tied


def _tied_groups(tied: Mapping[str, str]) -> dict[str, set[str]]:
    """``name -> every name of its tied group`` (``tied`` maps each alias to the group's first name)."""
    groups: dict[str, set[str]] = {}
    for alias, name in tied.items():
        groups.setdefault(name, {name}).add(alias)
    return {member: group for group in groups.values() for member in group}


def _show(items: list[str]) -> str:
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def check_tensors(
    expected: Mapping[str, TensorSpec],
    found: Mapping[str, TensorSpec],
    *,
    source: str | os.PathLike[str],
    tied: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> str | None:
    """Compare the tensors a model expects with the tensors of a checkpoint.

    Args:
        expected: spec of every tensor of the model (:func:`model_tensor_specs`).
        found: spec of every tensor in the file (:func:`read_safetensors_header`).
        source: the weights file, for the message.
        tied: ``alias -> name`` of tied entries: either of the two names may be absent.
        config_file: the ``config.json`` the model was built from, for the message.

    Returns:
        The floating dtype the checkpoint was saved in when it differs from the model's (a deliberate lower
        precision, cast on load), else None.

    Raises:
        CheckpointError: naming up to five missing, unexpected, wrongly shaped and wrongly typed tensors each,
            with what was expected and what was found.
    """
    partners = _tied_groups(tied or {})
    missing = [k for k in expected if k not in found and not any(p in found for p in partners.get(k, ()))]
    unexpected = [k for k in found if k not in expected]
    common = [k for k in expected if k in found]
    wrong_shape = [k for k in common if expected[k].shape != found[k].shape]

    floats = Counter(found[k].dtype for k in common if expected[k].floating and found[k].floating)
    model_float = Counter(expected[k].dtype for k in common if expected[k].floating)
    saved_as: str | None = None
    if floats:
        top = max(floats.values())
        leaders = [d for d, c in floats.items() if c == top]
        preferred = model_float.most_common(1)[0][0] if model_float else None
        saved_as = preferred if preferred in leaders else sorted(leaders)[0]
    wrong_dtype = []
    for k in common:
        e, f = expected[k], found[k]
        if e.dtype == f.dtype:
            continue
        if e.floating and f.floating and f.dtype == saved_as:
            continue  # the whole checkpoint is in one floating precision: cast on load
        wrong_dtype.append(k)

    if missing or unexpected or wrong_shape or wrong_dtype:
        parts = []
        if missing:
            shown = [f"{k} ({expected[k].describe()})" for k in missing]
            parts.append(f"{len(missing)} missing: {_show(shown)}")
        if unexpected:
            shown = [f"{k} ({found[k].describe()})" for k in unexpected]
            parts.append(f"{len(unexpected)} unexpected: {_show(shown)}")
        if wrong_shape:
            shown = [
                f"{k} (expected {list(expected[k].shape)}, found {list(found[k].shape)})" for k in wrong_shape
            ]
            parts.append(f"{len(wrong_shape)} with the wrong shape: {_show(shown)}")
        if wrong_dtype:
            shown = []
            for k in wrong_dtype:
                want = expected[k].dtype
                if expected[k].floating and saved_as is not None and saved_as != want:
                    want = f"{saved_as} like the other floating tensors (the model: {expected[k].dtype})"
                shown.append(f"{k} (expected {want}, found {found[k].dtype})")
            parts.append(f"{len(wrong_dtype)} with the wrong dtype: {_show(shown)}")
        cfg = str(config_file) if config_file is not None else "its config.json"
        msg = (
            f"The weights in {source} do not fit the model that {cfg} describes ({len(expected)} tensors expected, "
            f"{len(found)} found): {'; '.join(parts)}. The file was edited or damaged, or config.json does not "
            "belong to these weights: re-export the checkpoint (save/convert/train) or restore the matching "
            "config.json."
        )
        raise CheckpointError(msg)
    model_dtype = model_float.most_common(1)[0][0] if model_float else None
    if saved_as is not None and saved_as != model_dtype:
        logger.info("%s is saved in %s; the weights are cast to %s on load", source, saved_as, model_dtype)
        return saved_as
    return None


def check_parameter_count(
    n_parameters: int,
    *,
    source: str | os.PathLike[str],
    fields: Mapping[str, Any] | None = None,
    limit: int = MAX_PARAMETERS,
) -> None:
    """Refuse a model larger than ``limit`` parameters before it is built.

    Args:
        n_parameters: elements of the model's state dict.
        source: the ``config.json`` describing it, for the message.
        fields: the config's size fields (name -> value), named in the message.
        limit: the largest allowed model.

    Raises:
        CheckpointError: ``n_parameters > limit``.
    """
    if n_parameters <= limit:
        return
    sizes = {
        k: v
        for k, v in (fields or {}).items()
        if isinstance(v, int | tuple | list) and not isinstance(v, bool)
    }
    shown = ", ".join(f"{k}={v!r}" for k, v in sizes.items())
    msg = (
        f"{source} describes a model of {n_parameters:,} parameters ({shown}); msfm loads models of at most "
        f"{limit:,} parameters. Lower the size fields (dims, depths, vocabulary sizes) to those of the weights, "
        "fix the file or re-export the checkpoint."
    )
    raise CheckpointError(msg)


def build_checked_model(
    build: Callable[[], nn.Module],
    weights_file: str | os.PathLike[str],
    *,
    header: Mapping[str, TensorSpec] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    fields: Mapping[str, Any] | None = None,
    skip_prefixes: tuple[str, ...] = (),
    device: str = "cpu",
    limit: int = MAX_PARAMETERS,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build the model ``build()`` makes and load ``weights_file`` into it, after checking sizes and tensors.

    Args:
        build: makes the model from the (already validated) config; called once on the ``meta`` device, then once
            for real.
        weights_file: the ``model.safetensors``.
        header: its header when already read (:func:`read_safetensors_header`).
        config_file: the ``config.json``, for messages.
        fields: the config's fields, named when the model is too large.
        skip_prefixes: tensors of the file that are not the model's (e.g. a vocabulary stored alongside): they are
            not checked against the model and are returned as they are.
        device: where the tensors are read to.
        limit: the largest allowed model (parameters and buffers).

    Returns:
        ``(model, other tensors)``: the model with the weights loaded (cast to the model's dtype), and the tensors
        under ``skip_prefixes``.

    Raises:
        CheckpointError: the model is too large, or the tensors do not fit it.
    """
    source = config_file if config_file is not None else weights_file
    with torch.device("meta"), _NoValueInit():
        skeleton = build()
    expected, tied = model_tensor_specs(skeleton)
    del skeleton
    aliases = set(tied)
    check_parameter_count(
        sum(s.numel for k, s in expected.items() if k not in aliases),
        source=source,
        fields=fields,
        limit=limit,
    )
    found_all = dict(header) if header is not None else read_safetensors_header(weights_file)
    found = (
        {k: v for k, v in found_all.items() if not k.startswith(skip_prefixes)}
        if skip_prefixes
        else found_all
    )
    check_tensors(expected, found, source=weights_file, tied=tied, config_file=config_file)
    tensors = read_safetensors_tensors(weights_file, device=device)
    own = {k: v for k, v in tensors.items() if k in found}
    other = {k: v for k, v in tensors.items() if k not in found}
    model = build()
    result = model.load_state_dict(own, strict=False)
    groups = _tied_groups(tied)
    leftover = [k for k in result.missing_keys if not any(p in own for p in groups.get(k, ()))]
    leftover += list(result.unexpected_keys)
    if leftover:  # the checks above make this unreachable unless the file changed in between
        msg = f"The weights in {weights_file} changed while loading ({leftover[:SHOWN]}); load the checkpoint again."
        raise CheckpointError(msg)
    return model, other
