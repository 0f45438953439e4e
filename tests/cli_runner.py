"""Run the ``msfm`` CLI in-process the way a shell would, for the CLI tests (importable: ``pythonpath`` has tests/)."""

from __future__ import annotations

from msfm.cli import main


def run_cli(*args: object) -> int:
    """``msfm ARGS...`` through :func:`msfm.cli.main`; returns the exit status (0 when it returns normally)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
