"""``msfm scfoundation drug-fit | drug-predict | sensitivity-fit | sensitivity-predict``.

Registered on the ``msfm scfoundation`` app by :func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msfm.cli.options import KeyAdded, OutDir, OutH5ad, Overwrite, Quiet, read_options, trainer_options

__all__ = ["register"]

Data = Annotated[Path, typer.Argument(help="Expression: .h5ad, 10x .h5 / folder, .csv/.tsv, .zarr.")]
Backbone = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", "-c", help="scFoundation backbone for the embeddings (omit with --use-rep)."
    ),
]
UseRep = Annotated[
    str | None, typer.Option(help="Use embeddings already in obsm[KEY] (e.g. X_scfoundation).")
]
Folds = Annotated[int, typer.Option(help="Cross-validation folds.")]
TRAIN = ("max_epochs", "batch_size", "lr", "accelerator", "devices", "strategy", "precision", "seed",
         "checkpoint_every_n_steps", "allow_config_change")  # fmt: skip


def _fmt(metrics: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


@read_options("cells")
@trainer_options(*TRAIN)
def drug_fit(
    data: Data,
    out: OutDir,
    read: dict,
    overrides: dict,
    responses: Annotated[Path, typer.Option(help="Response table CSV/TSV: cell line, drug id, ln(IC50).")],
    drugs: Annotated[Path, typer.Option(help="Drug table CSV/TSV: drug id, SMILES.")],
    checkpoint: Backbone = None,
    use_rep: UseRep = None,
    folds: Folds = 5,
    split: Annotated[str, typer.Option(help="Held out per fold: pairs | cell_lines | drugs.")] = "pairs",
    cell_column: Annotated[str, typer.Option(help="Cell-line column of the responses.")] = "cell_line",
    drug_column: Annotated[str, typer.Option(help="Drug column of the responses.")] = "drug_id",
    value_column: Annotated[str, typer.Option(help="ln(IC50) column of the responses.")] = "ln_ic50",
    drug_id_column: Annotated[str, typer.Option(help="Id column of the drug table.")] = "drug_id",
    smiles_column: Annotated[str, typer.Option(help="SMILES column of the drug table.")] = "smiles",
    fingerprint_bits: Annotated[int, typer.Option(help="Morgan fingerprint bits.")] = 1024,
    target_depth: Annotated[str, typer.Option(help="Embedding target depth (f1: T = S, official).")] = "f1",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cross-validate and train a DeepCDR-style ln(IC50) regressor (writes OUT, metrics.csv, cv_predictions.csv)."""
    from msfm.models.scfoundation.drug_response import drug_fit as _fit

    result = _fit(
        data, checkpoint, responses=responses, drugs=drugs, out=out, use_rep=use_rep, folds=folds,
        split=split, cell_column=cell_column, drug_column=drug_column, value_column=value_column,
        drug_id_column=drug_id_column, smiles_column=smiles_column, fingerprint_bits=fingerprint_bits,
        target_depth=target_depth, progress=not quiet, overwrite=overwrite, **overrides, **read,
    )  # fmt: skip
    for m in ("model", "per_drug_mean", "ridge_expression", "ridge_embedding"):
        typer.echo(f"{m}: {_fmt(result.metrics[m], ('pcc', 'scc', 'rmse'))}")
    typer.echo(f"wrote {result.checkpoint}")


@read_options("cells")
def drug_predict(
    data: Data,
    out: OutH5ad,
    read: dict,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="Model directory (drug-fit).")],
    drugs: Annotated[Path | None, typer.Option(help="Drug table (default: the model's drugs).")] = None,
    pairs: Annotated[Path | None, typer.Option(help="Only these pairs (cell_line, drug_id CSV).")] = None,
    use_rep: UseRep = None,
    backbone: Annotated[
        Path | None, typer.Option(help="Backbone (default: the one used in training).")
    ] = None,
    key_added: KeyAdded = "scfoundation",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict ln(IC50) of every cell line x drug: obsm['<key>_ic50'] (columns = drug ids)."""
    from msfm.models.scfoundation.drug_response import drug_predict as _predict

    _predict(
        data, checkpoint, drugs=drugs, pairs=pairs, use_rep=use_rep, backbone=backbone, key_added=key_added,
        device=device, progress=not quiet, out=out, overwrite=overwrite, **read,
    )  # fmt: skip
    typer.echo(f"wrote {out}")


@read_options("cells")
@trainer_options(*TRAIN)
def sensitivity_fit(
    bulk: Annotated[Path, typer.Argument(help="Labelled bulk samples (.h5ad, ...).")],
    out: OutDir,
    single_cells: Annotated[Path, typer.Option(help="Target single cells (.h5ad, ...).")],
    read: dict,
    overrides: dict,
    bulk_labels_key: Annotated[str, typer.Option(help="Bulk obs column: sensitive/resistant or 1/0.")],
    sc_labels_key: Annotated[str | None, typer.Option(help="Single-cell labels (evaluation only).")] = None,
    checkpoint: Backbone = None,
    use_rep: UseRep = None,
    folds: Folds = 5,
    adv_weight: Annotated[float, typer.Option(help="Weight of the domain-adversarial loss.")] = 1.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a SCAD-style sensitivity classifier: labelled bulk -> single cells (5-fold CV, with baselines)."""
    from msfm.models.scfoundation.drug_sensitivity import sensitivity_fit as _fit

    result = _fit(
        bulk, checkpoint, single_cells=single_cells, bulk_labels_key=bulk_labels_key, sc_labels_key=sc_labels_key, out=out,
        use_rep=use_rep, folds=folds, adv_weight=adv_weight, progress=not quiet, overwrite=overwrite,
        **overrides, **read,
    )  # fmt: skip
    for m in ("scad", "no_adversarial", "logistic"):
        typer.echo(f"{m}: {_fmt(result.metrics[m], ('bulk_auroc', 'sc_auroc'))}")
    typer.echo(f"wrote {result.checkpoint}")


@read_options("cells")
def sensitivity_predict(
    data: Data,
    out: OutH5ad,
    read: dict,
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", "-c", help="Model directory (sensitivity-fit).")
    ],
    use_rep: UseRep = None,
    backbone: Annotated[
        Path | None, typer.Option(help="Backbone (default: the one used in training).")
    ] = None,
    target_depth: Annotated[str | None, typer.Option(help="Embedding target depth (default: t4).")] = None,
    key_added: KeyAdded = "scfoundation",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Label cells: obs['<key>_sensitive'], obs['<key>_sensitivity_confidence']."""
    from msfm.models.scfoundation.drug_sensitivity import sensitivity_predict as _predict

    _predict(
        data, checkpoint, use_rep=use_rep, backbone=backbone, target_depth=target_depth, key_added=key_added,
        device=device, progress=not quiet, out=out, overwrite=overwrite, **read,
    )  # fmt: skip
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the drug commands to the ``msfm scfoundation`` app."""
    app.command("drug-fit")(drug_fit)
    app.command("drug-predict")(drug_predict)
    app.command("sensitivity-fit")(sensitivity_fit)
    app.command("sensitivity-predict")(sensitivity_predict)
