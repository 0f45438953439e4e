"""Atomic file and directory writes.

Every output msfm produces (checkpoints, AnnData files, prediction arrays, run configs) goes through these helpers so
that a crash, a kill or a full disk never leaves a half-written file where a good one used to be. The pattern is
always the same: write into a temporary sibling (same folder, hence same file system, hence ``os.replace`` is an
atomic rename), flush and ``fsync`` it, then swap it into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "PathLike",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_free",
    "fsync_dir",
    "temp_sibling",
]


def fsync_dir(path: PathLike) -> None:
    """Flush a directory entry to disk so that a rename inside it survives a power loss.

    Args:
        path: Directory whose entries were just changed.
    """
    # Directories cannot be opened for fsync on Windows; the rename is still atomic there.
    if os.name != "posix":
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, tag: str, suffix: str = "") -> Path:
    # A hidden name in the same folder: same file system (atomic rename) and easy to recognise as debris.
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:10]}{suffix}")


@contextlib.contextmanager
def atomic_write(
    path: PathLike, mode: Literal["w", "wb"] = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing and move it onto ``path`` when the block succeeds.

    If the block raises, the temporary file is removed and an existing ``path`` is left untouched.

    Args:
        path: Final file path. Its parent folder must exist.
        mode: ``"wb"`` for bytes, ``"w"`` for text.
        encoding: Text encoding (only for ``mode="w"``).

    Yields:
        The open file object to write to.

    Raises:
        MsfmInputError: If ``mode`` is not a write mode or the parent folder does not exist.

    Example:
        >>> with atomic_write("out.bin") as fh:  # doctest: +SKIP
        ...     fh.write(b"payload")
    """
    if mode not in ("w", "wb"):
        msg = f"atomic_write got mode={mode!r}; expected 'w' (text) or 'wb' (bytes)."
        raise MsfmInputError(msg)
    target = Path(path)
    if not target.parent.is_dir():
        msg = f"Cannot write {target}: the folder {target.parent} does not exist. Create it first."
        raise MsfmInputError(msg)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        text_kwargs = {"encoding": encoding, "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a normal open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    # os.umask can only be read by setting it; restore immediately.
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, *, suffix: str = "") -> Iterator[Path]:
    """A fresh temporary sibling path for writers that need a file name (h5py, anndata, numpy); moved onto
    ``path`` when the block succeeds.

    The temporary name is unpredictable and created exclusively (``mkstemp``), so no existing file or planted
    link is ever opened. The writer may replace the empty placeholder. If the block raises, the temporary file is
    removed and an existing ``path`` is left untouched.

    Args:
        path: final file path; its folder must exist.
        suffix: suffix of the temporary name (``".h5ad"`` keeps writers from second-guessing the format).

    Yields:
        The temporary path to write.
    """
    target = Path(path)
    if not target.parent.is_dir():
        msg = f"Cannot write {target}: the folder {target.parent} does not exist. Create it first."
        raise MsfmInputError(msg)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: Final file path.
        data: Bytes to write.

    Returns:
        The written path.
    """
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: Final file path.
        text: Text to write.
        encoding: Text encoding.

    Returns:
        The written path.
    """
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON and write it to ``path`` atomically.

    The object is serialised before the file is opened, so an object that is not JSON-serialisable never leaves
    a temporary file behind.

    Args:
        path: Final file path.
        obj: A JSON-serialisable object (dicts, lists, strings, numbers, booleans, None).
        indent: Indentation passed to :func:`json.dumps`.

    Returns:
        The written path.

    Raises:
        MsfmInputError: If ``obj`` cannot be serialised to JSON.
    """
    try:
        text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=True)
    except (TypeError, ValueError) as err:
        msg = (
            f"Cannot write {path} as JSON: {err}. Expected only dicts, lists, strings, numbers, booleans and None; "
            "convert other objects (numpy scalars, Paths, tensors) to plain Python values first."
        )
        raise MsfmInputError(msg) from err
    return atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in at ``path`` when the block succeeds.

    An existing directory at ``path`` is moved aside only after the new one is complete, then deleted. Between the
    two renames (microseconds) a crash can leave the old directory under a hidden ``.NAME.old-*`` sibling instead of
    at ``path``; the new content is never half-written.

    Args:
        path: Final directory path. Its parent folder is created if missing.

    Yields:
        The temporary directory to fill.

    Raises:
        MsfmInputError: If ``path`` exists and is a file.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        msg = f"Cannot write the directory {target}: a file with that name exists. Remove it or choose another path."
        raise MsfmInputError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        old: Path | None = None
        if target.exists():
            old = temp_sibling(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_free(path: PathLike, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless asked to; returns the path.

    Raises:
        MsfmInputError: ``path`` exists and ``overwrite`` is False.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        msg = f"Output {p} already exists. Pass --overwrite (overwrite=True) or choose another path."
        raise MsfmInputError(msg)
    return p
