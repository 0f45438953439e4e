"""``msfm scfoundation <verb>``: the commands mirror ``msfm.scfoundation`` (convert, embed, enhance, embed-genes,
train, fit-classifier, predict; the downstream tasks perturb-fit, perturb, gene-network, drug-fit, drug-predict,
sensitivity-fit, sensitivity-predict); every command parses its options and calls the API.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from msfm.cli import scfoundation_drug, scfoundation_network, scfoundation_perturb
from msfm.cli.options import (
    BatchSize,
    Checkpoint,
    Config,
    Device,
    InitCheckpoint,
    KeyAdded,
    OutDir,
    OutH5ad,
    Overwrite,
    Precision,
    Preset,
    Quiet,
    read_options,
    trainer_options,
)

app = typer.Typer(
    help="scFoundation (xTrimoGene): cell/gene embeddings, read-depth enhancement, pretraining, annotation.",
    no_args_is_help=True,
)

Data = Annotated[
    Path, typer.Argument(help="Cells: .h5ad (streamed backed by embed), 10x .h5 / folder, .csv/.tsv, .zarr.")
]
TargetDepth = Annotated[str, typer.Option(help="tN (T = N) | aY (T = S + Y) | fX (T = log10(total * X)).")]


@app.command()
def convert(
    official: Annotated[Path, typer.Argument(help="Official models.ckpt (read with weights_only=True).")],
    out: OutDir,
    variant: Annotated[str, typer.Option(help="cell | rde | gene")] = "cell",
    overwrite: Overwrite = False,
) -> None:
    """Convert an official scFoundation checkpoint into an msfm checkpoint directory."""
    from msfm.models.scfoundation import convert as _convert

    typer.echo(f"wrote {_convert(official, out, variant=variant, overwrite=overwrite)}")


@app.command()
@read_options("cells")
@trainer_options("devices", "accelerator", "strategy", "num_nodes")
def embed(
    data: Data,
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict,
    overrides: dict,
    precision: Precision = "auto",
    key_added: KeyAdded = "scfoundation",
    target_depth: TargetDepth = "t4",
    pool: Annotated[str, typer.Option(help="all (S, T, max, mean) | max")] = "all",
    batch_size: BatchSize = 64,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cell embeddings to obsm['X_<key>'] (.h5ad input streamed; many GPUs/nodes with --devices)."""
    from msfm.models.scfoundation import embed as _embed
    from msfm.runtime.devices import rank_world

    overrides.setdefault("strategy", "ddp")
    result = _embed(
        data,
        checkpoint,
        out=out,
        overwrite=overwrite,
        key_added=key_added,
        target_depth=target_depth,
        pool=pool,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=not quiet,
        **overrides,
        **read,
    )
    if result.isbacked:
        result.file.close()
    if rank_world()[0] == 0:
        typer.echo(f"wrote {out}")


