"""``msfm roam preprocess``: slides -> ROI feature files (``register(app)`` adds the command to ``msfm roam``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from msfm.cli.options import BatchSize, Config, Device, OutDir, Overwrite, Quiet
from msfm.errors import MsfmInputError

__all__ = ["preprocess", "register"]


def _json_dict(text: str | None, option: str) -> dict[str, Any] | None:
    if not text:
        return None
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
    out: OutDir,
    config: Config = None,
    encoder: Annotated[
        str | None,
        typer.Option(help="resnet50_trunc (default; needs --weights) | colour_stats | tiny | timm:<model>"),
    ] = None,
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
    stain_norm: Annotated[str | None, typer.Option(help="none (default) | macenko | reinhard")] = None,
    stain_target: Annotated[
        Path | None, typer.Option(help="Stain target image (default: the bundled H&E target).")
    ] = None,
    tissue: Annotated[
        str | None, typer.Option(help="Tissue preset: default | biopsy | resection | permissive")
    ] = None,
    tissue_overrides: Annotated[
        str | None,
        typer.Option(help="JSON of TissueParams fields to override, e.g. '{\"use_otsu\": true}'."),
    ] = None,
    min_tissue: Annotated[
        float | None, typer.Option(help="Smallest tissue fraction of a kept ROI (default 0.1).")
    ] = None,
    mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of every slide (for slides without mpp metadata).")
    ] = None,
    target_mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of the ROIs (default 0.5 = 20x).")
    ] = None,
    roi_size: Annotated[
        int | None, typer.Option(help="ROI side in pixels at --target-mpp (default 2048 = 8 x --patch-size).")
    ] = None,
    patch_size: Annotated[int | None, typer.Option(help="Patch side (default --roi-size / 8).")] = None,
    step: Annotated[int | None, typer.Option(help="ROI step at --target-mpp (default --roi-size).")] = None,
    keep_background: Annotated[
        bool, typer.Option("--keep-background", help="Keep blank ROIs (red-channel std < 5).")
    ] = False,
    batch_size: BatchSize = None,
    device: Device = None,
    workers: Annotated[int | None, typer.Option(help="Slides processed in parallel (processes).")] = None,
    read_threads: Annotated[int | None, typer.Option(help="Reader threads per slide.")] = None,
    backend: Annotated[str | None, typer.Option(help="auto | openslide | tiffslide | image")] = None,
    no_qc: Annotated[bool, typer.Option("--no-qc", help="Do not write QC images.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Tile slides into 2048-px ROIs at 20x, embed each ROI's 84 multi-scale patches, write one .h5 per slide.

    Resumable (finished slides are skipped; --overwrite redoes them), one bad slide does not stop the batch, and
    the exit status is 1 when any slide failed (after the summary table). Reports:
    OUT/reports/report[.shard-i-of-n].csv.
    """
    from msfm.models.roam.preprocessing import preprocess as _preprocess

    options: dict[str, Any] = {}
    if input_size is not None:
        options["input_size"] = input_size
    if random_init:
        options["random_init"] = True
    overrides: dict[str, Any] = {
        "encoder": encoder,
        "weights": str(weights) if weights is not None else None,
        "encoder_options": options or None,
        "stain_norm": stain_norm.lower() if stain_norm else None,
        "stain_target": str(stain_target) if stain_target is not None else None,
        "tissue_preset": tissue,
        "tissue_overrides": _json_dict(tissue_overrides, "--tissue-overrides"),
        "min_tissue": min_tissue,
        "mpp": mpp,
        "target_mpp": target_mpp,
        "roi_size": roi_size,
        "patch_size": patch_size,
        "step": step,
        "skip_background": False if keep_background else None,
        "batch_size": batch_size,
        "device": device,
        "workers": workers,
        "read_threads": read_threads,
        "backend": backend,
        "qc": False if no_qc else None,
    }
    result = _preprocess(
        slides,
        out,
        config=config,
        shard=shard,
        overwrite=overwrite,
        progress=not quiet,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    _print_summary(result.report, result.counts)
    if result.n_failed:
        typer.secho(
            f"{result.n_failed} of {len(result.report)} slides failed; see the error column of the report in "
            f"{out / 'reports'}. Fix them and run the same command again: finished slides are skipped.",
            fg=typer.colors.RED,
            err=True,
        )
        # SystemExit, not typer.Exit: in non-standalone mode (msfm.cli.main) click turns typer.Exit into a return
        # value, which would lose the status.
        raise SystemExit(1)


def _print_summary(report: Any, counts: dict[str, int]) -> None:
    """A table of the report and the counts per status."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

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
