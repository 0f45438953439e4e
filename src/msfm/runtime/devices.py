"""Devices, device lists, process ranks and mixed precision: one spelling of each for every family.

Inference resolves a device string (``"auto"``, ``"cpu"``, ``"cuda:1"``) with :func:`resolve_device`; training
passes a device list (``"auto"``, ``2``, ``"0,1"``, ``-1`` for all) to Lightning after :func:`parse_devices`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch

from msfm.errors import MsfmInputError
from msfm.runtime.precision import Precision, resolve_precision

logger = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")

__all__ = [
    "Precision",
    "autocast_context",
    "normalize_precision",
    "parse_devices",
    "rank_world",
    "resolve_device",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a user device string into a :class:`torch.device`, checking that it exists.

    Args:
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or a
            :class:`torch.device`.

    Returns:
        The device.

    Raises:
        MsfmInputError: If the string is not a device name, or the device is not available on this machine.
    """
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        msg = f"device must be a string or torch.device; got {type(device).__name__}. Use e.g. 'auto' or 'cuda:0'."
        raise MsfmInputError(msg)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = _DEVICE_RE.match(spec)
    if match is None:
        msg = f"Unknown device {device!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        raise MsfmInputError(msg)
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
            msg = (
                f"device={device!r} was requested but CUDA is not available ({build}). Use device='cpu' or 'auto', "
                "or install the CUDA build of torch on a GPU machine (see README, 'GPU install')."
            )
            raise MsfmInputError(msg)
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            msg = f"device={device!r} was requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})."
            raise MsfmInputError(msg)
    if kind == "mps" and not _mps_available():
        msg = f"device={device!r} was requested but Apple MPS is not available here. Use 'cpu' or 'auto'."
        raise MsfmInputError(msg)
    return torch.device(spec)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def normalize_precision(precision: str, device: str | torch.device | None = "auto") -> Precision:
    """Map a precision string (ours or Lightning's, or ``"auto"``) to ``"32"``, ``"bf16"`` or ``"16"``.

    Args:
        precision: ``"auto"``, ``"32"``, ``"bf16"``, ``"16"`` or a Lightning name such as ``"bf16-mixed"``.
        device: the device ``"auto"`` is decided for (see :func:`msfm.runtime.precision.resolve_precision`).

    Returns:
        The canonical precision.

    Raises:
        MsfmInputError: For an unknown precision.
    """
    return resolve_precision(precision, device).precision


@contextlib.contextmanager
def autocast_context(device: str | torch.device, precision: str = "32") -> Iterator[None]:
    """Context manager running the block in the requested mixed precision on ``device``.

    Args:
        device: The device the computation runs on.
        precision: ``"32"`` (no autocast), ``"bf16"``, ``"16"`` (or the Lightning spellings), or ``"auto"``
            (decided by :func:`msfm.runtime.precision.resolve_precision` for ``device``).

    Yields:
        Nothing; the block runs under :func:`torch.autocast` (or unchanged for ``"32"``).

    Raises:
        MsfmInputError: For an unknown precision, or ``"bf16"`` on a CUDA device without bf16 support.
    """
    dev = device if isinstance(device, torch.device) else torch.device(device)
    prec = normalize_precision(precision, dev)
    if prec == "32":
        yield
        return
    if prec == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        msg = f"precision='bf16' was requested but {torch.cuda.get_device_name(dev)} does not support bf16. Use '16' or '32'."
        raise MsfmInputError(msg)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    with torch.autocast(device_type=dev.type, dtype=dtype):
        yield


def parse_devices(value: Any) -> Literal["auto"] | int | list[int]:
    """A Lightning device list from a user value: ``"auto"``, a count (``-1`` = all) or indices.

    Accepts ints, lists of ints and strings such as ``"auto"``, ``"2"``, ``"-1"`` or ``"0,1"``.

    Raises:
        MsfmInputError: anything else (the message shows the accepted forms).
    """
    if isinstance(value, bool):
        value = str(value)
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    if isinstance(value, str):
        text = value.strip()
        try:
            if "," in text:
                return [int(v) for v in text.split(",") if v.strip()]
            return int(text)
        except ValueError:
            pass
    msg = f"devices={value!r}: expected 'auto', a count (e.g. 2, -1 for all) or device indices (e.g. '0,1')."
    raise MsfmInputError(msg)


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: from the process group, else from the launcher's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    # Lightning and torchrun set these before the process group exists (e.g. while building dataloaders).
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
