"""``msfm scfoundation <verb>``: convert, embed, enhance, gene-embed, pretrain, fit, predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msfm.runtime.atomic import check_output_free

app = typer.Typer(
    help="scFoundation (xTrimoGene): cell/gene embeddings, read-depth enhancement, pretraining.",
    no_args_is_help=True,
)

Checkpoint = Annotated[Path, typer.Option("--checkpoint", "-c", help="msfm checkpoint directory.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Precision = Annotated[str, typer.Option(help="32 | bf16 | 16 (autocast)")]
Layer = Annotated[
    str | None, typer.Option(help="Matrix to read (default: layers['counts'], else integer X).")
]
PreNorm = Annotated[bool, typer.Option("--pre-normalized", help="Input is already log-normalised (warns).")]
GeneColumn = Annotated[str | None, typer.Option(help="var column with gene symbols or Ensembl IDs.")]
Species = Annotated[str, typer.Option(help="human | mouse (mouse genes mapped through orthologs).")]
NoAliases = Annotated[bool, typer.Option("--no-aliases", help="Do not map previous/alias gene symbols.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


def _gene_kwargs(gene_column: str | None, species: str, no_aliases: bool) -> dict:
    return {"gene_column": gene_column, "species": species, "use_aliases": not no_aliases}


@app.command()
def convert(
    official: Annotated[Path, typer.Argument(help="Official models.ckpt (loaded with weights_only=True).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    variant: Annotated[str, typer.Option(help="cell | rde | gene")] = "cell",
    overwrite: Overwrite = False,
) -> None:
    """Convert an official scFoundation checkpoint into an msfm checkpoint directory."""
    from msfm.models.scfoundation.api import convert as _convert

    path = _convert(official, out, variant=variant, overwrite=overwrite)
    typer.echo(f"wrote {path}")


@app.command()
def embed(
    data: Annotated[Path, typer.Argument(help=".h5ad (streamed), 10x .h5 / folder, .csv/.tsv")],
    checkpoint: Checkpoint,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad")],
    target_depth: Annotated[str, typer.Option(help="tN | aY | fX (log10 scale)")] = "t4",
    pool: Annotated[str, typer.Option(help="all (S,T,max,mean) | max")] = "all",
    batch_size: Annotated[int, typer.Option(help="Cells per batch.")] = 64,
    device: Device = "auto",
    precision: Precision = "32",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    gene_column: GeneColumn = None,
    species: Species = "human",
    no_aliases: NoAliases = False,
    key_added: Annotated[str, typer.Option(help="obsm key")] = "X_scfoundation",
    devices: Annotated[
        str | None,
        typer.Option(help="Several devices/nodes through Lightning DDP, e.g. 4 or 0,1 (.h5ad input)."),
    ] = None,
    accelerator: Annotated[str, typer.Option(help="With --devices: auto | cpu | gpu")] = "auto",
    strategy: Annotated[str, typer.Option(help="With --devices: ddp | ...")] = "ddp",
    num_nodes: Annotated[int, typer.Option(help="With --devices: number of nodes.")] = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cell embeddings to obsm['X_scfoundation'] (batched, CPU or GPU; many GPUs/nodes with --devices)."""
    from msfm.models.scfoundation.api import embed_distributed, embed_file

    if devices is not None or num_nodes > 1:
        from msfm.models.scfoundation.train import _parse_devices

        path = embed_distributed(
            data,
            out,
            checkpoint,
            accelerator=accelerator,
            devices=_parse_devices(devices or "auto"),
            strategy=strategy,
            num_nodes=num_nodes,
            target_depth=target_depth,
            pool=pool,
            batch_size=batch_size,
            precision=precision,
            key_added=key_added,
            overwrite=overwrite,
            layer=layer,
            pre_normalized=pre_normalized,
            **_gene_kwargs(gene_column, species, no_aliases),
        )
        if path is not None:
            typer.echo(f"wrote {path}")
        return
    path = embed_file(
        data,
        out,
        checkpoint,
        key_added=key_added,
        overwrite=overwrite,
        target_depth=target_depth,
        pool=pool,
        batch_size=batch_size,
        device=device,
        precision=precision,
        layer=layer,
        pre_normalized=pre_normalized,
        progress=not quiet,
        **_gene_kwargs(gene_column, species, no_aliases),
    )
    typer.echo(f"wrote {path}")


