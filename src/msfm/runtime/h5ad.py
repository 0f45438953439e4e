"""Write AnnData files atomically, never over the file being read."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import PathLike, atomic_path, check_output_free

if TYPE_CHECKING:
    import anndata

logger = logging.getLogger(__name__)

__all__ = ["check_output", "same_file", "write_h5ad_atomic", "write_output"]


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
        if same_file(target, guard):
            msg = (
                f"Refusing to write {target}: it is the input file being read ({guard}). Writing over it would "
                "corrupt the data mid-read. Choose a different output path (for example add '.msfm' before '.h5ad')."
            )
            raise MsfmInputError(msg)
    with atomic_path(target, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp, compression=compression)
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


def write_output(adata: anndata.AnnData, out: PathLike | None, data: Any = None) -> None:
    """Write a verb's result to ``out`` atomically, never over the input ``data``; nothing when ``out`` is None."""
    if out is None:
        return
    src = _input_path(data)
    write_h5ad_atomic(adata, out, overwrite_input_guard=[src] if src is not None else [])
