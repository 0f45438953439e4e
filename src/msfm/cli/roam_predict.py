"""``msfm roam predict | cascade``: slide predictions of a run (its fold ensemble) and chains of tasks.

Registered on the ``msfm roam`` app by :func:`register` (see ``msfm.cli.roam``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msfm.cli.options import Checkpoint, Device, OutCsv, Overwrite, Precision, Quiet

__all__ = ["cascade", "predict", "register"]

Features = Annotated[Path, typer.Argument(help="Feature folder (msfm roam preprocess -o).")]
Slides = Annotated[
    Path | None, typer.Option("--slides", help="Table with slide_id (default: every feature file).")
]
SkipMissing = Annotated[
    bool,
    typer.Option(
        "--skip-missing", help="Leave out slides without a feature file (warning) instead of failing."
    ),
]
RoiChunk = Annotated[
    int | None,
    typer.Option(
        help="ROIs encoded per pass (default 64: fastest measured and lowest memory; outputs do not change)."
    ),
]


def predict(
    features: Features,
    checkpoint: Checkpoint,
    out: OutCsv,
    slides: Slides = None,
    device: Device = "auto",
    precision: Precision = "auto",
    roi_chunk: RoiChunk = None,
    per_model: Annotated[
        bool, typer.Option("--per-model", help="Also write each fold model's probabilities.")
    ] = False,
    skip_missing: SkipMissing = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict slides with a trained run (mean softmax over its folds) or a checkpoint; -o writes a CSV.

    -c takes a run directory, a checkpoint directory, or several checkpoints joined by '+' (one ensemble).
    """
    from msfm.models.roam.prediction import predict as _predict

    result = _predict(
        features,
        checkpoint,
        slides=slides,
        device=device,
        precision=precision,
        roi_chunk=roi_chunk,
        skip_missing=skip_missing,
        per_model=per_model,
        out=out,
        overwrite=overwrite,
        progress=not quiet,
    )
    counts = result.table["pred"].value_counts().to_dict()
    typer.echo(
        f"{len(result.table)} slides predicted ({result.n_models} model(s)): {counts}; written to {out}"
    )


def cascade(
    features: Features,
    out: OutCsv,
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage",
            help="NAME=RUN_DIR[:CONDITION], in order; e.g. detection=runs/det, subtyping=runs/sub:detection==tumour.",
        ),
    ] = None,
    spec: Annotated[
        Path | None, typer.Option(help="YAML/JSON spec: stages: [{name, run, when}] (instead of --stage).")
    ] = None,
    slides: Slides = None,
    device: Device = "auto",
    roi_chunk: RoiChunk = None,
    skip_missing: SkipMissing = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Chain tasks: each stage runs on the slides its condition selects (STAGE==A,B | STAGE!=A, joined by '&').

    -o writes one CSV with the class, confidence and probabilities of every stage.
    """
    from msfm.errors import MsfmInputError
    from msfm.models.roam.cascades import cascade as _cascade

    if bool(stage) == (spec is not None):
        msg = "Give the stages either with --stage NAME=RUN[:CONDITION] (repeated) or with --spec FILE, not both."
        raise MsfmInputError(msg)
    result = _cascade(
        features,
        spec if spec is not None else stage,
        slides=slides,
        device=device,
        roi_chunk=roi_chunk,
        skip_missing=skip_missing,
        out=out,
        overwrite=overwrite,
        progress=not quiet,
    )
    table = result.table
    typer.echo(f"cascade over {len(table)} slides, stages {' > '.join(result.stage_order)}:")
    for name in result.stage_order:
        typer.echo(f"  {name}: {table[name].replace('', '(not run)').value_counts().to_dict()}")
    typer.echo(f"written to {out}")


def register(app: typer.Typer) -> None:
    """Add ``predict`` and ``cascade`` to the ``msfm roam`` app."""
    app.command("predict")(predict)
    app.command("cascade")(cascade)
