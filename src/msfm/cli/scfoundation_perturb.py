"""``msfm scfoundation perturb-fit | perturb``: GEARS-style perturbation response prediction.

Registered on the ``msfm scfoundation`` app by :func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msfm.cli.options import (
    BatchSize,
    Checkpoint,
    Device,
    KeyAdded,
    OutDir,
    OutH5ad,
    Overwrite,
    Precision,
    Quiet,
    read_options,
    trainer_options,
)

__all__ = ["perturb", "perturb_fit", "register"]

Data = Annotated[
    Path, typer.Argument(help="Cells with raw counts and a condition column (.h5ad, 10x, csv, zarr).")
]
ConditionKey = Annotated[str, typer.Option(help="obs column with the condition labels.")]
Control = Annotated[str, typer.Option(help="The control label of the condition column.")]


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@trainer_options(
    "max_epochs", "max_steps", "batch_size", "lr", "accelerator", "devices", "strategy", "precision", "seed",
    "allow_config_change",
)  # fmt: skip
def perturb_fit(
    data: Data,
    checkpoint: Checkpoint,
    out: OutDir,
    read: dict,
    overrides: dict,
    condition_key: ConditionKey = "condition",
    control: Control = "ctrl",
    match_key: Annotated[
        str | None,
        typer.Option(help="obs column grouping cells (e.g. cell_type); controls pair within a group."),
    ] = None,
    split: Annotated[str, typer.Option(help="condition (hold out conditions) | group (hold out groups).")] = (
        "condition"
    ),
    test_groups: Annotated[
        str | None, typer.Option(help="Held-out groups, comma-separated (split=group).")
    ] = None,
    test_conditions: Annotated[str | None, typer.Option(help="Held-out conditions, comma-separated.")] = None,
    test_fraction: Annotated[
        float, typer.Option(help="Share of conditions held out (split=condition).")
    ] = 0.2,
    gene_graph: Annotated[
        Path | None,
        typer.Option(help="Edge list CSV/TSV gene_a,gene_b[,weight] (e.g. GO); default co-expression."),
    ] = None,
    max_control_cells: Annotated[int, typer.Option(help="Control cells per group kept in memory.")] = 256,
    min_cells: Annotated[int, typer.Option(help="Fewest cells per perturbed (condition, group).")] = 10,
    direction_lambda: Annotated[float, typer.Option(help="Weight of the direction loss.")] = 0.1,
    hidden_dim: Annotated[int, typer.Option(help="Width of each gene's state in the head.")] = 64,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a perturbation head on a frozen backbone; scores the held-out split against three baselines."""
    from msfm.models.scfoundation.perturbation import perturb_fit as _fit

    result = _fit(
        data,
        checkpoint,
        out=out,
        condition_key=condition_key,
        control=control,
        match_key=match_key,
        split=split,  # type: ignore[arg-type]
        test_groups=_split_list(test_groups),
        test_conditions=_split_list(test_conditions),
        test_fraction=test_fraction,
        gene_graph=gene_graph,
        max_control_cells=max_control_cells,
        min_cells=min_cells,
        direction_lambda=direction_lambda,
        hidden_dim=hidden_dim,
        progress=not quiet,
        overwrite=overwrite,
        **overrides,
        **read,
    )
    summary = ", ".join(
        f"{m}={result.metrics[f'{m}/pearson_delta']:.3f}"
        for m in ("model", "no_change", "mean_shift", "additive_linear")
    )
    typer.echo(f"held-out Pearson of the delta: {summary}")
    typer.echo(f"wrote {result.checkpoint} (metrics.csv inside)")


def perturb(
    data: Data,
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", "-c", help="Perturbation model (msfm scfoundation perturb-fit).")
    ],
    out: OutH5ad,
    read: dict,
    conditions: Annotated[
        str | None, typer.Option(help="Conditions to predict, comma-separated (default: all it was fit on).")
    ] = None,
    groups: Annotated[str | None, typer.Option(help="Groups to predict for, comma-separated.")] = None,
    per_cell: Annotated[bool, typer.Option("--per-cell", help="One profile per control cell.")] = False,
    key_added: KeyAdded = "scfoundation",
    batch_size: BatchSize = 8,
    device: Device = "auto",
    precision: Precision = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict post-perturbation expression from the control cells of DATA; writes an .h5ad."""
    from msfm.models.scfoundation.perturb_predict import perturb as _perturb

    result = _perturb(
        data,
        checkpoint,
        conditions=_split_list(conditions),
        groups=_split_list(groups),
        per_cell=per_cell,
        key_added=key_added,
        batch_size=batch_size,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **read,
    )
    typer.echo(f"wrote {out} ({result.n_obs} profiles x {result.n_vars} genes)")


def register(app: typer.Typer) -> None:
    """Add ``perturb-fit`` and ``perturb`` to the ``msfm scfoundation`` app."""
    app.command("perturb-fit")(read_options("cells")(perturb_fit))
    app.command("perturb")(read_options("cells")(perturb))
