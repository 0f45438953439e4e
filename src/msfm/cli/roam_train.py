"""``msfm roam train | evaluate``: cross-validated slide classifiers and their scores.

Registered on the ``msfm roam`` app by :func:`register` (see ``msfm.cli.roam``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from msfm.cli.options import Config, InitCheckpoint, Out, OutDir, Overwrite, Preset, Quiet, trainer_options

__all__ = ["evaluate", "register", "train"]

#: The shared training options that RoamTrainConfig understands.
TRAINER_OPTIONS = (
    "max_epochs",
    "batch_size",
    "lr",
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "num_workers",
    "seed",
)
LabelMap = Annotated[
    str | None,
    typer.Option(help="Merge/rename raw values: '2=tumour,3=tumour,0=normal' (others left out)."),
]
SlidesTable = Annotated[
    Path,
    typer.Option(
        "--slides",
        help="Slide table CSV: slide_id, optional case_id (patient), one column per task (labels).",
    ),
]


@trainer_options(*TRAINER_OPTIONS)
def train(
    features: Annotated[Path, typer.Argument(help="Feature folder (msfm roam preprocess -o).")],
    slides: SlidesTable,
    out: OutDir,
    overrides: dict[str, Any],
    task: Annotated[str | None, typer.Option("--task", help="Label column of the table to learn.")] = None,
    config: Config = None,
    preset: Preset = None,
    checkpoint: InitCheckpoint = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation folds (default 5).")] = None,
    splits: Annotated[
        Path | None,
        typer.Option(help="Folder of split files (fold{k}.csv: slide_id,split; or CLAM splits_{k}.csv)."),
    ] = None,
    test_frac: Annotated[
        float | None, typer.Option(help="Fraction held out as test set (fold ensemble).")
    ] = None,
    classes: Annotated[
        str | None, typer.Option(help="Class order, comma-separated (default: sorted).")
    ] = None,
    label_map: LabelMap = None,
    group_column: Annotated[
        str | None,
        typer.Option(
            help="Patient column for grouped splits (default: case_id/patient_id if present; 'none')."
        ),
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Early-stopping patience in epochs (default 20).")
    ] = None,
    skip_missing: Annotated[
        bool,
        typer.Option(
            "--skip-missing", help="Leave out slides without a feature file (warning) instead of failing."
        ),
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a ROAM classifier for one task with K-fold cross-validation (resumable; see RUN/metrics.json).

    --preset names the model size (roam-subtyping: the released one; roam-tiny); -c starts from a checkpoint.
    """
    from msfm.models.roam.training import train as _train

    given = {
        **overrides,
        "task": task,
        "preset": preset,
        "folds": folds,
        "test_frac": test_frac,
        "classes": classes,
        "label_map": label_map,
        "group_column": group_column,
        "patience": patience,
        "skip_missing": True if skip_missing else None,
        "progress_bar": False if quiet else None,
    }
    result = _train(
        features,
        out,
        slides=slides,
        config=config,
        checkpoint=checkpoint,
        splits=splits,
        overwrite=overwrite,
        **{k: v for k, v in given.items() if v is not None},
    )
    oof = result.metrics["oof"]
    typer.echo(
        f"{result.metrics['task']}: out-of-fold accuracy {oof['accuracy']:.3f}, balanced accuracy "
        f"{oof['balanced_accuracy']:.3f}, macro AUC {_fmt(oof['auc_macro'])}"
    )
    if "test_ensemble" in result.metrics:
        t = result.metrics["test_ensemble"]
        typer.echo(
            f"test ensemble ({t['n']} slides): accuracy {t['accuracy']:.3f}, macro AUC {_fmt(t['auc_macro'])}"
        )
    typer.echo(f"run written to {result.run_dir} (metrics.json, oof_predictions.csv, fold*/best)")


def _fmt(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def evaluate(
    predictions: Annotated[
        Path,
        typer.Argument(help="CSV from predict or cascade (prob_<class> or <stage>_prob_<class> columns)."),
    ],
    slides: Annotated[Path, typer.Option("--slides", help="Slide table with the true labels.")],
    task: Annotated[str, typer.Option("--task", help="Label column of the table.")],
    stage: Annotated[
        str | None, typer.Option(help="Cascade stage to score (its <stage>_prob_<class> columns).")
    ] = None,
    label_map: LabelMap = None,
    out: Out = None,
    plot: Annotated[Path | None, typer.Option(help="Confusion-matrix PNG.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Score predictions against the labels of a slide table (accuracy, balanced accuracy, F1, AUC, confusion).

    -o writes the metrics as JSON.
    """
    from msfm.models.roam.evaluation import evaluate as _evaluate
    from msfm.runtime.jsonable import to_jsonable

    result = _evaluate(
        predictions,
        slides,
        task=task,
        stage=stage,
        label_map=label_map,
        out=out,
        plot=plot,
        overwrite=overwrite,
    )
    m = result.metrics
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc_macro", "auc")
    typer.echo(json.dumps(to_jsonable({k: m[k] for k in keys}), indent=1))
    for note in m["notes"]:
        typer.echo(f"note: {note}")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``evaluate`` to the ``msfm roam`` app."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
