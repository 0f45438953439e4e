"""Atomic file and directory writes.

Every output msfm produces (checkpoints, AnnData files, prediction arrays, run configs) goes through these helpers so
that a crash, a kill or a full disk never leaves a half-written file where a good one used to be. The pattern is
always the same: write into a temporary sibling (same folder, hence same file system, hence the final rename is
atomic), flush and ``fsync`` it, then swap it into place.

The rules every writer here follows (see also "Writing outputs" in docs/architecture.md):

* **Temporary names** are ``.NAME.msfm-<host>-<pid>-<random>.tmp`` (directories: ``...tmp`` too, and
  ``...old`` for a replaced directory on its way out), created exclusively by :func:`tempfile.mkstemp` /
  :func:`tempfile.mkdtemp`, so no existing file or planted link is ever opened. ``<host>`` is a short hash of the
  host name, ``<pid>`` the writing process.
* **Stale temporaries** of a killed run are removed when the next write to the same target starts: those of a
  process of this host that is no longer alive, and those of other hosts older than a day (:func:`sweep_stale`).
* **Modes**: a new output gets ``0o666 & ~umask`` (directories ``0o777 & ~umask``); an output that is replaced
  keeps its permission bits. The owner is the writing user.
* **Symbolic links**: writing to a path that is a link writes the file the link points to (it is replaced
  atomically and keeps its mode); the link itself stays. A dangling link is refused.
* **Concurrency**: with ``replace=False`` (a verb's ``overwrite=False``) the final step never replaces anything:
  if the target appeared while this run was computing, :class:`~msfm.errors.OutputError` says so and the new
  result is discarded. With ``replace=True`` the last writer wins.
* **Faults**: a full disk, an exhausted quota or a file-size limit (``ENOSPC``, ``EDQUOT``, ``EFBIG``) and a folder
  that cannot be written (``EROFS``, ``EACCES``, ``EPERM``) become :class:`~msfm.errors.OutputError` naming the
  path, the bytes free and the fix; the temporary is removed and an existing output is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from msfm.errors import MsfmInputError, OutputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = [
    "STALE_AFTER_S",
    "PathLike",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_free_space",
    "check_output_free",
    "commit_file",
    "fsync_dir",
    "output_error",
    "probe_writable",
    "resolve_output",
    "sweep_stale",
    "temp_file_for",
]

#: Temporaries of other hosts (whose process cannot be checked) older than this are removed by :func:`sweep_stale`.
STALE_AFTER_S = 24 * 3600

_SPACE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: (
        "the file grew past the largest size this process may write (a file-size limit such as `ulimit -f`, "
        "or the file system's maximum file size)"
    ),
}
_DENIED_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
# os.link fails with these where a file system has no hard links; the commit then falls back (see commit_file).
_NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS}


# -- names ------------------------------------------------------------------------------------------------------
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace"), usedforsecurity=False).hexdigest()[
        :6
    ]


def _stem(name: str) -> str:
    # Keep temporary names within the 255-byte limit of most file systems.
    if len(name.encode("utf-8", "surrogateescape")) <= 160:
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape"), usedforsecurity=False).hexdigest()
    return f"{name[:100]}~{digest[:10]}"


def _prefix(target: Path) -> str:
    return f".{_stem(target.name)}.msfm-{_host_tag()}-{os.getpid()}-"


def _temp_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(
        rf"^\.{re.escape(_stem(target.name))}\.msfm-([0-9a-f]{{6}})-(\d+)-[a-z0-9_]+\.(?:tmp|old)"
    )


def temp_file_for(target: Path, suffix: str = "") -> tuple[int, Path]:
    """An exclusive, unpredictably named temporary beside ``target`` (marked for the stale sweep): ``(fd, path)``."""
    fd, name = tempfile.mkstemp(prefix=_prefix(target), suffix=f".tmp{suffix}", dir=target.parent)
    return fd, Path(name)


def _mkdtemp(target: Path, kind: str = "tmp") -> Path:
    return Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=f".{kind}", dir=target.parent))


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows; rely on the age rule there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def sweep_stale(path: PathLike) -> list[Path]:
    """Remove temporaries that killed writers left next to ``path``; returns what was removed.

    A temporary ``.NAME.msfm-<host>-<pid>-<random>.tmp`` (or ``.old``) is stale when its process ran on this host
    and is no longer alive, or when it comes from another host and is older than :data:`STALE_AFTER_S`. Live
    writers' temporaries are never touched. Errors are ignored (the sweep is housekeeping, never a reason to fail).
    """
    target = Path(path)
    pattern = _temp_pattern(target)
    here, now = _host_tag(), time.time()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None:
            continue
        host, pid = m.group(1), int(m.group(2))
        if entry.name.endswith(".old") and not target.exists():
            # A directory moved aside just before its replacement was renamed in: the only copy left.
            logger.warning(
                "%s holds the previous content of %s (an interrupted write); not removed", entry.path, target
            )
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if host == here:
            stale = pid != os.getpid() and not _pid_alive(pid)
        else:
            stale = now - st.st_mtime > STALE_AFTER_S
        if not stale:
            continue
        p = Path(entry.path)
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as err:
            logger.debug("could not remove the stale temporary %s: %s", p, err)
            continue
        logger.info("removed %s, left behind by an interrupted msfm run", p)
        removed.append(p)
    return removed


# -- modes, paths and errors ------------------------------------------------------------------------------------
def _current_umask() -> int:
    # Linux shows the umask without changing it; elsewhere it can only be read by setting it (briefly to a strict
    # value, so that a file another thread creates meanwhile is private rather than world-writable).
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _final_mode(target: Path, *, directory: bool = False) -> int:
    # An output that is replaced keeps its permission bits; a new one gets what a plain open()/mkdir() gives.
    try:
        return stat.S_IMODE(os.stat(target).st_mode) & 0o777
    except OSError:
        return (0o777 if directory else 0o666) & ~_current_umask()


def resolve_output(path: PathLike) -> Path:
    """The path a write to ``path`` really replaces: ``path`` itself, or the file a symbolic link points to.

    Raises:
        OutputError: ``path`` is a link to nothing (a dangling link is refused rather than followed).
    """
    p = Path(path)
    if not p.is_symlink():
        return p
    real = Path(os.path.realpath(p))
    if not real.exists():
        msg = (
            f"Cannot write {p}: it is a symbolic link to {os.readlink(p)!r}, which does not exist. Expected a "
            "regular file, a new path or a link to an existing file; remove the link or choose another path."
        )
        raise OutputError(msg)
    return real


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover


def _free_bytes(folder: Path) -> int | None:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(_existing_ancestor(folder)).free
    return None


def _free_text(folder: Path) -> str:
    free = _free_bytes(folder)
    return "free space unknown" if free is None else f"{_human(free)} ({free} bytes) free in {folder}"


def _existing_ancestor(folder: Path) -> Path:
    p = folder
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def output_error(
    target: PathLike, err: BaseException, *, existed: bool | None = None, temp: PathLike | None = None
) -> OutputError | None:
    """The :class:`OutputError` for an ``OSError`` met while writing ``target``, or None when it is not an output
    fault (a full disk, quota, file-size limit, read-only or forbidden folder).

    Args:
        target: the final output path.
        err: the error (its ``__cause__``/``__context__`` chain is searched for an ``OSError``).
        existed: whether an output was at ``target`` before the write (default: look now).
        temp: the temporary being written (a permission error on it is an output fault).
    """
    path = Path(target)
    os_err = _find_oserror(err)
    if os_err is None:
        return None
    code = os_err.errno
    was = path.exists() if existed is None else existed
    kept = f"the previous {path.name} is unchanged" if was else "no partial file was left"
    detail = f"{os_err.strerror or os.strerror(code)}, {errno.errorcode.get(code, code)}"
    if code in _SPACE_ERRNOS:
        msg = (
            f"Cannot write {path}: {_SPACE_ERRNOS[code]} ({detail}); {_free_text(path.parent)}. Nothing was "
            f"written and {kept}. Free some space (or raise the limit), or write to another folder (-o/--out)."
        )
        return OutputError(msg)
    if not _is_ours(os_err.filename, path, temp):
        return None  # a permission error on another file (an input that cannot be read, say)
    msg = (
        f"Cannot write {path}: the folder {path.parent} is not writable ({detail}). Expected a folder this user "
        f"can create files in; {kept}. Choose another output path (-o/--out), or make the folder writable "
        "(check its permissions, or whether the file system is mounted read-only)."
    )
    return OutputError(msg)


def _is_ours(filename: Any, target: Path, temp: PathLike | None) -> bool:
    if filename is None:
        return True
    where = Path(os.fsdecode(filename))
    if where in (target, target.parent) or (temp is not None and where == Path(temp)):
        return True
    return where.parent == target.parent and _temp_pattern(target).match(where.name) is not None


def _find_oserror(err: BaseException | None) -> OSError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (*_SPACE_ERRNOS, *_DENIED_ERRNOS):
            return err
        err = err.__cause__ or err.__context__
    return None


def _appeared(target: Path) -> OutputError:
    msg = (
        f"Cannot write {target}: it appeared while this run was computing (another process wrote it). Nothing was "
        "overwritten and this run's result was discarded. Pass --overwrite (overwrite=True) to replace it, or "
        "choose another path."
    )
    return OutputError(msg)


def probe_writable(folder: PathLike, *, target: PathLike | None = None) -> None:
    """Check that a file can be created in ``folder`` (or the nearest existing folder above it, which is where the
    missing ones will be created) by creating and removing an exclusive temporary file. ``os.access`` is not
    enough: it says yes to root on a read-only mount, and to anyone on a full disk.

    Args:
        folder: the folder that will receive the output.
        target: the output (named in the message; default ``folder``).

    Raises:
        OutputError: the folder is read-only, forbidden or full.
    """
    base = _existing_ancestor(Path(folder))
    shown = Path(target) if target is not None else Path(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=_prefix(shown), suffix=".tmp", dir=base)
    except OSError as err:
        if err.errno in _DENIED_ERRNOS:
            detail = f"{err.strerror or os.strerror(err.errno)}, {errno.errorcode.get(err.errno, err.errno)}"
            msg = (
                f"Cannot write {shown}: the folder {base} is not writable ({detail}). Expected a folder this user "
                "can create files in; nothing was computed. Choose another output path (-o/--out), or make the "
                "folder writable (check its permissions, or whether the file system is mounted read-only)."
            )
            raise OutputError(msg) from err
        converted = output_error(base / shown.name, err, existed=False)
        if converted is None:
            raise
        raise converted from err
    os.close(fd)
    os.unlink(name)


def check_free_space(path: PathLike, nbytes: int, *, what: str = "the output") -> None:
    """Refuse before any compute when the folder of ``path`` clearly has less free space than ``nbytes``.

    Raises:
        OutputError: fewer than ``nbytes`` bytes are free there.
    """
    target = Path(path)
    free = _free_bytes(target.parent)
    if free is None or nbytes <= free:
        return
    msg = (
        f"Cannot write {target}: {what} needs about {_human(nbytes)} ({nbytes} bytes) but only {_free_text(target.parent)}. "
        "Nothing was computed. Free some space, or write to another folder (-o/--out)."
    )
    raise OutputError(msg)


# -- commits ----------------------------------------------------------------------------------------------------
def _chmod(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError as err:  # file systems without Unix modes (FAT, some network shares)
        logger.debug("could not set the mode of %s: %s", path, err)


def commit_file(tmp: Path, target: Path, *, replace: bool) -> None:
    """Move a finished temporary onto ``target`` with the output's final mode; ``replace=False`` never replaces a
    file that appeared meanwhile (OutputError), using a no-replace hard link."""
    _chmod(tmp, _final_mode(target))
    if replace:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails with EEXIST, atomically, when anything appeared at target
    except FileExistsError:
        raise _appeared(target) from None
    except OSError as err:
        if err.errno not in _NO_LINK_ERRNOS:
            raise
        # No hard links here (FAT, some network file systems): check, then rename (a short window remains).
        if os.path.lexists(target):
            raise _appeared(target) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _fail(
    tmp: Path | None, target: Path, err: BaseException, existed: bool, *, directory: bool = False
) -> None:
    """Remove the temporary, then raise ``err`` as an OutputError when it is an output fault."""
    if tmp is not None:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
    if isinstance(err, OutputError):
        return
    converted = output_error(target, err, existed=existed, temp=tmp)
    if converted is not None:
        raise converted from err


def _check_parent(target: Path) -> None:
    if not target.parent.is_dir():
        msg = f"Cannot write {target}: the folder {target.parent} does not exist. Create it first."
        raise MsfmInputError(msg)


@contextlib.contextmanager
def atomic_write(
    path: PathLike, mode: Literal["w", "wb"] = "wb", *, encoding: str = "utf-8", replace: bool = True
) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing and move it onto ``path`` when the block succeeds.

    If the block raises, the temporary file is removed and an existing ``path`` is left untouched. See the module
    docstring for modes, symbolic links, temporary names and the stale-temporary sweep.

    Args:
        path: Final file path. Its parent folder must exist.
        mode: ``"wb"`` for bytes, ``"w"`` for text.
        encoding: Text encoding (only for ``mode="w"``).
        replace: replace an output that exists when the block ends (the last writer wins). With False, an output
            that appeared meanwhile is never replaced: ``OutputError``.

    Yields:
        The open file object to write to.

    Raises:
        MsfmInputError: If ``mode`` is not a write mode or the parent folder does not exist.
        OutputError: a full disk, quota or file-size limit, a folder that cannot be written, or (``replace=False``)
            a target that appeared while the block ran.

    Example:
        >>> with atomic_write("out.bin") as fh:  # doctest: +SKIP
        ...     fh.write(b"payload")
    """
    if mode not in ("w", "wb"):
        msg = f"atomic_write got mode={mode!r}; expected 'w' (text) or 'wb' (bytes)."
        raise MsfmInputError(msg)
    target = resolve_output(path)
    _check_parent(target)
    existed = target.exists()
    sweep_stale(target)
    tmp: Path | None = None
    try:
        fd, tmp = temp_file_for(target)
        text_kwargs = {"encoding": encoding, "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        commit_file(tmp, target, replace=replace)
        fsync_dir(target.parent)
    except BaseException as err:
        _fail(tmp, target, err, existed)
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike, *, suffix: str = "", replace: bool = True) -> Iterator[Path]:
    """A fresh temporary sibling path for writers that need a file name (h5py, anndata, numpy); moved onto
    ``path`` when the block succeeds.

    The temporary name is unpredictable and created exclusively (``mkstemp``), so no existing file or planted
    link is ever opened. The writer may replace the empty placeholder. If the block raises, the temporary file is
    removed and an existing ``path`` is left untouched; an ``OSError`` of a full disk or an unwritable folder
    becomes ``OutputError``.

    Args:
        path: final file path; its folder must exist.
        suffix: suffix of the temporary name (``".h5ad"`` keeps writers from second-guessing the format).
        replace: see :func:`atomic_write`.

    Yields:
        The temporary path to write.
    """
    target = resolve_output(path)
    _check_parent(target)
    existed = target.exists()
    sweep_stale(target)
    tmp: Path | None = None
    try:
        fd, tmp = temp_file_for(target, suffix)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        commit_file(tmp, target, replace=replace)
        fsync_dir(target.parent)
    except BaseException as err:
        _fail(tmp, target, err, existed)
        raise


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