@app.command()
def enhance(
    data: Annotated[Path, typer.Argument(help="Input cells (.h5ad, 10x, .csv)")],
    checkpoint: Checkpoint,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad")],
    target_depth: Annotated[
        str, typer.Option(help="Target depth above the source: aY (S+Y) | fX | tN")
    ] = "a1",
    batch_size: Annotated[int, typer.Option(help="Cells per decoder batch.")] = 8,
    device: Device = "auto",
    precision: Precision = "32",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    gene_column: GeneColumn = None,
    species: Species = "human",
    no_aliases: NoAliases = False,
    key_added: Annotated[str, typer.Option(help="layers key")] = "scfoundation_enhanced",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Read-depth enhancement (T above S) to layers['scfoundation_enhanced']."""
    from msfm.data import read
    from msfm.models.scfoundation.api import enhance as _enhance
    from msfm.runtime.h5ad import write_h5ad_atomic

    check_output_free(out, overwrite=overwrite)
    adata = read(data)
    _enhance(
        adata,
        checkpoint,
        target_depth=target_depth,
        batch_size=batch_size,
        device=device,
        precision=precision,
        layer=layer,
        pre_normalized=pre_normalized,
        key_added=key_added,
        progress=not quiet,
        **_gene_kwargs(gene_column, species, no_aliases),
    )
    write_h5ad_atomic(adata, out, overwrite_input_guard=[data])
    typer.echo(f"wrote {out}")


@app.command("gene-embed")
def gene_embed(
    data: Annotated[Path, typer.Argument(help="Input cells")],
    checkpoint: Checkpoint,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output HDF5 (embeddings [cells, genes, dim])")],
    genes: Annotated[
        str | None, typer.Option(help="Comma-separated panel symbols (default: all 19,264).")
    ] = None,
    cells: Annotated[str | None, typer.Option(help="Comma-separated obs names (default: all).")] = None,
    target_depth: Annotated[str, typer.Option(help="tN | aY | fX")] = "t4",
    batch_size: Annotated[int, typer.Option(help="Cells per decoder batch.")] = 4,
    device: Device = "auto",
    precision: Precision = "32",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Context-aware gene embeddings from the decoder, streamed to an HDF5 file."""
    from msfm.data import read
    from msfm.models.scfoundation.api import gene_embeddings

    check_output_free(out, overwrite=overwrite)
    adata = read(data)
    path = gene_embeddings(
        adata,
        checkpoint,
        genes=genes.split(",") if genes else None,
        cells=cells.split(",") if cells else None,
        out=out,
        target_depth=target_depth,
        batch_size=batch_size,
        device=device,
        precision=precision,
        layer=layer,
        pre_normalized=pre_normalized,
        progress=not quiet,
    )
    typer.echo(f"wrote {path}")


@app.command()
def pretrain(
    data: Annotated[list[Path], typer.Argument(help="One or more .h5ad files (read backed, streamed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (resumes if it holds a run).")],
    preset: Annotated[
        str, typer.Option(help="scfoundation-tiny | scfoundation-100m | ...")
    ] = "scfoundation-tiny",
    config: Annotated[Path | None, typer.Option(help="YAML/JSON with PretrainRunConfig fields.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Cells per device per micro-step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto | cpu | gpu")] = None,
    devices: Annotated[str | None, typer.Option(help="auto | N | 0,1")] = None,
    strategy: Annotated[str | None, typer.Option(help="auto | ddp | fsdp")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Nodes.")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true | bf16-mixed | 16-mixed")] = None,
    accumulate: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    gene_panel: Annotated[
        str | None,
        typer.Option(
            help="scfoundation (19,264 genes) | data (panel genes present in DATA) | path to a gene list"
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Save last.ckpt and model/ every N steps.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Read-depth-aware masked pretraining (our own implementation; none is released upstream)."""
    from msfm.models.scfoundation.train import PretrainRunConfig
    from msfm.models.scfoundation.train import pretrain as _pretrain

    cfg = PretrainRunConfig.from_file(config) if config else PretrainRunConfig(preset=preset)
    overrides = {
        "preset": preset if config is None else None,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "num_nodes": num_nodes,
        "precision": precision,
        "accumulate": accumulate,
        "seed": seed,
        "num_workers": num_workers,
        "gene_panel": gene_panel,
        "checkpoint_every_n_steps": checkpoint_every,
    }
    cfg = cfg.with_overrides({k: v for k, v in overrides.items() if v is not None}, progress_bar=not quiet)
    path = _pretrain([str(p) for p in data], out, cfg)
    typer.echo(f"model written to {path}")


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help="Labelled cells (.h5ad)")],
    checkpoint: Checkpoint,
    labels_key: Annotated[str, typer.Option(help="obs column with the labels.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Classifier directory to write.")],
    mode: Annotated[
        str, typer.Option(help="linear (frozen backbone) | partial (unfreeze a layer) | full")
    ] = "linear",
    max_epochs: Annotated[int, typer.Option(help="Epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Cells per batch.")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    accelerator: Annotated[str, typer.Option(help="auto | cpu | gpu")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a cell-type classifier on top of a checkpoint."""
    from msfm.data import read
    from msfm.models.scfoundation.train import fit_classifier

    adata = read(data)
    path = fit_classifier(
        adata,
        checkpoint,
        labels_key=labels_key,
        out=out,
        mode=mode,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        accelerator=accelerator,
        seed=seed,
        progress=not quiet,
    )
    typer.echo(f"wrote {path}")


@app.command()
def predict(
    data: Annotated[Path, typer.Argument(help="Cells to annotate")],
    classifier: Annotated[Path, typer.Option(help="Directory written by `msfm scfoundation fit`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad")],
    key_added: Annotated[str, typer.Option(help="obs column prefix")] = "scfoundation_cell_type",
    batch_size: Annotated[int, typer.Option(help="Cells per batch.")] = 64,
    device: Device = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Predict cell types: obs[key] labels and obs[key + '_confidence']."""
    from msfm.data import read
    from msfm.models.scfoundation.train import predict_cell_types
    from msfm.runtime.h5ad import write_h5ad_atomic

    check_output_free(out, overwrite=overwrite)
    adata = read(data)
    predict_cell_types(adata, classifier, key_added=key_added, batch_size=batch_size, device=device)
    write_h5ad_atomic(adata, out, overwrite_input_guard=[data])
    typer.echo(f"wrote {out}")
