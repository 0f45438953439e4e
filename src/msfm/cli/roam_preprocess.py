"""``msfm roam preprocess``: slides -> ROI feature files (``register(app)`` adds the command to ``msfm roam``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from msfm.errors import MsfmInputError

__all__ = ["preprocess", "register"]


def _json_dict(text: str | None, option: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        msg = f"{option} must be a JSON object, e.g. '{{\"min_tissue_area_um2\": 10000}}'; got {text!r} ({err})."
        raise MsfmInputError(msg) from err
    if not isinstance(value, dict):
        msg = f"{option} must be a JSON object; got {text!r}."
        raise MsfmInputError(msg)
    return value


def preprocess(
    slides: Annotated[
        list[Path],
        typer.Argument(help="Slide files, folders (searched recursively) or CSV files with a 'path' column."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (features/, qc/, reports/).")],
    encoder: Annotated[
        str, typer.Option(help="resnet50_trunc (needs --weights) | colour_stats | tiny | timm:<model>")
    ] = "resnet50_trunc",
    weights: Annotated[
        Path | None, typer.Option(help="Local encoder weights file (never downloaded).")
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(help="Encoder input side (resnet50_trunc: 224 default, 256 = ROAM's extractor)."),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option("--random-init", help="Random encoder weights: speed tests only, features meaningless."),
    ] = False,
    shard: Annotated[str | None, typer.Option(help="i/n: process only shard i (0-based) of n.")] = None,
    stain_norm: Annotated[str, typer.Option(help="none | macenko | reinhard")] = "none",
    stain_target: Annotated[
        Path | None, typer.Option(help="Stain target image (default: the bundled H&E target).")
    ] = None,
    preset: Annotated[
        str, typer.Option(help="Tissue preset: default | biopsy | resection | permissive")
    ] = "default",
    tissue: Annotated[
        str | None, typer.Option(help="JSON of TissueParams fields to override, e.g. '{\"use_otsu\": true}'.")
    ] = None,
    min_tissue: Annotated[float, typer.Option(help="Smallest tissue fraction of a kept ROI.")] = 0.1,
    mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of every slide (for slides without mpp metadata).")
    ] = None,
    target_mpp: Annotated[float, typer.Option(help="Microns per pixel of the ROIs (0.5 = 20x).")] = 0.5,
    roi_size: Annotated[
        int, typer.Option(help="ROI side in pixels at --target-mpp (8 x --patch-size).")
    ] = 2048,
    patch_size: Annotated[int | None, typer.Option(help="Patch side (default --roi-size / 8).")] = None,
    step: Annotated[int | None, typer.Option(help="ROI step at --target-mpp (default --roi-size).")] = None,
    keep_background: Annotated[
        bool, typer.Option("--keep-background", help="Keep blank ROIs (red-channel std < 5).")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Patches per encoder forward (whole ROIs).")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    workers: Annotated[int, typer.Option(help="Slides processed in parallel (processes).")] = 1,
    read_threads: Annotated[int, typer.Option(help="Reader threads per slide.")] = 2,
    backend: Annotated[str, typer.Option(help="auto | openslide | tiffslide | image")] = "auto",
    no_qc: Annotated[bool, typer.Option("--no-qc", help="Do not write QC images.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo slides that are already done.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Tile slides into 2048-px ROIs at 20x, embed each ROI's 84 multi-scale patches, write one .h5 per slide.

    Resumable (finished slides are skipped), one bad slide does not stop the batch, and the exit status is 1
    when any slide failed (after the summary table). Reports: OUT/reports/report[.shard-i-of-n].csv.
    """
    from msfm.models.roam.preprocess import PreprocessConfig, preprocess_slides, summarize

    options: dict[str, Any] = {}
    if input_size is not None:
        options["input_size"] = input_size
    if random_init:
        options["random_init"] = True
    try:
        config = PreprocessConfig(
            target_mpp=target_mpp,
            roi_size=roi_size,
            patch_size=patch_size if patch_size is not None else max(1, roi_size // 8),
            step=step,
            tissue_preset=preset,
            tissue_overrides=_json_dict(tissue, "--tissue"),
            min_tissue=min_tissue,
            skip_background=not keep_background,
            stain_norm=stain_norm.lower(),
            stain_target=str(stain_target) if stain_target is not None else None,
            encoder=encoder,
            weights=str(weights) if weights is not None else None,
            encoder_options=options,
            mpp=mpp,
            backend=backend,
            batch_size=batch_size,
            device=device,
            workers=workers,
            read_threads=read_threads,
            qc=not no_qc,
        )
    except MsfmInputError:
        raise
    except Exception as err:  # pydantic ValidationError: say which option is wrong
        msg = f"Invalid preprocessing options: {err}"
        raise MsfmInputError(msg) from err
    report = preprocess_slides(slides, out, config, shard=shard, overwrite=overwrite, progress=not quiet)
    _print_summary(report)
    counts = summarize(report)
    if counts["failed"]:
        typer.secho(
            f"{counts['failed']} of {len(report)} slides failed; see the error column of the report in "
            f"{out / 'reports'}. Fix them and run the same command again: finished slides are skipped.",
            fg=typer.colors.RED,
            err=True,
        )
        # SystemExit, not typer.Exit: in non-standalone mode (msfm.cli.main) click turns typer.Exit into a return
        # value, which would lose the status.
        raise SystemExit(1)


def _print_summary(report: Any) -> None:
    """A table of the report (rich when available) and the counts per status."""
    from msfm.models.roam.preprocess import summarize

    counts = summarize(report)
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # pragma: no cover - rich ships with typer
        for rec in report.itertuples():
            typer.echo(f"{rec.slide_id}\t{rec.status}\t{rec.n_roi}\t{rec.seconds}\t{rec.error}")
    else:
        table = Table(title="msfm roam preprocess", show_lines=False)
        for col in ("slide", "status", "ROIs", "background", "seconds", "error"):
            table.add_column(col, overflow="fold")
        colour = {"ok": "green", "skipped": "cyan", "failed": "red"}
        for rec in report.itertuples():
            # Text, not markup: error messages contain brackets ([n_roi, 84, d]) that rich would parse.
            table.add_row(
                Text(str(rec.slide_id)),
                Text(str(rec.status), style=colour.get(str(rec.status), "")),
                str(rec.n_roi),
                str(rec.n_background),
                f"{float(rec.seconds):.1f}",
                Text(str(rec.error) if isinstance(rec.error, str) else ""),
            )
        Console(width=160).print(table)
    typer.echo(
        f"ok {counts['ok']}, skipped {counts['skipped']}, failed {counts['failed']} (of {len(report)})"
    )


def register(app: typer.Typer) -> None:
    """Add ``preprocess`` to a typer app (``msfm roam``)."""
    app.command("preprocess")(preprocess)
