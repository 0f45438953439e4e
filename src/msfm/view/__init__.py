"""``msfm view``: a local web viewer for slides (deep zoom + ROAM attention), spatial perturbation and embeddings.

:func:`create_app` builds the Starlette application over what :func:`msfm.view.sources.discover` finds;
:func:`serve` checks the binding (loopback, or a token), prints the URL and runs it with uvicorn. Starlette and
uvicorn are imported only here, on use, so ``import msfm`` stays fast. See ``docs/viewer.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["create_app", "serve"]

PathLike = str | os.PathLike[str]

#: ``token`` value meaning "generate one when the host is not loopback, none on loopback".
AUTO = "auto"


def create_app(
    paths: list[PathLike],
    *,
    spatial: list[PathLike] | None = None,
    checkpoint: PathLike | None = None,
    token: str | None = None,
    jobs_root: PathLike | None = None,
    device: str = "auto",
) -> Any:
    """The viewer's ASGI application (Starlette).

    Args:
        paths: Demo output folders, ROAM heatmap folders, slide files, ``.h5ad`` files.
        spatial: Extra spatial ``.h5ad`` files.
        checkpoint: GeST checkpoint for perturbations of every spatial data set.
        token: Require this token on every request (None: no token).
        jobs_root: Folder for job results (default: a private temporary folder removed at shutdown).
        device: Device of GeST perturbations (``auto``, ``cpu``, ``cuda``...).

    Raises:
        MsfmInputError: a missing path or nothing to show.
    """
    from msfm.view.app import build_app
    from msfm.view.sources import discover

    sources = discover(list(paths), spatial=list(spatial or []), checkpoint=checkpoint)
    return build_app(
        sources, token=token, jobs_root=Path(jobs_root) if jobs_root is not None else None, device=device
    )


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to use: ``auto`` -> a fresh one off loopback, none on loopback; anything else as given.

    Raises:
        MsfmInputError: a non-loopback host without a token, or a token with characters a URL would mangle.
    """
    import re

    from msfm.errors import MsfmInputError
    from msfm.view.security import check_bind, is_loopback, new_token

    if token == AUTO:
        token = None if is_loopback(host) else new_token()
    if token and not re.fullmatch(r"[A-Za-z0-9._~-]{8,}", token):
        msg = (
            "--token must be at least 8 characters from A-Z a-z 0-9 . _ ~ - (it travels in URLs and a cookie); "
            "leave it unset to have a random one generated."
        )
        raise MsfmInputError(msg)
    check_bind(host, token)
    return token or None


def serve(
    paths: list[PathLike],
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = AUTO,
    open_browser: bool = True,
    *,
    spatial: list[PathLike] | None = None,
    checkpoint: PathLike | None = None,
    device: str = "auto",
) -> None:
    """Serve the viewer until interrupted; prints the URL (with the token).

    Args:
        paths: What to show (see :func:`create_app`).
        host: Interface to bind; anything but loopback requires a token.
        port: TCP port (0: any free port).
        token: ``"auto"`` (default: generated when ``host`` is not loopback), a token, or None for no token
            (refused off loopback).
        open_browser: Open the URL in the default browser.
        spatial, checkpoint, device: See :func:`create_app`.

    Raises:
        MsfmInputError: a non-loopback host without a token, or bad paths.
    """
    import socket
    import sys

    token = resolve_token(host, token)
    app = create_app(paths, spatial=spatial, checkpoint=checkpoint, token=token, device=device)
    import uvicorn

    # Bind the socket here so port 0 resolves to a real port before the URL is printed.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    real_port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{real_port}/" + (f"?token={token}" if token else "")
    # The URL (with its token) is the one thing the user needs: on stdout, as Jupyter prints it.
    sys.stdout.write(f"msfm view is serving {_summary(app)} at\n    {url}\nPress Ctrl+C to stop.\n")
    sys.stdout.flush()
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


def _summary(app: Any) -> str:
    s = app.state.viewer.sources
    return f"{len(s.slides)} slides, {len(s.spatial)} spatial data sets, {len(s.cells)} cell sets"