def atomic_write_bytes(path: PathLike, data: bytes, *, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (``replace``: see :func:`atomic_write`).

    Args:
        path: Final file path.
        data: Bytes to write.
        replace: replace an existing file.

    Returns:
        The written path.
    """
    with atomic_write(path, "wb", replace=replace) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8", replace: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: Final file path.
        text: Text to write.
        encoding: Text encoding.
        replace: replace an existing file (see :func:`atomic_write`).

    Returns:
        The written path.
    """
    with atomic_write(path, "w", encoding=encoding, replace=replace) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, replace: bool = True) -> Path:
    """Serialise ``obj`` as JSON and write it to ``path`` atomically.

    The object is serialised before the file is opened, so an object that is not JSON-serialisable never leaves
    a temporary file behind.

    Args:
        path: Final file path.
        obj: A JSON-serialisable object (dicts, lists, strings, numbers, booleans, None).
        indent: Indentation passed to :func:`json.dumps`.
        replace: replace an existing file (see :func:`atomic_write`).

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
    return atomic_write_text(path, text + "\n", replace=replace)


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in at ``path`` when the block succeeds.

    An existing directory at ``path`` is moved aside only after the new one is complete, then deleted. Between the
    two renames (microseconds) a crash can leave the old directory under a hidden ``.NAME.msfm-...old`` sibling
    instead of at ``path`` (the next write to ``path`` sweeps it once its process is gone); the new content is
    never half-written. A new directory gets ``0o777 & ~umask``, a replaced one keeps its permission bits.

    Args:
        path: Final directory path. Its parent folder is created if missing.
        replace: replace an existing directory. With False, a directory that appeared while the block ran is
            never replaced: ``OutputError``.

    Yields:
        The temporary directory to fill.

    Raises:
        MsfmInputError: If ``path`` exists and is a file.
        OutputError: a full disk or a folder that cannot be written, or (``replace=False``) ``path`` appeared.
    """
    target = resolve_output(path)
    if target.exists() and not target.is_dir():
        msg = f"Cannot write the directory {target}: a file with that name exists. Remove it or choose another path."
        raise MsfmInputError(msg)
    existed = target.exists()
    tmp: Path | None = None
    old: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target)
        tmp = _mkdtemp(target)
        yield tmp
        _chmod(tmp, _final_mode(target, directory=True))
        fsync_dir(tmp)
        for attempt in range(2):
            if os.path.lexists(target):
                if not replace or not target.is_dir():
                    raise _appeared(target)
                old = _mkdtemp(target, "old")  # an empty, exclusively created name; the rename replaces it
                os.replace(target, old)
            try:
                os.rename(tmp, target)
                break
            except OSError as err:
                # Another writer put a directory there between the check and the rename.
                if attempt or err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
        fsync_dir(target.parent)
    except BaseException as err:
        if old is not None and not os.path.lexists(target):
            try:
                os.replace(old, target)  # put the previous directory back
            except OSError:
                logger.warning("the previous content of %s is kept in %s", target, old)
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fail(tmp, target, err, existed, directory=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_free(path: PathLike, *, overwrite: bool) -> Path:
    """Check an output path before any compute; returns the path.

    Refuses to replace an existing output unless asked to, refuses a dangling symbolic link, and checks that the
    output's folder (or the nearest existing folder above it, when the folders are still to be created) is
    writable by creating and removing a temporary file there.

    Raises:
        OutputError: ``path`` exists and ``overwrite`` is False, it is a dangling link, or its folder is read-only,
            forbidden or full.
    """
    p = Path(path)
    real = resolve_output(p)
    if real.exists() and not overwrite:
        msg = f"Output {p} already exists. Pass --overwrite (overwrite=True) or choose another path."
        raise OutputError(msg)
    probe_writable(real.parent, target=real)
    return p
