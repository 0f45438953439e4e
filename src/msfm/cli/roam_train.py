"""``msfm roam train | predict | evaluate | cascade``: cross-validated slide classifiers and their use.

Registered on the ``msfm roam`` app by :func:`register` (see ``msfm.cli.roam``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import atomic_write_json, atomic_write_text, check_output_free

__all__ = ["cascade", "evaluate", "predict", "register", "train"]

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
SkipMissing = Annotated[
    bool,
    typer.Option(
        "--skip-missing", help="Leave out slides without a feature file (warning) instead of failing."
    ),
]
RoiChunk = Annotated[int | None, typer.Option(help="Encode at most this many ROIs at once (large slides).")]


def _csv_out(out: Path, *, overwrite: bool) -> None:
    check_output_free(out, overwrite=overwrite)
    if not out.parent.is_dir():
        msg = f"Cannot write {out}: the folder {out.parent} does not exist. Create it first."
        raise MsfmInputError(msg)


def _write_csv(df: Any, out: Path) -> None:
    atomic_write_text(out, df.to_csv(index=False))


def train(
    slides: Annotated[
        Path,
        typer.Option(
            "--slides", help="Slide table CSV: slide_id, optional case_id (patient), one column per task."
        ),
    ],
    features: Annotated[
        Path, typer.Option("--features", help="Feature folder (msfm roam preprocess --out).")
    ],
    task: Annotated[str | None, typer.Option("--task", help="Label column of the table to learn.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (resumes an existing run).")
    ] = None,
    folds: Annotated[int | None, typer.Option(help="Cross-validation folds (default 5).")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Preset: roam-subtyping (released size), roam-tiny, ...")
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this msfm ROAM checkpoint (fine-tuning).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON file with RoamTrainConfig fields.")] = None,
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
    label_map: Annotated[
        str | None,
        typer.Option(help="Merge/rename raw values: '2=tumour,3=tumour,0=normal' (others left out)."),
    ] = None,
    group_column: Annotated[
        str | None,
        typer.Option(
            help="Patient column for grouped splits (default: case_id/patient_id if present; 'none')."
        ),
    ] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Maximum epochs (default 200).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Slides per optimiser step (default 4).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 2e-4).")] = None,
    patience: Annotated[
        int | None, typer.Option(help="Early-stopping patience in epochs (default 20).")
    ] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto | cpu | gpu")] = None,
    devices: Annotated[str | None, typer.Option(help="auto | N | 0,1")] = None,
    strategy: Annotated[str | None, typer.Option(help="auto | ddp")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true | bf16-mixed | 16-mixed")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers reading feature files.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (splits, init, sampling; default 1).")] = None,
    skip_missing: SkipMissing = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Discard an existing run in --out that has different settings."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Train a ROAM classifier for one task with K-fold cross-validation (resumable; see RUN/metrics.json)."""
    from msfm.models.roam.train import RoamTrainConfig, parse_label_map, read_config_file
    from msfm.models.roam.train import train as _train

    base = read_config_file(config) if config else {}
    if out is None:
        msg = "--out RUN_DIR is required (the run directory; an existing run with the same settings resumes)."
        raise MsfmInputError(msg)
    overrides: dict[str, Any] = {
        "task": task,
        "folds": folds,
        "model": model,
        "init_from": str(init_from) if init_from is not None else None,
        "test_frac": test_frac,
        "classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
        "label_map": parse_label_map(label_map) if label_map else None,
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "patience": patience,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "precision": precision,
        "num_workers": num_workers,
        "seed": seed,
        "skip_missing": True if skip_missing else None,
        "progress_bar": False if quiet else None,
    }
    data = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    if group_column is not None:
        data["group_column"] = None if group_column.lower() in ("none", "") else group_column
    if isinstance(data.get("devices"), str):
        from msfm.models.roam.train import parse_devices

        data["devices"] = parse_devices(data["devices"])
    if not data.get("task"):
        msg = "--task is required: the column of the slide table holding the labels to learn."
        raise MsfmInputError(msg)
    cfg = RoamTrainConfig.parse(data)
    result = _train(slides, features, out, cfg, splits=splits, overwrite=overwrite)
    oof = result.metrics["oof"]
    typer.echo(
        f"{cfg.task}: out-of-fold accuracy {oof['accuracy']:.3f}, balanced accuracy {oof['balanced_accuracy']:.3f}, "
        f"macro AUC {_fmt(oof['auc_macro'])}"
    )
    if "test_ensemble" in result.metrics:
        t = result.metrics["test_ensemble"]
        typer.echo(
            f"test ensemble ({t['n']} slides): accuracy {t['accuracy']:.3f}, macro AUC {_fmt(t['auc_macro'])}"
        )
    typer.echo(f"run written to {result.run_dir} (metrics.json, oof_predictions.csv, fold*/best)")


