"""The one loader of foreign torch files (official checkpoints, encoder weights, Lightning resume files).

``torch.load(..., weights_only=True)`` only: tensors, numbers, strings and plain containers, so a file can never run
code while it is read. Every caller gets the same errors: a missing file and an unreadable or unsafe file are both
:class:`~msfm.errors.CheckpointError`, naming the file, what it should be and how to fix it.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from msfm.errors import CheckpointError
from msfm.runtime.atomic import PathLike

logger = logging.getLogger(__name__)

__all__ = ["load_torch_file", "unwrap_state_dict"]


def load_torch_file(
    path: PathLike, *, what: str, hint: str = "", map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """Read a torch file with ``weights_only=True``.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"official scFoundation checkpoint (models.ckpt)"``).
        hint: how to get a good file, appended to the messages.
        map_location: passed to ``torch.load``.
        mmap: memory-map the tensors instead of reading them (checks a large file without loading it).

    Returns:
        The unpickled content (tensors and plain containers only).

    Raises:
        CheckpointError: the file is missing, is a folder, or is not a weights-only torch file (damaged, not torch,
            or holding objects that would need unpickling).
    """
    import torch

    p = Path(path)
    tail = f" {hint}" if hint else ""
    if not p.exists():
        msg = f"The {what} {str(p)!r} does not exist.{tail}"
        raise CheckpointError(msg)
    if not p.is_file():
        msg = f"The {what} {str(p)!r} is a folder, not a file.{tail}"
        raise CheckpointError(msg)
    try:
        content = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, zip errors... depending on the damage
        if isinstance(err, pickle.UnpicklingError):
            # torch's own message advises weights_only=False, which would run code from the file: not shown.
            why = "not a weights-only torch file: damaged, not torch, or holding pickled objects"
        else:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            why = f"{type(err).__name__}: {first}"
        msg = (
            f"Cannot read the {what} {str(p)!r} with torch.load(weights_only=True) ({why}). msfm never unpickles "
            f"arbitrary objects; re-save a file that holds custom classes as a plain dict of tensors.{tail}"
        )
        raise CheckpointError(msg) from err
    logger.debug("read %s %s", what, p)
    return content


def unwrap_state_dict(
    content: Any, *, what: str, wrappers: tuple[str, ...] = ("state_dict", "model"), prefix: str = "module."
) -> dict[str, Any]:
    """The ``name -> tensor`` mapping inside a loaded file: unwraps ``state_dict``/``model`` and a DataParallel prefix.

    Raises:
        CheckpointError: the content is not a non-empty mapping of tensors.
    """
    import torch

    for wrapper in wrappers:
        if isinstance(content, Mapping) and wrapper in content and isinstance(content[wrapper], Mapping):
            content = content[wrapper]
    if not isinstance(content, Mapping) or not content:
        msg = f"The {what} holds a {type(content).__name__}, not a non-empty state dict (name -> tensor)."
        raise CheckpointError(msg)
    state: dict[str, Any] = {}
    for key, value in content.items():
        if not isinstance(value, torch.Tensor):
            msg = f"The {what}: entry {key!r} is a {type(value).__name__}, expected a tensor."
            raise CheckpointError(msg)
        state[str(key).removeprefix(prefix)] = value
    return state
