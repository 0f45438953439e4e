"""``msfm scfoundation gene-network``: gene modules from scFoundation gene embeddings, with gene-set enrichment.

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
    OutH5ad,
    Overwrite,
    Precision,
    Quiet,
    Seed,
    read_options,
)

__all__ = ["gene_network", "register"]


def _cells(cells: str | None, cells_where: list[str] | None) -> object:
    """``--cells a,b`` (obs names) or ``--cells-where column=v1,v2`` (repeatable) as the API's ``cells``."""
    if cells and cells_where:
        msg = "Give --cells or --cells-where, not both."
        raise typer.BadParameter(msg)
    if cells_where:
        where: dict[str, list[str]] = {}
        for item in cells_where:
            column, sep, values = item.partition("=")
            if not sep or not column.strip() or not values.strip():
                msg = f"--cells-where {item!r}: expected COLUMN=VALUE[,VALUE...], e.g. cell_type=B,NK."
                raise typer.BadParameter(msg)
            where.setdefault(column.strip(), []).extend(v.strip() for v in values.split(","))
        return where
    return cells.split(",") if cells else None


@read_options("cells")
def gene_network(
    data: Annotated[
        Path, typer.Argument(help="Cells: .h5ad, 10x .h5 / folder, .csv/.tsv, .zarr (raw counts).")
    ],
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict,
    embedding: Annotated[
        str,
        typer.Option(
            help="context (decoder context embeddings averaged over the cells) | input (gene table)."
        ),
    ] = "context",
    genes: Annotated[
        str | None, typer.Option(help="Comma-separated genes (default: the --n-top-genes most variable).")
    ] = None,
    n_top_genes: Annotated[
        int, typer.Option(help="Default genes: this many highly variable panel genes.")
    ] = 2000,
    cells: Annotated[str | None, typer.Option(help="Comma-separated obs names (default: all cells).")] = None,
    cells_where: Annotated[
        list[str] | None,
        typer.Option("--cells-where", help="Select cells by obs column: COLUMN=VALUE[,VALUE] (repeatable)."),
    ] = None,
    gene_sets: Annotated[
        Path | None, typer.Option("--gene-sets", help="GMT file: name<TAB>description<TAB>genes...")
    ] = None,
    n_neighbors: Annotated[int, typer.Option(help="Neighbours per gene in the kNN graph.")] = 15,
    resolution: Annotated[float, typer.Option(help="Leiden resolution (higher: more modules).")] = 1.0,
    min_module_size: Annotated[
        int, typer.Option(help="Smallest module (smaller communities: no module).")
    ] = 5,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also find co-expression (Pearson) modules.")
    ] = True,
    key_added: KeyAdded = "scfoundation",
    target_depth: Annotated[
        str, typer.Option(help="T of the context embeddings: f1 (T = S) | tN | aY.")
    ] = "f1",
    batch_size: BatchSize = 4,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Gene modules (Leiden on a gene kNN graph) from scFoundation gene embeddings, with a co-expression baseline.

    Writes OUT (.h5ad over genes) and the enrichment table beside it (<stem>.enrichment.csv).
    """
    from msfm.models.scfoundation.network_inference import enrichment_csv_path
    from msfm.models.scfoundation.network_inference import gene_network as _gene_network

    result = _gene_network(
        data,
        checkpoint,
        genes=[g.strip() for g in genes.split(",") if g.strip()] if genes else None,
        cells=_cells(cells, cells_where),
        embedding=embedding,  # type: ignore[arg-type]
        n_top_genes=n_top_genes,
        n_neighbors=n_neighbors,
        resolution=resolution,
        min_module_size=min_module_size,
        gene_sets=gene_sets,
        baseline=baseline,
        key_added=key_added,
        target_depth=target_depth,
        batch_size=batch_size,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        seed=seed,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **read,
    )
    record = result.uns[key_added]["gene_network"]
    for method, info in record["modules"].items():
        typer.echo(f"{method}: {info['n_modules']} modules over {result.n_obs} genes")
    table = record.get("enrichment")
    if table is not None:
        best = table.sort_values("fdr", kind="stable").groupby("method", sort=False).head(3)
        for row in best.itertuples():
            typer.echo(
                f"  {row.method} module {row.module} ~ {row.gene_set}: {row.overlap}/{row.set_size} genes, "
                f"FDR {row.fdr:.2g}"
            )
    typer.echo(f"wrote {out} and {enrichment_csv_path(out)}")


def register(app: typer.Typer) -> None:
    """Add ``gene-network`` to the ``msfm scfoundation`` app."""
    app.command("gene-network")(gene_network)
