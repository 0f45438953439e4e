"""Write safetensors files atomically (the weights of every msfm checkpoint)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import PathLike, atomic_write_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["prepare_tensors_for_safetensors", "write_safetensors_atomic"]


def write_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: PathLike, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors to a ``.safetensors`` file atomically.

    Tensors are moved to CPU and made contiguous; tensors sharing storage with an earlier one are cloned, because
    safetensors refuses shared memory (tied weights would otherwise make the save fail).

    Args:
        tensors: Name to tensor.
        path: Final file path.
        metadata: String-to-string metadata stored in the file header.

    Returns:
        The written path.

    Raises:
        MsfmInputError: If a value is not a tensor or the metadata is not string-to-string.
    """
    from safetensors.torch import save

    prepared = prepare_tensors_for_safetensors(tensors)
    meta = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        msg = f"safetensors metadata must map str to str; got non-string entries {bad}. Convert them with str()."
        raise MsfmInputError(msg)
    return atomic_write_bytes(path, save(prepared, metadata=meta or None))


def prepare_tensors_for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU, make contiguous and un-alias a mapping of tensors.

    Args:
        tensors: Name to tensor (for example a ``state_dict``).

    Returns:
        A new dict with independent, contiguous CPU tensors in the same order.

    Raises:
        MsfmInputError: If a value is not a tensor.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            msg = f"Entry {name!r} is a {type(value).__name__}, expected a torch.Tensor. Only tensors can be saved."
            raise MsfmInputError(msg)
        t = value.detach().to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storages:
                # Tied/aliased weights (or views of one buffer): store an independent copy per name.
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen_storages.add(ptr)
        out[name] = t
    return out
