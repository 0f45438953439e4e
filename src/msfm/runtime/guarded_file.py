"""A file object that keeps HDF5 from crashing when a write fails (full disk, quota, file size limit).

HDF5 (h5py) crashes the process (segmentation fault) when it touches a file again after one of its writes failed.
Every HDF5 file msfm writes is opened through :class:`GuardedFile` (see :func:`msfm.runtime.h5ad.open_hdf5` and
:class:`msfm.runtime.h5ad_stream.H5adResultWriter`), so a full disk ends in an ``OutputError`` instead.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

PathLike = str | os.PathLike[str]

__all__ = ["GuardedFile"]


class GuardedFile(io.RawIOBase):
    """A binary file (around an open descriptor) that never lets a failed write reach the caller's library.

    HDF5 (h5py) crashes the process (segmentation fault) when it touches a file again after one of its writes
    failed, which is what a full disk does. Opened through this object (``h5py.File(GuardedFile(fd, path),
    mode)``), HDF5 sees every write succeed. The first ``OSError`` is kept in :attr:`error`; from then on writes go
    to memory instead of the disk and reads see them, so HDF5 keeps a consistent view of its file while the
    writer finishes its step, calls :meth:`check` and discards the file. Kept writes are bounded: beyond
    ``_KEEP_LIMIT`` bytes (raw data, not HDF5's small metadata blocks) only their extent is kept and reads see
    zeros there.
    """

    _KEEP_LIMIT = 64 << 20

    def __init__(self, fd: int, path: PathLike) -> None:
        super().__init__()
        self._fd = fd
        self.name = os.fspath(path)
        self.error: OSError | None = None
        self._kept: list[
            tuple[int, bytes | int]
        ] = []  # (offset, data or length of a zero hole), in write order
        self._kept_bytes = 0
        self._end = 0  # logical end of file once writes are kept

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def _size(self) -> int:
        return max(os.fstat(self._fd).st_size, self._end)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            return os.lseek(self._fd, self._size() + offset, os.SEEK_SET)
        return os.lseek(self._fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        pos = self.tell()
        got = 0
        while got < len(view):
            chunk = os.read(self._fd, len(view) - got)
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        if self._kept:
            got = self._overlay(view, pos, got)
            os.lseek(self._fd, pos + got, os.SEEK_SET)
        return got

    def _overlay(self, view: memoryview, pos: int, got: int) -> int:
        # Apply the kept writes (later ones win) over what the disk returned.
        n = len(view)
        for off, data in self._kept:
            length = data if isinstance(data, int) else len(data)
            lo, hi = max(off, pos), min(off + length, pos + n)
            if lo >= hi:
                continue
            if lo - pos > got:
                view[got : lo - pos] = bytes(lo - pos - got)
            if isinstance(data, int):
                view[lo - pos : hi - pos] = bytes(hi - lo)
            else:
                view[lo - pos : hi - pos] = data[lo - off : hi - off]
            got = max(got, hi - pos)
        return got

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total, pos = len(view), self.tell()
        if self.error is None:
            done = 0
            try:
                while done < total:
                    done += os.write(self._fd, view[done:])
                return total
            except OSError as err:
                self.error = err
                pos, view = pos + done, view[done:]
        self._keep(pos, view)
        os.lseek(self._fd, pos + len(view), os.SEEK_SET)
        return total

    def _keep(self, pos: int, view: memoryview) -> None:
        if self._kept_bytes + len(view) <= self._KEEP_LIMIT:
            self._kept.append((pos, bytes(view)))
            self._kept_bytes += len(view)
        else:
            self._kept.append((pos, len(view)))
        self._end = max(self._end, pos + len(view))

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as err:
                self.error = err
        else:
            self._end = size
        return size

    def flush(self) -> None:
        return None

    def sync(self) -> None:
        """``fsync``; an error (a delayed allocation failing on a full disk) is kept like a write error."""
        if self.error is None:
            try:
                os.fsync(self._fd)
            except OSError as err:
                self.error = err

    def check(self) -> None:
        """Raise the first write error, if any."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._kept = []
        super().close()
