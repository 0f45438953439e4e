"""The ``msfm`` command line: one typer app, ``msfm <family> <verb>``, thin over the Python API.

Bad input (``MsfmInputError``/``CheckpointError``) prints one clear message and exits with status 2;
set ``MSFM_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import errno
import os
import sys

import typer

from msfm._version import __version__
from msfm.cli.gest import app as gest_app
from msfm.cli.logging_setup import configure_logging
from msfm.cli.roam import app as roam_app
from msfm.cli.scfoundation import app as scfoundation_app
from msfm.cli.scmulan import app as scmulan_app
from msfm.cli.tools import bench_app, datasets_app, demo
from msfm.cli.view import view
from msfm.cli.weights import app as weights_app

app = typer.Typer(
    name="msfm",
    help="Multiscale biological foundation models: scFoundation, scMulan, ROAM, GeST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"msfm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the msfm version and exit."
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Also show Lightning's start-up messages, model summaries and configuration warnings "
        "(or set MSFM_VERBOSE=1).",
    ),
    quiet: bool = typer.Option(
        False,
        "--quiet",
        help="Show only warnings and errors (or set MSFM_QUIET=1); progress bars are per verb.",
    ),
) -> None:
    """Multiscale biological foundation models: scFoundation, scMulan, ROAM, GeST."""
    configure_logging(verbose=verbose, quiet=quiet)


app.add_typer(scfoundation_app, name="scfoundation")
app.add_typer(scmulan_app, name="scmulan")
app.add_typer(roam_app, name="roam")
app.add_typer(gest_app, name="gest")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")
app.add_typer(weights_app, name="weights")
app.command("demo")(demo)
app.command("view")(view)


def _plain_help_text(typer_app: typer.Typer) -> None:
    """Read every help text of ``typer_app`` and its sub-apps literally: with Rich markup on (typer's default),
    ``obs["label"]`` or ``[a, b]`` in a docstring is taken for a markup tag and silently dropped from ``--help``."""
    typer_app.rich_markup_mode = None
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _plain_help_text(group.typer_instance)


_plain_help_text(app)


@app.command("version")
def version() -> None:
    """Print the msfm version."""
    typer.echo(__version__)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and abort classes of click and of the click copy that newer typer versions vendor."""
    import click

    usage: list[type] = [click.exceptions.ClickException]
    abort: list[type] = [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.24 ships its own click
    except ImportError:
        pass
    else:
        usage.append(vendored.ClickException)
        # Abort moved between modules across typer versions; take it wherever it is.
        vendored_abort = getattr(vendored, "Abort", None)
        if vendored_abort is None:
            import typer

            vendored_abort = getattr(typer, "Abort", None)
        if isinstance(vendored_abort, type):
            abort.append(vendored_abort)
    return tuple(usage), tuple(abort)


# Full disk, quota, file too large, read-only file system, permission denied.
_FILESYSTEM_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM")
    if hasattr(errno, name)
)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    from msfm.errors import CheckpointError, MsfmInputError

    configure_logging()  # from the environment; the root options (--verbose, --quiet) refine it
    try:
        rc = app(args=argv, standalone_mode=False)
        # Without standalone mode click returns the code of `typer.Exit(n)` instead of exiting with it.
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except (MsfmInputError, CheckpointError, FileNotFoundError) as err:
        if os.environ.get("MSFM_DEBUG"):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except OSError as err:
        # A safety net: the writers turn these into OutputError themselves; one that slips through (a third-party
        # writer, a log file) is still reported as one line about the file system, not as a traceback.
        if os.environ.get("MSFM_DEBUG") or err.errno not in _FILESYSTEM_ERRNOS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        typer.secho(
            f"error: the file system refused an operation{where}: {err.strerror or err}. Check free space "
            "(df -h), write permissions and that the folder is not read-only, then run the command again; "
            "MSFM_DEBUG=1 shows the traceback.",
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(2)
    except Exception as err:  # usage errors come through here in non-standalone mode
        usage, abort = _click_exception_types()
        if isinstance(err, usage):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
