"""Write AnnData files atomically, never over the file being read."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import PathLike, fsync_dir, temp_sibling

if TYPE_CHECKING:
    import anndata

logger = logging.getLogger(__name__)

__all__ = ["same_file", "write_h5ad_atomic"]


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
    if not target.parent.is_dir():
        msg = f"Cannot write {target}: the folder {target.parent} does not exist. Create it first."
        raise MsfmInputError(msg)
    # Keep the .h5ad suffix on the temporary file so no reader or writer second-guesses the format.
    tmp = temp_sibling(target, "tmp", suffix=".h5ad")
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
