"""``msfm gest <verb>``: train, generate, embed, perturb, evaluate, fit-classifier, predict.

Each command parses its options and calls the verb of :mod:`msfm.gest` with the same name. Data is an ``.h5ad``
(or another format :func:`msfm.data.read` knows, or a Visium ``outs`` folder); outputs are written atomically,
refused when they exist (``--overwrite`` replaces them) and never written over the input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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
    Seed,
    read_options,
    trainer_options,
)
from msfm.errors import MsfmInputError

__all__ = ["app", "parse_box", "parse_names"]

app = typer.Typer(
    help=(
        "GeST: generative spatial transcriptomics. Train a spatial decoder over meta-cell tokens, generate "
        "expression at held-out or new positions, embed and cluster niches, perturb a region in silico, evaluate "
        "against baselines and fine-tune a niche classifier."
    ),
    no_args_is_help=True,
)

Data = Annotated[
    Path,
    typer.Argument(
        help="Cells/spots with obsm['spatial']: .h5ad (or another format msfm.data.read knows) or a Visium outs "
        "folder (spatial/ + a 10x .h5 matrix)."
    ),
]
SideUm = Annotated[float | None, typer.Option(help="Window side in µm (default: the trained side).")]
GenMode = Annotated[
    str, typer.Option("--mode", help="pick (most likely meta-cell) | weighted (expected profile) | sample.")
]
Temperature = Annotated[float, typer.Option(help="Softmax temperature of --mode sample.")]
NicheCells = Annotated[int, typer.Option(help="Cells per niche sequence (centre included).")]


def parse_names(text: str | None, option: str = "", allowed: tuple[str, ...] | None = None) -> list[str]:
    """``'G1, G2'`` -> ``['G1', 'G2']`` (empty or None -> []); with ``allowed``, every name must be one of them.

    Raises:
        MsfmInputError: a name outside ``allowed``.
    """
    items = [g.strip() for g in (text or "").split(",") if g.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            msg = f"{option} {text!r}: expected a comma-separated subset of {', '.join(allowed)}."
            raise MsfmInputError(msg)
    return items


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``'x0,y0,x1,y1'`` -> a tuple of four floats with x1 > x0 and y1 > y0.

    Raises:
        MsfmInputError: not four numbers, or an empty box.
    """
    try:
        vals = [float(p.strip()) for p in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(v == v and abs(v) != float("inf") for v in vals):
        msg = f"--region-box {text!r}: expected four numbers x0,y0,x1,y1 (units of obsm['spatial']), e.g. 100,100,300,250."
        raise MsfmInputError(msg)
    x0, y0, x1, y1 = vals
    if not (x1 > x0 and y1 > y0):
        msg = f"--region-box {text!r}: need x1 > x0 and y1 > y0 (corners x0,y0 then x1,y1)."
        raise MsfmInputError(msg)
    return (x0, y0, x1, y1)


def _int_tuple(text: str, option: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        msg = f"{option} {text!r}: expected comma-separated integers, e.g. 15,10,5."
        raise MsfmInputError(msg) from None


def _given_read(read: dict[str, Any]) -> dict[str, Any]:
    """The reading options the user changed (defaults left out, so a --config file's values stand)."""
    from msfm.data.options import SpatialReadOptions

    fields = SpatialReadOptions.model_fields
    return {k: v for k, v in read.items() if k not in fields or v != fields[k].default}


def _echo_table(df: Any) -> None:
    import pandas as pd

    with pd.option_context(
        "display.max_columns", 50, "display.width", 160, "display.float_format", "{:.4f}".format
    ):
        typer.echo(df.to_string())


@app.command()
@read_options("spatial")
@trainer_options()
def train(
    data: Data,
    out: OutDir,
    read: dict[str, Any],
    overrides: dict[str, Any],
    config: Config = None,
    preset: Preset = None,
    checkpoint: InitCheckpoint = None,
    n_genes: Annotated[int | None, typer.Option(help="Top-variance genes modelled (default 2000).")] = None,
    n_metacells: Annotated[
        int | None, typer.Option(help="Meta-cell vocabulary size K (default 2048).")
    ] = None,
    n_pcs: Annotated[int | None, typer.Option(help="PCA dimensions of the vocabulary (default 50).")] = None,
    levels: Annotated[
        str | None, typer.Option(help="Coarser nested levels of the hierarchy, e.g. 15,10,5 (default).")
    ] = None,
    side_um: Annotated[float | None, typer.Option(help="Window side in µm (default 600).")] = None,
    max_cells: Annotated[int | None, typer.Option(help="Most cells per window (default 1024).")] = None,
    order: Annotated[
        str | None, typer.Option(help="Serialisation: corner_sweep (paper) | random | raster.")
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 100).")] = None,
    hold_out_column: Annotated[
        str | None,
        typer.Option(help="Boolean obs column: those cells are left out of training (for evaluate)."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Pretrain GeST (vocabulary + decoder) into OUT; re-running the same command resumes a stopped run."""
    from msfm.models.gest.pretrain import train as _train

    settings = {
        **overrides,
        **_given_read(read),
        "preset": preset,
        "n_genes": n_genes,
        "n_metacells": n_metacells,
        "n_pcs": n_pcs,
        "levels": _int_tuple(levels, "--levels") if levels is not None else None,
        "side_um": side_um,
        "max_cells": max_cells,
        "order": order,
        "optim.warmup_steps": warmup_steps,
        "trainer.progress_bar": False if quiet else None,
    }
    if (out / "checkpoints" / "last.ckpt").is_file():
        typer.echo(f"resuming the run in {out}")
    result = _train(
        data,
        out,
        config=config,
        checkpoint=checkpoint,
        held_out=hold_out_column,
        **{k: v for k, v in settings.items() if v is not None},
    )
    m = result.metrics
    typer.echo(
        f"trained on {m['n_train_cells']} of {m['n_cells']} cells; model written to {result.checkpoint}"
    )


@app.command()
@read_options("spatial")
def generate(
    data: Data,
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict[str, Any],
    query_column: Annotated[
        str | None, typer.Option(help="Boolean obs column: generate these cells from the others.")
    ] = None,
    positions: Annotated[
        Path | None, typer.Option(help="CSV/TSV with x,y columns (obsm units): new positions to generate.")
    ] = None,
    positions_section: Annotated[
        str | None, typer.Option(help="Section of --positions (with --section-key and several sections).")
    ] = None,
    mode: GenMode = "pick",
    temperature: Temperature = 1.0,
    side_um: SideUm = None,
    max_context: Annotated[
        int | None, typer.Option(help="Known cells per window (default: half the trained max_cells).")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute every step instead of KV caching (same result).")
    ] = False,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Generate expression at held-out cells (--query-column) or new positions (--positions)."""
    from msfm.models.gest.generation import generate as _generate

    result = _generate(
        data,
        checkpoint,
        query=query_column,
        positions=positions,
        positions_section=positions_section,
        mode=mode,
        temperature=temperature,
        side_um=side_um,
        max_context=max_context,
        use_cache=not no_cache,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **read,
    )
    typer.echo(f"wrote {out} ({result.n_obs} x {result.n_vars})")


@app.command()
@read_options("spatial")
def embed(
    data: Data,
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict[str, Any],
    key_added: KeyAdded = "gest",
    max_cells: NicheCells = 256,
    side_um: SideUm = None,
    cluster: Annotated[str, typer.Option(help="Cluster the niches: kmeans | leiden | none.")] = "none",
    n_clusters: Annotated[int | None, typer.Option(help="Clusters of --cluster kmeans.")] = None,
    resolution: Annotated[float, typer.Option(help="Resolution of --cluster leiden.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the clustering.")] = 0,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    precision: Precision = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Zero-shot niche embeddings to obsm['X_<key>'], optionally clustered into obs['<key>_niche']."""
    from msfm.models.gest.niches import cluster_niches
    from msfm.models.gest.niches import embed as _embed
    from msfm.runtime.h5ad import check_output, write_output

    if cluster not in ("kmeans", "leiden", "none"):
        msg = f"--cluster {cluster!r}: expected kmeans, leiden or none."
        raise MsfmInputError(msg)
    if cluster == "kmeans" and (n_clusters is None or n_clusters < 2):
        msg = f"--cluster kmeans needs --n-clusters N (N >= 2); got {n_clusters}."
        raise MsfmInputError(msg)
    target = check_output(out, overwrite=overwrite, data=data)
    result = _embed(
        data,
        checkpoint,
        side_um=side_um,
        max_cells=max_cells,
        key_added=key_added,
        batch_size=batch_size,
        device=device,
        precision=precision,
        progress=not quiet,
        **read,
    )
    if cluster != "none":
        cluster_niches(
            result,
            key_added=key_added,
            method=cluster,  # type: ignore[arg-type]
            n_clusters=n_clusters,
            resolution=resolution,
            seed=seed,
        )
        counts = result.obs[f"{key_added}_niche"].value_counts().sort_index().to_dict()
        typer.echo(f"{cluster} niches in obs['{key_added}_niche']: {counts}")
    write_output(result, target, data, replace=overwrite)
    typer.echo(f"wrote {out}: obsm['X_{key_added}'] {result.obsm[f'X_{key_added}'].shape}")


@app.command()
@read_options("spatial")
def perturb(
    data: Data,
    checkpoint: Checkpoint,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: perturbation.h5ad, report.csv, summary.json, perturbation.png.",
        ),
    ],
    read: dict[str, Any],
    region_box: Annotated[
        str | None, typer.Option(help="Region as x0,y0,x1,y1 (units of obsm['spatial']).")
    ] = None,
    region_polygon: Annotated[
        Path | None, typer.Option(help="Region polygon: CSV/TSV with x,y columns, one vertex a row (>= 3).")
    ] = None,
    region_column: Annotated[str | None, typer.Option(help="Region as a boolean obs column.")] = None,
    up: Annotated[str | None, typer.Option(help="Genes pushed up in the region, e.g. G1,G2.")] = None,
    down: Annotated[str | None, typer.Option(help="Genes pushed down in the region.")] = None,
    how: Annotated[
        str, typer.Option(help="set_quantile (default amount 0.95) | scale (x4) | add_log_fc (+1).")
    ] = "set_quantile",
    amount: Annotated[float | None, typer.Option(help="Size of the edit (see --how).")] = None,
    ring_um: Annotated[
        float | None,
        typer.Option(help="Regenerate cells within this distance of the region (default side/4)."),
    ] = None,
    context: Annotated[
        str,
        typer.Option(help="region (only region cells known, as in the paper) | all (every non-target cell)."),
    ] = "region",
    perturb_mode: Annotated[
        str,
        typer.Option(
            help="requantize (paper: edits pass through meta-cell tokens, may be no-ops) | continuous (msfm "
            "extension: edited expression fed directly)."
        ),
    ] = "requantize",
    mode: GenMode = "weighted",
    n_samples: Annotated[int, typer.Option(help="Draws averaged with --mode sample.")] = 1,
    temperature: Temperature = 1.0,
    seed: Seed = 0,
    reference_up: Annotated[
        str | None, typer.Option(help="Reference up-regulated DEGs (scores the direction of change).")
    ] = None,
    reference_down: Annotated[str | None, typer.Option(help="Reference down-regulated DEGs.")] = None,
    batch_size: BatchSize = 16,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Edit genes in a region and compare the regenerated surroundings with a control generation."""
    from msfm.models.gest.perturbation import perturb as _perturb

    result = _perturb(
        data,
        checkpoint,
        region_box=parse_box(region_box) if region_box is not None else None,
        region_polygon=region_polygon,
        region_cells=region_column,
        genes_up=parse_names(up),
        genes_down=parse_names(down),
        how=how,  # type: ignore[arg-type]
        amount=amount,
        ring_um=ring_um,
        context=context,  # type: ignore[arg-type]
        perturb_mode=perturb_mode,  # type: ignore[arg-type]
        mode=mode,
        n_samples=n_samples,
        temperature=temperature,
        seed=seed,
        reference_up=parse_names(reference_up) or None,
        reference_down=parse_names(reference_down) or None,
        batch_size=batch_size,
        device=device,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **read,
    )
    for key, value in result.summary.items():
        if isinstance(value, float):
            typer.echo(f"{key}: {value:.4g}")
        elif isinstance(value, str | int | bool) or value is None:
            typer.echo(f"{key}: {value}")
    if result.summary.get("no_op"):
        typer.secho(
            "warning: the edit moved no region cell to another meta-cell, so the model input did not change and "
            "the perturbation is a no-op. Use a stronger edit (--amount, --how) or --perturb-mode continuous.",
            fg=typer.colors.YELLOW,
        )
    typer.echo(f"wrote {out}/ (perturbation.h5ad, report.csv, summary.json, perturbation.png)")


@app.command()
@read_options("spatial")
def evaluate(
    data: Data,
    checkpoint: Checkpoint,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output folder: generation.csv (+ niches.csv), predictions.npz, result.json."
        ),
    ],
    read: dict[str, Any],
    held_out_column: Annotated[
        str,
        typer.Option(
            help="Boolean obs column of held-out cells (left out of training with --hold-out-column)."
        ),
    ],
    baselines: Annotated[
        str, typer.Option(help="Baselines among mean, knn, mlp, gp (or none).")
    ] = "mean,knn,mlp,gp",
    modes: Annotated[
        str, typer.Option(help="GeST output modes among pick, weighted, sample.")
    ] = "pick,weighted",
    n_top_genes: Annotated[int, typer.Option(help="Top spatially variable genes for rmse_top.")] = 200,
    labels_key: Annotated[
        str | None, typer.Option(help="obs column of niche labels: also score niche clustering (AMI/ARI).")
    ] = None,
    n_clusters: Annotated[
        int | None, typer.Option(help="Clusters for the niche scores (default: n labels).")
    ] = None,
    max_cells: NicheCells = 256,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Score generation of held-out cells against baselines (and niche clustering against labels)."""
    from msfm.models.gest.evaluation import evaluate as _evaluate

    none = baselines.strip().lower() in ("", "none")
    result = _evaluate(
        data,
        checkpoint,
        held_out=held_out_column,
        baselines=() if none else tuple(parse_names(baselines, "--baselines", ("mean", "knn", "mlp", "gp"))),
        modes=tuple(parse_names(modes, "--modes", ("pick", "weighted", "sample"))),
        n_top_genes=n_top_genes,
        labels_key=labels_key,
        n_clusters=n_clusters,
        max_cells=max_cells,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **read,
    )
    typer.echo(f"generation of {result.params['n_held_out']} held-out cells:")
    _echo_table(result.table)
    if result.niches is not None:
        typer.echo(f"niche clustering against obs[{labels_key!r}]:")
        _echo_table(result.niches)
    typer.echo(f"wrote {out}/")


@app.command("fit-classifier")
@read_options("spatial")
@trainer_options(
    "max_steps", "batch_size", "lr", "accelerator", "devices", "strategy", "precision", "seed",
    "checkpoint_every_n_steps", "allow_config_change",
)  # fmt: skip
def fit_classifier(
    data: Data,
    checkpoint: Checkpoint,
    out: OutDir,
    read: dict[str, Any],
    overrides: dict[str, Any],
    labels_key: Annotated[str, typer.Option(help="obs column with the niche labels.")],
    config: Config = None,
    max_cells: Annotated[int | None, typer.Option(help="Cells per niche sequence (default 64).")] = None,
    side_um: SideUm = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of labelled cells held out for validation (default 0.2).")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune GeST plus a linear head to predict niche labels (OUT/model, for `msfm gest predict`)."""
    from msfm.models.gest.classifier import fit_classifier as _fit

    settings = {
        **overrides,
        **_given_read(read),
        "max_cells": max_cells,
        "side_um": side_um,
        "val_fraction": val_fraction,
        "trainer.progress_bar": False if quiet else None,
    }
    result = _fit(
        data,
        checkpoint,
        labels_key=labels_key,
        out=out,
        config=config,
        **{k: v for k, v in settings.items() if v is not None},
    )
    typer.echo(f"niche classifier written to {result.checkpoint}")


@app.command()
@read_options("spatial")
def predict(
    data: Data,
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", "-c", help="Niche classifier checkpoint (fit-classifier OUT/model)."),
    ],
    out: OutH5ad,
    read: dict[str, Any],
    key_added: KeyAdded = "gest",
    batch_size: BatchSize = 64,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict niche labels with a fine-tuned classifier into obs['<key>_<labels_key>']."""
    from msfm.models.gest.classifier import predict as _predict

    result = _predict(
        data,
        checkpoint,
        key_added=key_added,
        batch_size=batch_size,
        device=device,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **read,
    )
    labels_key = result.uns[key_added]["predict"]["labels_key"]
    counts = result.obs[f"{key_added}_{labels_key}"].value_counts().to_dict()
    typer.echo(f"niche labels in obs['{key_added}_{labels_key}']: {counts}")
    typer.echo(f"wrote {out}")