@app.command()
@read_options("cells")
def enhance(
    data: Data,
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict,
    precision: Precision = "auto",
    key_added: KeyAdded = "scfoundation",
    target_depth: TargetDepth = "a1",
    batch_size: BatchSize = 8,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Read-depth enhancement (T above S) to layers['<key>_enhanced']."""
    from msfm.models.scfoundation import enhance as _enhance

    _enhance(
        data,
        checkpoint,
        out=out,
        overwrite=overwrite,
        key_added=key_added,
        target_depth=target_depth,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=not quiet,
        **read,
    )
    typer.echo(f"wrote {out}")


@app.command("embed-genes")
@read_options("cells")
def embed_genes(
    data: Data,
    checkpoint: Checkpoint,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output HDF5 file (embeddings [cells, genes, dim]).")
    ],
    read: dict,
    precision: Precision = "auto",
    genes: Annotated[
        str | None, typer.Option(help="Comma-separated panel symbols (default: the whole panel).")
    ] = None,
    cells: Annotated[str | None, typer.Option(help="Comma-separated obs names (default: all).")] = None,
    target_depth: TargetDepth = "t4",
    batch_size: BatchSize = 4,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Context-aware gene embeddings from the decoder, streamed to an HDF5 file."""
    from msfm.models.scfoundation import embed_genes as _embed_genes

    result = _embed_genes(
        data,
        checkpoint,
        genes=genes.split(",") if genes else None,
        cells=cells.split(",") if cells else None,
        out=out,
        overwrite=overwrite,
        target_depth=target_depth,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=not quiet,
        **read,
    )
    typer.echo(f"wrote {result.path}")


@app.command()
@read_options("cells")
@trainer_options()
def train(
    data: Annotated[
        list[Path], typer.Argument(help="One or more .h5ad files with raw counts (read backed).")
    ],
    out: OutDir,
    read: dict,
    overrides: dict,
    config: Config = None,
    preset: Preset = None,
    checkpoint: InitCheckpoint = None,
    gene_panel: Annotated[
        str | None,
        typer.Option(
            help="scfoundation (19,264 genes) | data (panel genes present in DATA) | a gene-list file."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Read-depth-aware masked pretraining (ours; none is released upstream). Re-running on RUN resumes it."""
    from msfm.models.scfoundation import train as _train

    settings = {**read, **overrides}  # only the options given: a --config file's values stand
    settings.update({"preset": preset, "gene_panel": gene_panel, "progress_bar": False if quiet else None})
    result = _train(data, out, config=config, checkpoint=checkpoint, **settings)
    typer.echo(f"model written to {result.checkpoint}")


@app.command("fit-classifier")
@read_options("cells")
@trainer_options(
    "max_epochs", "batch_size", "lr", "accelerator", "devices", "strategy", "precision", "seed",
    "allow_config_change",
)  # fmt: skip
def fit_classifier(
    data: Data,
    checkpoint: Checkpoint,
    out: OutDir,
    read: dict,
    overrides: dict,
    labels_key: Annotated[str, typer.Option(help="obs column with the labels.")],
    mode: Annotated[
        str, typer.Option(help="linear (frozen backbone) | partial (unfreeze a layer) | full")
    ] = "linear",
    target_depth: TargetDepth = "t4",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a cell-type classifier on a checkpoint's encoder."""
    from msfm.models.scfoundation import fit_classifier as _fit

    result = _fit(
        data,
        checkpoint,
        labels_key=labels_key,
        out=out,
        mode=mode,
        target_depth=target_depth,
        progress=not quiet,
        overwrite=overwrite,
        **overrides,
        **read,
    )
    typer.echo(f"wrote {result.checkpoint}")


@app.command()
@read_options("cells")
def predict(
    data: Data,
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", "-c", help="Classifier directory (msfm scfoundation fit-classifier)."),
    ],
    out: OutH5ad,
    read: dict,
    precision: Precision = "auto",
    key_added: KeyAdded = "scfoundation",
    batch_size: BatchSize = 64,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict cell types: obs['<key>_<labels_key>'], obs['<key>_confidence'], obsm['<key>_probs']."""
    from msfm.models.scfoundation import predict as _predict

    _predict(
        data,
        checkpoint,
        out=out,
        overwrite=overwrite,
        key_added=key_added,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=not quiet,
        **read,
    )
    typer.echo(f"wrote {out}")


def _deprecated_alias(old: str, new: str, command: Callable[..., Any]) -> None:
    """Keep ``msfm scfoundation <old>`` for one release (hidden): a note, then the new command."""

    @functools.wraps(command)
    def alias(**kwargs: Any) -> Any:
        typer.secho(
            f"`msfm scfoundation {old}` is deprecated and will be removed in the next release; "
            f"use `msfm scfoundation {new}`.",
            err=True,
            fg=typer.colors.YELLOW,
        )
        return command(**kwargs)

    app.command(old, hidden=True, deprecated=True)(alias)


_deprecated_alias("pretrain", "train", train)
_deprecated_alias("gene-embed", "embed-genes", embed_genes)
_deprecated_alias("fit", "fit-classifier", fit_classifier)


# The downstream tasks (perturbation, gene network, drug response and sensitivity) live in their own modules.
scfoundation_perturb.register(app)
scfoundation_network.register(app)
scfoundation_drug.register(app)