def _fmt(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def predict(
    run: Annotated[
        list[Path],
        typer.Option("--run", help="Run directory or checkpoint directory (repeat to ensemble several)."),
    ],
    features: Annotated[Path, typer.Option("--features", help="Feature folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output CSV.")],
    slides: Annotated[
        Path | None, typer.Option("--slides", help="Table with slide_id (default: every feature file).")
    ] = None,
    device: Device = "auto",
    roi_chunk: RoiChunk = None,
    per_model: Annotated[
        bool, typer.Option("--per-model", help="Also write each fold model's probabilities.")
    ] = False,
    skip_missing: SkipMissing = False,
    overwrite: Overwrite = False,
) -> None:
    """Predict slides with a trained run (mean softmax over its folds) or checkpoints."""
    from msfm.models.roam.predict import predict_slides

    _csv_out(out, overwrite=overwrite)
    table = predict_slides(
        run if len(run) > 1 else run[0],
        features,
        slides,
        device=device,
        roi_chunk=roi_chunk,
        skip_missing=skip_missing,
        per_model=per_model,
    )
    _write_csv(table, out)
    counts = table["pred"].value_counts().to_dict()
    typer.echo(
        f"{len(table)} slides predicted ({table.attrs.get('n_models')} model(s)): {counts}; written to {out}"
    )


def evaluate(
    predictions: Annotated[
        Path, typer.Option("--predictions", help="CSV from predict/cascade (prob_<class> columns).")
    ],
    slides: Annotated[Path, typer.Option("--slides", help="Slide table with the true labels.")],
    task: Annotated[str, typer.Option("--task", help="Label column of the table.")],
    stage: Annotated[
        str | None, typer.Option(help="Cascade stage to score (its <stage>_prob_<class> columns).")
    ] = None,
    label_map: Annotated[
        str | None, typer.Option(help="Raw value -> class name, e.g. '2=tumour,3=tumour'.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="metrics JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Confusion-matrix PNG.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Score predictions against the labels of a slide table (accuracy, balanced accuracy, F1, AUC, confusion)."""
    import numpy as np

    from msfm.eval.classification import classification_report, save_confusion_png, to_jsonable
    from msfm.models.roam.predict import read_table
    from msfm.models.roam.train import _value_text, parse_label_map

    for p in (out, plot):
        if p is not None:
            _csv_out(p, overwrite=overwrite)
    preds = read_table(predictions)
    labels = read_table(slides)
    for df, what, cols in ((preds, predictions, ("slide_id",)), (labels, slides, ("slide_id", task))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            msg = f"{what} has no column(s) {missing}; its columns are {list(df.columns)[:30]}."
            raise MsfmInputError(msg)
    from msfm.data.slide_ids import check_slide_ids

    preds["slide_id"] = check_slide_ids(preds["slide_id"].tolist(), str(predictions))
    labels["slide_id"] = check_slide_ids(labels["slide_id"].tolist(), str(slides))
    prefix = f"{stage}_prob_" if stage else "prob_"
    pcols = [c for c in preds.columns if c.startswith(prefix)]
    if stage is None:
        pcols = [c for c in pcols if c.startswith("prob_")]
    if len(pcols) < 2:
        msg = (
            f"{predictions} has no {prefix}<class> columns (found {list(preds.columns)[:20]}). Pass --stage NAME for "
            "cascade output."
        )
        raise MsfmInputError(msg)
    names = [c[len(prefix) :] for c in pcols]
    lm = parse_label_map(label_map) if label_map else None
    truth = {}
    for sid, raw in zip(labels["slide_id"], labels[task]):
        v = _value_text(raw)
        if v is not None and lm is not None:
            v = lm.get(v)
        if v is not None:
            truth[str(sid).strip()] = v
    proba = preds[pcols].astype(float)
    keep = proba.notna().all(axis=1).to_numpy() & preds["slide_id"].map(lambda s: s in truth).to_numpy()
    if not keep.any():
        msg = f"No slide of {predictions} has both a prediction and a label in column {task!r} of {slides}."
        raise MsfmInputError(msg)
    ids = preds.loc[keep, "slide_id"].tolist()
    unknown = sorted({truth[s] for s in ids} - set(names))
    if unknown:
        msg = (
            f"Labels {unknown} of column {task!r} are not classes of the predictions {names}. Map them with "
            "--label-map (e.g. '3=tumour')."
        )
        raise MsfmInputError(msg)
    y = np.array([names.index(truth[s]) for s in ids], dtype=np.int64)
    report = classification_report(y, proba.to_numpy()[keep], names)
    report["n_skipped"] = int((~keep).sum())
    if out is not None:
        atomic_write_json(out, to_jsonable(report))
    if plot is not None:
        save_confusion_png(report["confusion"], names, plot, title=f"{stage or task}")
    typer.echo(
        json.dumps(
            to_jsonable(
                {k: report[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc_macro", "auc")}
            ),
            indent=1,
        )
    )
    for note in report["notes"]:
        typer.echo(f"note: {note}")


def cascade(
    features: Annotated[Path, typer.Option("--features", help="Feature folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output CSV (one column per stage).")],
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
    slides: Annotated[
        Path | None, typer.Option("--slides", help="Table with slide_id (default: every feature file).")
    ] = None,
    device: Device = "auto",
    roi_chunk: RoiChunk = None,
    skip_missing: SkipMissing = False,
    overwrite: Overwrite = False,
) -> None:
    """Chain tasks: each stage runs on the slides its condition selects (STAGE==A,B | STAGE!=A, joined by '&')."""
    from msfm.models.roam.predict import cascade as _cascade
    from msfm.models.roam.predict import parse_stage, read_cascade_spec

    if bool(stage) == (spec is not None):
        msg = "Give the stages either with --stage NAME=RUN[:CONDITION] (repeated) or with --spec FILE, not both."
        raise MsfmInputError(msg)
    _csv_out(out, overwrite=overwrite)
    stages = read_cascade_spec(spec) if spec is not None else [parse_stage(s) for s in stage or []]
    table = _cascade(stages, features, slides, device=device, roi_chunk=roi_chunk, skip_missing=skip_missing)
    _write_csv(table, out)
    summary = {
        s: table[s].replace("", "(not run)").value_counts().to_dict() for s in table.attrs["stage_order"]
    }
    typer.echo(f"cascade over {len(table)} slides, stages {' > '.join(table.attrs['stage_order'])}:")
    for name, counts in summary.items():
        typer.echo(f"  {name}: {counts}")
    typer.echo(f"written to {out}")


def register(app: typer.Typer) -> None:
    """Add ``train``, ``predict``, ``evaluate`` and ``cascade`` to the ``msfm roam`` app."""
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)
    app.command("cascade")(cascade)
