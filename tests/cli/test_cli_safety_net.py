"""The CLI reports a stray file-system OSError in one line with exit status 2 (writers raise OutputError first)."""

from __future__ import annotations

import errno
import os

import pytest

import msfm.cli as cli


def _raising(exc: BaseException):
    def app(*args, **kwargs):
        raise exc

    return app


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_file_system_errors_are_one_line_with_exit_2(monkeypatch, capsys, code):
    monkeypatch.delenv("MSFM_DEBUG", raising=False)
    monkeypatch.setattr(cli, "app", _raising(OSError(code, os.strerror(code), "/data/out.h5ad")))
    with pytest.raises(SystemExit) as info:
        cli.main(["datasets", "list"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "/data/out.h5ad" in err
    assert os.strerror(code) in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_other_os_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "app", _raising(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        cli.main(["datasets", "list"])


def test_msfm_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("MSFM_DEBUG", "1")
    monkeypatch.setattr(cli, "app", _raising(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        cli.main(["datasets", "list"])
