"""Atomic file and directory writes.

Every output msfm produces (checkpoints, AnnData files, prediction arrays, run configs) goes through this module so
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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from msfm.errors import MsfmInputError

if TYPE_CHECKING:
    import anndata
    import torch

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "atomic_dir",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "write_h5ad_atomic",
    "write_safetensors_atomic",
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


def _temp_sibling(path: Path, tag: str, suffix: str = "") -> Path:
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
    tmp = _temp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        old: Path | None = None
        if target.exists():
            old = _temp_sibling(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def write_h5ad_atomic(
    adata: anndata.AnnData,
    path: PathLike,
    *,
    overwrite_input_guard: Iterable[PathLike] = (),
    compression: Literal["gzip", "lzf"] | None = None,
) -> Path:
    """Write an AnnData to ``path`` atomically, refusing to overwrite a file that is being read.

    Writing over the input file of a backed AnnData (or an input another reader still holds open) corrupts it
    mid-read, so the target is compared with every input path and with ``adata.filename`` first.

    Args:
        adata: The object to write.
        path: Final ``.h5ad`` path.
        overwrite_input_guard: Paths of the inputs being read; ``path`` must not be any of them.
        compression: HDF5 compression passed to :meth:`anndata.AnnData.write_h5ad`.

    Returns:
        The written path.

    Raises:
        MsfmInputError: If ``path`` is one of the inputs.
    """
    target = Path(path)
    guards = [Path(p) for p in overwrite_input_guard]
    if getattr(adata, "isbacked", False) and adata.filename is not None:
        guards.append(Path(adata.filename))
    for guard in guards:
        if _same_file(target, guard):
            msg = (
                f"Refusing to write {target}: it is the input file being read ({guard}). Writing over it would "
                "corrupt the data mid-read. Choose a different output path (for example add '.msfm' before '.h5ad')."
            )
            raise MsfmInputError(msg)
    if not target.parent.is_dir():
        msg = f"Cannot write {target}: the folder {target.parent} does not exist. Create it first."
        raise MsfmInputError(msg)
    # Keep the .h5ad suffix on the temporary file so no reader or writer second-guesses the format.
    tmp = _temp_sibling(target, "tmp", suffix=".h5ad")
    try:
        adata.write_h5ad(tmp, compression=compression)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s (%d x %d)", target, adata.n_obs, adata.n_vars)
    return target


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
