"""``msfm roam <verb>``: convert, preprocess, train, predict, evaluate, cascade, heatmap (thin over ``msfm.roam``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msfm.cli import roam_interpret, roam_predict, roam_preprocess, roam_train
from msfm.cli.options import OutDir, Overwrite

app = typer.Typer(
    help=(
        "ROAM: whole-slide images -> multi-scale ROI features -> ROI pyramid transformer with class-specific "
        "attention MIL. Preprocess slides, train with cross-validation, predict (also as a cascade of tasks), "
        "and draw slide- and ROI-level heatmaps."
    ),
    no_args_is_help=True,
)


@app.command("convert")
def convert(
    official: Annotated[
        Path, typer.Argument(help="Released ROAM_split<k>.pth (read with weights_only=True).")
    ],
    out: OutDir,
    class_names: Annotated[
        str | None,
        typer.Option(help="Comma-separated class names in logit order, e.g. astro,oligo,ependymoma."),
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task name stored with the weights.")] = None,
    encoder: Annotated[str, typer.Option(help="Patch encoder the features come from.")] = "resnet50_trunc",
    fold: Annotated[int | None, typer.Option(help="CV fold of this file (provenance).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Convert a released ROAM fold checkpoint into an msfm checkpoint directory."""
    from msfm.models.roam.checkpoint import convert as _convert

    path = _convert(
        official, out, class_names=class_names, task=task, encoder=encoder, fold=fold, overwrite=overwrite
    )
    typer.echo(f"wrote {path}")


roam_preprocess.register(app)
roam_train.register(app)
roam_predict.register(app)
roam_interpret.register(app)
