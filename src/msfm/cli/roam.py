"""``msfm roam <verb>``: convert, preprocess, train, predict, evaluate, cascade, heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msfm.cli import roam_interpret, roam_preprocess, roam_train
from msfm.runtime.atomic import check_output_free

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
    out: Annotated[Path, typer.Option("--out", "-o", help="msfm checkpoint directory to write.")],
    class_names: Annotated[
        str | None,
        typer.Option(help="Comma-separated class names in logit order, e.g. astro,oligo,ependymoma."),
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task name stored with the weights.")] = None,
    encoder: Annotated[str, typer.Option(help="Patch encoder the features come from.")] = "resnet50_trunc",
    fold: Annotated[int | None, typer.Option(help="CV fold of this file (provenance).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
) -> None:
    """Convert a released ROAM fold checkpoint into an msfm checkpoint directory."""
    from msfm.models.roam.checkpoint import convert_official

    check_output_free(out, overwrite=overwrite)
    names = [c.strip() for c in class_names.split(",") if c.strip()] if class_names else None
    path = convert_official(official, out, class_names=names, task=task, encoder=encoder, fold=fold)
    typer.echo(f"wrote {path}")


roam_preprocess.register(app)
roam_train.register(app)
roam_interpret.register(app)
