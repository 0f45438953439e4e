"""Write model outputs into an .h5ad file batch by batch, without holding them in memory.

Used for atlas-sized inputs: the input file is copied byte-for-byte (never modified), then results are
added as new on-disk datasets (``obsm/<key>``, ``layers/<key>``, ``obs/<column>``, ``uns/<key>``) that
anndata reads back as usual. The copy is made under a temporary name and renamed into place only when
every batch has been written, so a crash never leaves a half-written output under the final name.

Faults end in :class:`~msfm.errors.OutputError` and leave nothing behind: the free space is checked before the copy
and before each dataset is created (so a clearly full disk is refused before any compute), and a write that fails
later (the disk filled up meanwhile) is caught without letting HDF5 see it (it would crash the process), the
temporary removed and an existing output left as it was. Temporary names, modes, symbolic links and concurrent
writers follow :mod:`msfm.runtime.atomic`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError, OutputError
from msfm.runtime.atomic import (
    check_free_space,
    check_output_free,
    commit_file,
    fsync_dir,
    output_error,
    resolve_output,
    sweep_stale,
    temp_file_for,
)
from msfm.runtime.guarded_file import GuardedFile
from msfm.runtime.jsonable import to_uns

_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


class H5adResultWriter:
    """Copy ``src`` to ``dst`` and stream arrays into it.

    Args:
        src: the input ``.h5ad`` (read only).
        dst: the output ``.h5ad``. A symbolic link is written through (the file it points to is replaced and keeps
            its mode; the link stays).
        overwrite: replace an existing ``dst``; the last writer wins. Without it, an existing ``dst`` is refused
            here and one that appears while the results are computed is kept: closing raises ``OutputError``.

    Raises:
        MsfmInputError: ``dst`` is the input.
        OutputError: ``dst`` exists without ``overwrite``, its folder cannot be written, or the disk has clearly
            too little space for the copy of the input.

    Example:
        >>> with H5adResultWriter("in.h5ad", "out.h5ad") as w:  # doctest: +SKIP
        ...     w.create_obsm("X_scfoundation", dim=3072)
        ...     w.write_rows("obsm/X_scfoundation", idx, values)
    """

    def __init__(self, src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = True):
        self.src = Path(src).resolve()
        self.dst = resolve_output(Path(dst).absolute())
        if self.src == self.dst.resolve() or (self.dst.exists() and os.path.samefile(self.src, self.dst)):
            msg = (
                f"The output path {self.dst} is the input file. msfm never overwrites input data; "
                "choose a different --out path."
            )
            raise MsfmInputError(msg)
        check_output_free(self.dst, overwrite=overwrite)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self._replace = overwrite
        self._existed = self.dst.exists()
        self._pending = 0  # bytes of created datasets not written yet (for the free-space checks)
        self._h5: Any = None
        self._guard: GuardedFile | None = None
        check_free_space(self.dst, self.src.stat().st_size, what="the copy of the input")
        sweep_stale(self.dst)
        fd, self._tmp = temp_file_for(self.dst)
        try:
            _copy_into(self.src, fd)
            self._guard = GuardedFile(fd, self._tmp)
            import h5py

            self._h5 = h5py.File(self._guard, "r+")
            self.n_obs = _n_obs(self._h5)
        except BaseException as err:
            if self._guard is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._discard()
            converted = output_error(self.dst, err, existed=self._existed, temp=self._tmp)
            if converted is not None:
                raise converted from err
            raise

    # -- creation -----------------------------------------------------------------------------------------
    def _dataset(self, path: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...] | None) -> None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        with self._step():
            # Before any compute: refuse when the disk clearly cannot hold what is still to be written.
            check_free_space(self.dst, self._pending + nbytes, what=f"the results ({path} and others)")
            self._pending += nbytes
            group, _, name = path.rpartition("/")
            g = self._h5.require_group(group)
            if name in g:
                del g[name]
            ds = g.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
            ds.attrs.update(_ARRAY_ATTRS)

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """One writing step. Any error discards the output (no debris even without a with-block); a write error
        the guard kept is raised as OutputError, also when HDF5 stumbled over it first (it reads back what it
        believes it wrote)."""
        if self._h5 is None:
            msg = f"The writer of {self.dst} is closed; create a new H5adResultWriter."
            raise MsfmInputError(msg)
        try:
            yield
        except BaseException as err:
            self._raise_kept(err)
            self.close(commit=False)
            raise
        self._raise_kept(None)

    def _raise_kept(self, err: BaseException | None) -> None:
        kept = self._guard.error if self._guard is not None else None
        if kept is None:
            return
        self.close(commit=False)
        converted = output_error(self.dst, kept, existed=self._existed, temp=self._tmp)
        if converted is None:
            raise kept from err
        raise converted from kept

    def create_obsm(self, key: str, dim: int, dtype: Any = np.float32) -> str:
        """Create ``obsm/<key>`` of shape ``[n_obs, dim]``; returns the dataset path."""
        with self._step():
            _ensure_mapping_group(self._h5, "obsm")
        path = f"obsm/{key}"
        self._dataset(path, (self.n_obs, dim), dtype, (min(self.n_obs, 1024), dim))
        return path

    def create_layer(self, key: str, n_vars: int, dtype: Any = np.float32) -> str:
        """Create a dense ``layers/<key>`` of shape ``[n_obs, n_vars]``; returns the dataset path."""
        with self._step():
            _ensure_mapping_group(self._h5, "layers")
        path = f"layers/{key}"
        self._dataset(path, (self.n_obs, n_vars), dtype, (min(self.n_obs, 256), n_vars))
        return path

    def create_obs_column(self, name: str, dtype: Any) -> str:
        """Create an ``obs`` column (numeric or bool) and register it in the column order."""
        with self._step():
            obs = self._h5["obs"]
            order = [str(c) for c in obs.attrs.get("column-order", [])]
            if name not in order:
                order.append(name)
        self._dataset(f"obs/{name}", (self.n_obs,), dtype, None)
        with self._step():
            obs.attrs["column-order"] = np.array(order, dtype=object)
        return f"obs/{name}"

    # -- writing ------------------------------------------------------------------------------------------
    def write_rows(self, path: str, idx: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` at rows ``idx`` (any order) of the dataset ``path``."""
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        with self._step():
            ds = self._h5[path]
            # h5py fancy indexing needs increasing indices; contiguous runs are written as slices (fast).
            if len(sorted_idx) and sorted_idx[-1] - sorted_idx[0] + 1 == len(sorted_idx):
                ds[int(sorted_idx[0]) : int(sorted_idx[-1]) + 1] = values[order]
            else:
                ds[sorted_idx] = values[order]
        self._pending = max(0, self._pending - int(np.asarray(values).nbytes))

    def write_uns(self, key: str, verb: str, record: dict[str, Any]) -> None:
        """``uns[key][verb] = record``, as :func:`msfm.runtime.adata.store_uns` does in memory.

        A real ``uns`` mapping (not a JSON string), keeping the records of other verbs the input file holds under
        ``key``.
        """
        from anndata.io import read_elem, write_elem

        with self._step():
            if "uns" not in self._h5:
                write_elem(self._h5, "uns", {})
            uns = self._h5["uns"]
            merged: dict[str, Any] = {}
            if key in uns:
                current = read_elem(uns[key])
                merged = dict(current) if isinstance(current, dict) else {}
                del uns[key]
            merged[verb] = to_uns(record)
            write_elem(uns, key, merged)

    # -- finishing ----------------------------------------------------------------------------------------
    def close(self, *, commit: bool = True) -> None:
        """Finish: with ``commit``, move the output into place (see the class for ``overwrite``); else discard it.

        Raises:
            OutputError: a write failed (full disk), or ``dst`` appeared meanwhile without ``overwrite``.
        """
        if self._h5 is None and self._guard is None:
            return  # already closed
        if not commit:
            self._discard()
            return
        try:
            self._h5.close()
            self._h5 = None
            assert self._guard is not None
            self._guard.sync()
            self._guard.check()
            self._guard.close()
            self._guard = None
            # The copy is 0600 (mkstemp); the output gets 0666 & ~umask, or keeps the mode of the file it replaces.
            commit_file(self._tmp, self.dst, replace=self._replace)
            fsync_dir(self.dst.parent)
        except BaseException as err:
            kept = self._guard.error if self._guard is not None else None
            self._discard()
            if isinstance(err, OutputError):
                raise
            cause = kept if kept is not None else err  # HDF5 may stumble over a kept write error first
            converted = output_error(self.dst, cause, existed=self._existed, temp=self._tmp)
            if converted is not None:
                raise converted from cause
            raise

    def _discard(self) -> None:
        # HDF5 never saw a failed write (the guard kept it), so closing it here cannot crash.
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        with contextlib.suppress(OSError):
            self._tmp.unlink()

    def __enter__(self) -> H5adResultWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close(commit=False)


def _ensure_mapping_group(h5: Any, name: str) -> None:
    if name not in h5:
        g = h5.create_group(name)
        g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})


def _n_obs(h5: Any) -> int:
    obs = h5["obs"]
    index_name = obs.attrs.get("_index", "_index")
    return int(obs[index_name].shape[0])


def _copy_into(src: Path, fd: int) -> None:
    """Copy the file ``src`` into the open descriptor ``fd`` (the kernel copies where it can)."""
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        if hasattr(os, "sendfile"):
            offset = 0
            try:
                while offset < size:
                    sent = os.sendfile(fd, fin.fileno(), offset, min(size - offset, 1 << 30))
                    if sent == 0:
                        break
                    offset += sent
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                offset = -1  # sendfile unsupported here: copy in user space
            if offset == size:
                return
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            fin.seek(0)
        while chunk := fin.read(16 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
