"""``msfm roam heatmap``: slide attention heatmaps, top/bottom ROI galleries and ROI-level attention maps.

For each slide it writes ``OUT/<slide>/``::

    heatmap.png            thumbnail | attention overlay (jet, alpha 0.4, blurred; CLAM/ROAM style), with a title,
                           a colour bar naming the scale and the raw attention range
    rois.h5ad              one observation per ROI (scverse spatial layout: obsm["spatial"], thumbnail in
                           uns["spatial"]); msfm.pl.slide_heatmap(adata, color=...) redraws it
    gallery.png            the top-k and bottom-k ROIs of the class shown, with their scores
    roi_maps/roi<i>.png    ROI-level maps (20x, 10x, 5x and fused) over the ROI, for the top --roi-maps ROIs
    roi_maps/roi<i>.npz    the raw per-scale maps of that ROI (8x8, 4x4, 2x2)
    scores.csv             roi, x, y, score (softmax over ROIs of the class shown), percentile, rank
    summary.json           predicted class, probabilities, class shown, models, options

A training run directory (``RUN/fold*/best``) is averaged like the release: raw attention scores are averaged over
the folds before the softmax over ROIs, and the class shown is the ensemble prediction unless ``--class`` is given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from msfm.cli.options import Checkpoint, Device, OutDir, Overwrite, Quiet

logger = logging.getLogger(__name__)

__all__ = ["heatmap", "register"]


def heatmap(
    features: Annotated[Path, typer.Argument(help="Feature folder (msfm roam preprocess -o).")],
    checkpoint: Checkpoint,
    out: OutDir,
    slides: Annotated[
        list[str] | None,
        typer.Option(
            "--slides",
            "-s",
            help="Slide ids, or slide files (their stem is the id and the file is drawn); repeat or comma-separate. "
            "Default: every feature file.",
        ),
    ] = None,
    class_name: Annotated[
        str | None,
        typer.Option("--class", help="Class to show (name or index). Default: the predicted class."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="ROIs in the top row of the gallery.")] = 10,
    bottom_k: Annotated[int, typer.Option("--bottom-k", help="ROIs in the bottom row (0: none).")] = 5,
    roi_maps: Annotated[int, typer.Option("--roi-maps", help="ROI-level maps for this many top ROIs.")] = 3,
    method: Annotated[
        str, typer.Option(help="ROI maps: grad_rollout | grad_cam | rollout.")
    ] = "grad_rollout",
    row_normalisation: Annotated[
        bool,
        typer.Option(
            "--row-normalisation",
            help="Rollout with true row normalisation instead of the released column-sum quirk.",
        ),
    ] = False,
    colour_by: Annotated[str, typer.Option(help="percentile (as released) | score.")] = "percentile",
    slide_dir: Annotated[
        Path | None, typer.Option(help="Folder of the slide files (when the recorded slide_path moved).")
    ] = None,
    thumbnail_size: Annotated[
        int, typer.Option(help="Longest side of the slide thumbnail (in heatmap.png and rois.h5ad), pixels.")
    ] = 1000,
    alpha: Annotated[float, typer.Option(help="Opacity of the heatmap colours.")] = 0.4,
    blur: Annotated[bool, typer.Option("--blur/--no-blur", help="Smooth the slide heatmap.")] = True,
    roi_px: Annotated[
        int, typer.Option(help="Pixels per side of the ROI images in gallery and ROI maps.")
    ] = 512,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Attention heatmaps of slides: slide overlay, ROI gallery and ROI-level maps (-o: one folder per slide).

    -c takes a run directory (its folds are averaged), a checkpoint directory, or checkpoints joined by '+'.
    """
    from msfm.models.roam.heatmaps import heatmap as _heatmap

    result = _heatmap(
        features,
        checkpoint,
        out=out,
        slides=slides,
        class_name=class_name,
        top_k=top_k,
        bottom_k=bottom_k,
        roi_maps=roi_maps,
        method=method,
        row_normalisation=row_normalisation,
        colour_by=colour_by,
        slide_dir=slide_dir,
        thumbnail_size=thumbnail_size,
        alpha=alpha,
        blur=blur,
        roi_px=roi_px,
        device=device,
        overwrite=overwrite,
        progress=not quiet,
    )
    for d in result.table.itertuples():
        typer.echo(f"{d.slide_id}: {d.class_shown} (predicted {d.predicted_class}) -> {d.out}")


def register(app: typer.Typer) -> None:
    """Add ``heatmap`` to the ``msfm roam`` app."""
    app.command("heatmap")(heatmap)
