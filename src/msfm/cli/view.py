"""``msfm view PATH...``: start the local web viewer (slides, spatial perturbation, embeddings); parsing only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def view(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Demo output folders, ROAM heatmap folders, slide files or .h5ad files to show."),
    ],
    spatial: Annotated[
        list[Path] | None,
        typer.Option("--spatial", help="Spatial .h5ad (obsm['spatial']) to show; repeat for several."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", "-c", help="GeST checkpoint (RUN/model) that perturbs the spatial data."
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(help="Interface to bind; anything but loopback requires a token (one is generated)."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 0,
    token: Annotated[
        str | None,
        typer.Option(help="Token every request must carry (default: generated when --host is not loopback)."),
    ] = None,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Do not open a browser; just print the URL.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="Device of GeST perturbations: auto, cpu, cuda, cuda:N, mps.")
    ] = "auto",
) -> None:
    """Serve an interactive viewer of slides (deep zoom, ROAM attention, ROIs), spatial GeST perturbation and cell
    embeddings on 127.0.0.1, and print its URL. See docs/viewer.md."""
    from msfm.view import AUTO, serve

    serve(
        list(paths),
        host=host,
        port=port,
        token=AUTO if token is None else token,
        open_browser=not no_browser,
        spatial=list(spatial or []),
        checkpoint=checkpoint,
        device=device,
    )
