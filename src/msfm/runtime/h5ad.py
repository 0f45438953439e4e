"""Write AnnData and HDF5 files atomically, never over the file being read, and never let HDF5 see a failed write.

HDF5 crashes the process (segmentation fault) when it touches a file again after one of its writes failed, which
is what a full disk does mid-write. Every HDF5 file msfm writes is therefore opened through
:func:`open_hdf5`: HDF5 sees each write succeed, the first error is kept and raised by msfm, and the file is
discarded (see :class:`msfm.runtime.guarded_file.GuardedFile`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import PathLike, atomic_path, check_output_free
from msfm.runtime.guarded_file import GuardedFile

if TYPE_CHECKING:
    import anndata
    import h5py

logger = logging.getLogger(__name__)

__all__ = ["Hdf5Output", "check_output", "open_hdf5", "same_file", "write_h5ad_atomic", "write_output"]


class Hdf5Output:
    """An HDF5 file open for writing through a :class:`~msfm.runtime.guarded_file.GuardedFile`.

    Attributes:
        file: the ``h5py.File``.
    """

    def __init__(self, file: h5py.File, guard: GuardedFile) -> None:
        self.file = file
        self._guard = guard

    def check(self) -> None:
        """Raise the first ``OSError`` a write met (call it after each step of a long write)."""
        self._guard.check()


@contextlib.contextmanager
def open_hdf5(path: PathLike, mode: Literal["w", "r+"] = "w") -> Iterator[Hdf5Output]:
    """Open ``path`` (a temporary from :func:`msfm.runtime.atomic.atomic_path`) with h5py so that a failed write
    (full disk) raises a plain ``OSError`` here instead of crashing HDF5.

    The file is closed (HDF5 flushes into the guard), synced, and the first write error, if any, is raised; the
    surrounding ``atomic_path`` then discards the temporary and reports an ``OutputError``.

    Args:
        path: the file to write (``"w"`` truncates it, ``"r+"`` opens an existing HDF5 file).
        mode: ``"w"`` or ``"r+"``.
    """
    import h5py

    # O_NOFOLLOW: a link planted in place of the temporary is refused, never followed.
    flags = (
        os.O_RDWR
        | (os.O_TRUNC if mode == "w" else 0)
        | getattr(os, "O_BINARY", 0)
        | getattr(os, "O_NOFOLLOW", 0)
    )
    guard = GuardedFile(os.open(os.fspath(path), flags), path)
    try:
        h5 = h5py.File(guard, mode)
    except BaseException:
        guard.close()
        raise
    out = Hdf5Output(h5, guard)
    try:
        yield out
        h5.close()
        guard.sync()
    except BaseException as err:
        _close_quietly(h5)
        guard.close()
        if guard.error is not None:
            # HDF5 stumbles over a kept write error (it reads back what it believes it wrote): report the cause.
            raise guard.error from err
        raise
    try:
        guard.check()
    finally:
        guard.close()


def _close_quietly(h5: Any) -> None:
    # The block already failed; its error is the one to report.
    with contextlib.suppress(Exception):
        h5.close()


def same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def write_h5ad_atomic(
    adata: anndata.AnnData,
    path: PathLike,
    *,
    overwrite_input_guard: Iterable[PathLike] = (),
    compression: Literal["gzip", "lzf"] | None = None,
    replace: bool = True,
) -> Path:
    """Write an AnnData to ``path`` atomically, refusing to overwrite a file that is being read.

    Writing over the input file of a backed AnnData (or an input another reader still holds open) corrupts it
    mid-read, so the target is compared with every input path and with ``adata.filename`` first. The file is the
    one :meth:`anndata.AnnData.write_h5ad` writes (string columns become categoricals, in ``adata`` too), written
    through :func:`open_hdf5` so that a full disk is an ``OutputError``, not a crash.

    Args:
        adata: The object to write.
        path: Final ``.h5ad`` path.
        overwrite_input_guard: Paths of the inputs being read; ``path`` must not be any of them.
        compression: HDF5 compression of the datasets (``gzip`` or ``lzf``).
        replace: replace an existing ``path`` (the last writer wins); False: an output that appeared while the
            caller computed is never replaced (``OutputError``). See :func:`msfm.runtime.atomic.atomic_write`.

    Returns:
        The written path.

    Raises:
        MsfmInputError: If ``path`` is one of the inputs.
        OutputError: a full disk, an unwritable folder, or (``replace=False``) ``path`` appeared meanwhile.
    """
    target = Path(path)
    guards = [Path(p) for p in overwrite_input_guard]
    if getattr(adata, "isbacked", False) and adata.filename is not None:
        guards.append(Path(adata.filename))
    for guard in guards:
        if same_file(target, guard):
            msg = (
                f"Refusing to write {target}: it is the input file being read ({guard}). Writing over it would "
                "corrupt the data mid-read. Choose a different output path (for example add '.msfm' before '.h5ad')."
            )
            raise MsfmInputError(msg)
    from anndata.io import write_elem

    # What AnnData.write_h5ad does, minus its own h5py.File (which would see a full disk and crash).
    adata.strings_to_categoricals()
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    kwargs = {"compression": compression} if compression is not None else {}
    with atomic_path(target, suffix=".h5ad", replace=replace) as tmp, open_hdf5(tmp) as h5:
        root = h5.file
        root.attrs["encoding-type"] = "anndata"
        root.attrs["encoding-version"] = "0.1.0"
        if adata.X is not None:
            write_elem(root, "X", adata.X, dataset_kwargs=kwargs)
        if adata.raw is not None:
            write_elem(root, "raw", adata.raw, dataset_kwargs=kwargs)
        for key, value in (
            ("obs", adata.obs),
            ("var", adata.var),
            ("obsm", dict(adata.obsm)),
            ("varm", dict(adata.varm)),
            ("obsp", dict(adata.obsp)),
            ("varp", dict(adata.varp)),
            ("layers", dict(adata.layers)),
            ("uns", dict(adata.uns)),
        ):
            write_elem(root, key, value, dataset_kwargs=kwargs)
            h5.check()
    logger.debug("wrote %s (%d x %d)", target, adata.n_obs, adata.n_vars)
    return target


def _input_path(data: Any) -> Path | None:
    return Path(data) if isinstance(data, str | os.PathLike) else None


def check_output(
    out: PathLike | None, *, overwrite: bool, data: Any = None, create_parents: bool = False
) -> Path | None:
    """Check a verb's output path before any compute (None: nothing will be written).

    Args:
        out: the output file or folder.
        overwrite: an existing output may be replaced.
        data: the verb's input (a path is compared with ``out``; an AnnData is ignored).
        create_parents: create missing parent folders (run folders) instead of refusing them.

    Raises:
        MsfmInputError: the output exists and ``overwrite`` is False, its folder does not exist, or it is the
            input, lies inside an input folder or holds the input.
        OutputError: the folder cannot be written (read-only, forbidden or full; probed by creating and removing a
            temporary file, which works for root too) or ``out`` is a dangling symbolic link.
    """
    if out is None:
        return None
    target = Path(out)
    src = _input_path(data)
    if src is not None and src.exists():
        if same_file(target, src):
            why = "is the input file"
        elif src.is_dir() and src.resolve() in target.resolve().parents:
            why = "lies inside the input folder"
        elif target.resolve() in src.resolve().parents:
            why = "holds the input (replacing it would delete the input)"
        else:
            why = ""
        if why:
            msg = (
                f"The output {str(target)!r} {why} {str(src)!r}; msfm never writes over its input. Choose another "
                "path (for example add '.msfm' before the suffix)."
            )
            raise MsfmInputError(msg)
    check_output_free(target, overwrite=overwrite)
    if create_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.is_dir():
        msg = f"Cannot write {target}: the folder {target.parent} does not exist. Create it first."
        raise MsfmInputError(msg)
    return target


def write_output(
    adata: anndata.AnnData, out: PathLike | None, data: Any = None, *, replace: bool = True
) -> None:
    """Write a verb's result to ``out`` atomically, never over the input ``data``; nothing when ``out`` is None.

    Pass the verb's ``overwrite`` as ``replace``: without it, an output another process wrote while this one
    computed is kept and this run fails with ``OutputError``; with it, the last writer wins.
    """
    if out is None:
        return
    src = _input_path(data)
    write_h5ad_atomic(adata, out, overwrite_input_guard=[src] if src is not None else [], replace=replace)
