"""``msfm scmulan <verb>``: convert, annotate, organ, embed, generate, perturb, next-state, train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import check_output_free

app = typer.Typer(
    help=(
        "scMulan: cell-sentence GPT for zero-shot cell-type annotation, embeddings, organ/region prediction, "
        "conditional generation, in-silico perturbation, next-state prediction and training/fine-tuning."
    ),
    no_args_is_help=True,
)

Checkpoint = Annotated[Path, typer.Option("--checkpoint", "-c", help="msfm scMulan checkpoint directory.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Layer = Annotated[str | None, typer.Option(help="Matrix to read (default: layers['counts'], else X).")]
PreNorm = Annotated[
    bool, typer.Option("--pre-normalized", help="Input is already log1p-normalised (used as it is).")
]
GeneColumn = Annotated[str | None, typer.Option(help="var column with gene symbols or Ensembl IDs.")]
Species = Annotated[str, typer.Option(help="human | mouse (mouse genes mapped through orthologs).")]
NoAliases = Annotated[bool, typer.Option("--no-aliases", help="Do not map previous/alias gene symbols.")]
KeyAdded = Annotated[str, typer.Option(help="Prefix of the obs/obsm keys and the uns key.")]
BatchSize = Annotated[int, typer.Option(help="Cells (sentences) per batch.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
RepeatMaskOpt = Annotated[str, typer.Option(help="official | all | none (repeat ban while decoding).")]
Seed = Annotated[int, typer.Option(help="Random seed (each generated cell has its own stream).")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature.")]
TopK = Annotated[int | None, typer.Option(help="Sample among the k most probable words.")]
EndWeight = Annotated[float, typer.Option(help="Multiply the probability of <E> (the release's gamma).")]
Greedy = Annotated[bool, typer.Option("--greedy", help="Most probable word at every step (deterministic).")]
MaxNew = Annotated[int | None, typer.Option(help="Most words generated per cell.")]


def _gene_kwargs(gene_column: str | None, species: str, no_aliases: bool) -> dict[str, Any]:
    return {"gene_column": gene_column, "species": species, "use_aliases": not no_aliases}


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def _check_io(data: Path | None, *outs: Path | None, overwrite: bool) -> None:
    """Refuse an output that is the input or an existing file (before any model is loaded)."""
    for out in outs:
        if out is None:
            continue
        if data is not None and _same_path(out, data):
            msg = (
                f"--out {out} is the input file {data}; msfm never writes over its input. Choose another path "
                "(for example add '.scmulan' before '.h5ad')."
            )
            raise MsfmInputError(msg)
        check_output_free(out, overwrite=overwrite)
        if not out.parent.is_dir():
            msg = f"Cannot write {out}: the folder {out.parent} does not exist. Create it first."
            raise MsfmInputError(msg)


def _read(path: Path) -> Any:
    from msfm.data import read

    if not path.exists():
        msg = f"Input {path} does not exist."
        raise MsfmInputError(msg)
    return read(path)


def _write(adata: Any, out: Path, guard: Path | None) -> None:
    from msfm.runtime.h5ad import write_h5ad_atomic

    write_h5ad_atomic(adata, out, overwrite_input_guard=[guard] if guard is not None else [])
    typer.echo(f"wrote {out}")


def parse_prompt(text: str) -> dict[str, str]:
    """``'organ=Blood,cell_type=T cell'`` (or ``;``-separated) -> ``{"organ": "Blood", "cell_type": "T cell"}``."""
    sep = ";" if ";" in text else ","
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(sep)):
        if not part:
            continue
        if "=" not in part:
            msg = (
                f"--prompt {text!r}: {part!r} is not 'category=value'. Write e.g. "
                "--prompt 'organ=Blood,cell_type=T cell' (categories: organ, region, cell_type, "
                "coarse_cell_type, age, status, technology, sex)."
            )
            raise MsfmInputError(msg)
        key, value = (s.strip() for s in part.split("=", 1))
        if not key or not value:
            msg = f"--prompt {text!r}: empty category or value in {part!r}."
            raise MsfmInputError(msg)
        out[key] = value
    if not out:
        msg = f"--prompt {text!r} holds no 'category=value' pair."
        raise MsfmInputError(msg)
    return out


def _read_prompt_table(path: Path) -> Any:
    import pandas as pd

    if not path.exists():
        msg = f"Prompt table {path} does not exist."
        raise MsfmInputError(msg)
    sep = "\t" if path.suffix in (".tsv", ".tab", ".txt") else ","
    table = pd.read_csv(path, sep=sep, dtype=str)
    if table.empty:
        msg = f"Prompt table {path} has no rows; expected one row per prompt, one column per category."
        raise MsfmInputError(msg)
    return table


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"{what} {text!r}: expected comma-separated integers, e.g. 0,5,10."
        raise MsfmInputError(msg) from None


def _meta_option(text: str | None) -> dict[str, str] | None:
    return parse_prompt(text) if text else None


@app.command()
def convert(
    official: Annotated[Path, typer.Argument(help="Official ckpt_scMulan.pt (read with weights_only=True).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    overwrite: Overwrite = False,
) -> None:
    """Convert an official scMulan checkpoint into an msfm checkpoint directory."""
    from msfm.models.scmulan.api import convert as _convert

    path = _convert(official, out, overwrite=overwrite)
    typer.echo(f"wrote {path}")


@app.command()
def annotate(
    data: Annotated[Path, typer.Argument(help="Cells: .h5ad, 10x .h5 / folder, .csv/.tsv")],
    checkpoint: Checkpoint,
    out: Out,
    constrained: Annotated[
        bool, typer.Option("--constrained/--no-constrained", help="Restrict labels to cell-type tokens.")
    ] = True,
    min_confidence: Annotated[
        float, typer.Option(help="Below this confidence labels become Unclassified.")
    ] = 0.1,
    embedding: Annotated[str, typer.Option(help="official | task | mean")] = "official",
    repeat_mask: RepeatMaskOpt = "official",
    meta: Annotated[
        str | None,
        typer.Option(help="Metadata words from obs columns, e.g. 'organ=tissue' (category=column)."),
    ] = None,
    smoothing: Annotated[bool, typer.Option("--smoothing", help="Also kNN-smooth the fine labels.")] = False,
    n_neighbors: Annotated[int, typer.Option(help="Neighbours for --smoothing.")] = 15,
    batch_size: BatchSize = 32,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    gene_column: GeneColumn = None,
    species: Species = "human",
    no_aliases: NoAliases = False,
    key_added: KeyAdded = "scmulan",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cell types (coarse, fine, confidence) to obs and the embedding to obsm['X_scmulan']."""
    from msfm.models.scmulan.api import annotate as _annotate

    _check_io(data, out, overwrite=overwrite)
    adata = _read(data)
    _annotate(
        adata,
        checkpoint,
        constrained=constrained,
        min_confidence=min_confidence,
        embedding=embedding,
        repeat_mask=repeat_mask,
        meta=_meta_option(meta),
        smoothing=smoothing,
        n_neighbors=n_neighbors,
        batch_size=batch_size,
        device=device,
        layer=layer,
        pre_normalized=pre_normalized,
        key_added=key_added,
        progress=not quiet,
        **_gene_kwargs(gene_column, species, no_aliases),
    )
    _write(adata, out, data)


@app.command()
def embed(
    data: Annotated[Path, typer.Argument(help="Cells: .h5ad, 10x .h5 / folder, .csv/.tsv")],
    checkpoint: Checkpoint,
    out: Out,
    embedding: Annotated[str, typer.Option(help="official | task | mean")] = "official",
    batch_size: BatchSize = 32,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    gene_column: GeneColumn = None,
    species: Species = "human",
    no_aliases: NoAliases = False,
    key_added: KeyAdded = "scmulan",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cell embeddings only, to obsm['X_scmulan']."""
    from msfm.models.scmulan.api import embed as _embed

    _check_io(data, out, overwrite=overwrite)
    adata = _read(data)
    _embed(
        adata,
        checkpoint,
        embedding=embedding,
        batch_size=batch_size,
        device=device,
        layer=layer,
        pre_normalized=pre_normalized,
        key_added=key_added,
        progress=not quiet,
        **_gene_kwargs(gene_column, species, no_aliases),
    )
    _write(adata, out, data)


@app.command()
def organ(
    data: Annotated[Path, typer.Argument(help="Cells: .h5ad, 10x .h5 / folder, .csv/.tsv")],
    checkpoint: Checkpoint,
    out: Out,
    constrained: Annotated[
        bool, typer.Option("--constrained/--no-constrained", help="Restrict to organ, then region tokens.")
    ] = True,
    min_confidence: Annotated[float, typer.Option(help="Below this confidence -> Unclassified.")] = 0.0,
    repeat_mask: RepeatMaskOpt = "official",
    batch_size: BatchSize = 32,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    gene_column: GeneColumn = None,
    species: Species = "human",
    no_aliases: NoAliases = False,
    key_added: KeyAdded = "scmulan",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Organ and region of origin to obs['scmulan_organ'] / obs['scmulan_region']."""
    from msfm.models.scmulan.api import predict_organ

    _check_io(data, out, overwrite=overwrite)
    adata = _read(data)
    predict_organ(
        adata,
        checkpoint,
        constrained=constrained,
        min_confidence=min_confidence,
        repeat_mask=repeat_mask,
        batch_size=batch_size,
        device=device,
        layer=layer,
        pre_normalized=pre_normalized,
        key_added=key_added,
        progress=not quiet,
        **_gene_kwargs(gene_column, species, no_aliases),
    )
    _write(adata, out, data)


@app.command()
def generate(
    checkpoint: Checkpoint,
    out: Out,
    prompt: Annotated[
        list[str] | None,
        typer.Option(help="'organ=Blood,cell_type=T cell' (repeatable; one prompt each)."),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="CSV/TSV table: one row per prompt, one column per category.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Cells per prompt.")] = 1,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    end_weight: EndWeight = 1.0,
    max_new_tokens: MaxNew = None,
    repeat_mask: RepeatMaskOpt = "all",
    constrained: Annotated[
        bool, typer.Option("--constrained/--no-constrained", help="Only genes and <E> may be generated.")
    ] = True,
    greedy: Greedy = False,
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Generate cells from metadata prompts (X = level / 10 over the vocabulary genes)."""
    from msfm.models.scmulan.api import generate as _generate

    if (prompt is None or not prompt) == (prompts is None):
        msg = "Give prompts with --prompt 'organ=Blood,cell_type=T cell' (repeatable) or --prompts TABLE.csv (one of them)."
        raise MsfmInputError(msg)
    _check_io(prompts, out, overwrite=overwrite)
    records: Any = (
        _read_prompt_table(prompts) if prompts is not None else [parse_prompt(p) for p in prompt or []]
    )
    cells = _generate(
        checkpoint,
        records,
        n_per_prompt=n,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        end_weight=end_weight,
        max_new_tokens=max_new_tokens,
        repeat_mask=repeat_mask,
        constrained=constrained,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=not quiet,
    )
    _write(cells, out, None)


@app.command()
def perturb(
    checkpoint: Checkpoint,
    prompt: Annotated[
        str, typer.Option(help="Start state, e.g. 'organ=Bone marrow,cell_type=Haematopoietic stem cell'.")
    ],
    genes: Annotated[str, typer.Option(help="Comma-separated vocabulary genes, e.g. SPI1,GATA1.")],
    out: Out,
    scores: Annotated[
        Path | None, typer.Option(help="Scores table to write (.csv; default: OUT stem + '_scores.csv').")
    ] = None,
    levels: Annotated[str, typer.Option(help="Comma-separated levels 0..10 to force.")] = "0,5,10",
    n_cells: Annotated[int, typer.Option(help="Cells per condition (and for the control).")] = 50,
    reference: Annotated[Path | None, typer.Option(help="Real cells (.h5ad) defining the PCA space.")] = None,
    group_key: Annotated[str | None, typer.Option(help="reference.obs column with the groups.")] = None,
    source: Annotated[str | None, typer.Option(help="Start group, e.g. HSC.")] = None,
    targets: Annotated[
        str | None, typer.Option(help="Comma-separated direction groups, e.g. MEP,LMPP.")
    ] = None,
    n_pcs: Annotated[int, typer.Option(help="Principal components of the reference.")] = 10,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    end_weight: EndWeight = 1.0,
    max_new_tokens: MaxNew = None,
    greedy: Greedy = False,
    seed: Seed = 0,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    gene_column: GeneColumn = None,
    species: Species = "human",
    no_aliases: NoAliases = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """In-silico perturbation: force (gene, level) words after <SPToken1>; cells to --out, scores to --scores."""
    from msfm.models.scmulan.api import perturb as _perturb

    if scores is None:
        scores = out.with_name(f"{out.stem}_scores.csv")
    _check_io(reference, out, scores, overwrite=overwrite)
    if _same_path(out, scores):
        msg = "--out and --scores must be different files."
        raise MsfmInputError(msg)
    ref = _read(reference) if reference is not None else None
    cells, table = _perturb(
        checkpoint,
        parse_prompt(prompt),
        genes,
        _int_list(levels, "--levels"),
        n_cells=n_cells,
        reference=ref,
        group_key=group_key,
        source=source,
        targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
        n_pcs=n_pcs,
        temperature=temperature,
        top_k=top_k,
        end_weight=end_weight,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        seed=seed,
        batch_size=batch_size,
        device=device,
        layer=layer,
        pre_normalized=pre_normalized,
        progress=not quiet,
        **_gene_kwargs(gene_column, species, no_aliases),
    )
    from msfm.runtime.atomic import atomic_write_text

    _write(cells, out, reference)
    atomic_write_text(scores, table.to_csv(index=False))
    typer.echo(f"wrote {scores}")


@app.command("next-state")
def next_state(
    data: Annotated[Path, typer.Argument(help="Cells: .h5ad, 10x .h5 / folder, .csv/.tsv")],
    checkpoint: Checkpoint,
    out: Out,
    n_per_cell: Annotated[int, typer.Option(help="Predicted cells per input cell.")] = 1,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    end_weight: EndWeight = 1.0,
    max_new_tokens: MaxNew = None,
    greedy: Greedy = False,
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    gene_column: GeneColumn = None,
    species: Species = "human",
    no_aliases: NoAliases = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict each cell's next state (<SPToken2>; needs a model trained with the next_state task)."""
    from msfm.models.scmulan.api import next_state as _next_state

    _check_io(data, out, overwrite=overwrite)
    adata = _read(data)
    cells = _next_state(
        adata,
        checkpoint,
        n_per_cell=n_per_cell,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        end_weight=end_weight,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        device=device,
        layer=layer,
        pre_normalized=pre_normalized,
        progress=not quiet,
        **_gene_kwargs(gene_column, species, no_aliases),
    )
    _write(cells, out, data)


@app.command()
def train(
    data: Annotated[list[Path], typer.Argument(help="One or more .h5ad files (cells with metadata in obs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (resumes if it holds a run).")],
    config: Annotated[Path | None, typer.Option(help="YAML/JSON with ScMulanTrainConfig fields.")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Fine-tune this checkpoint directory (e.g. a converted official one).")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset of a new model, e.g. scmulan-tiny.")] = None,
    meta_columns: Annotated[
        str | None, typer.Option(help="category=obs column pairs, e.g. 'cell_type=celltype,organ=tissue'.")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Task weights, e.g. 'annotate=1,generate=1,next_state=0.5'.")
    ] = None,
    time_key: Annotated[
        str | None, typer.Option(help="obs column with time/pseudotime (next_state).")
    ] = None,
    pair_key: Annotated[str | None, typer.Option(help="obs column grouping cells that may pair.")] = None,
    vocabulary: Annotated[
        str | None, typer.Option(help="data | official | path to a vocabulary JSON.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sentences per device per micro-step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto | cpu | gpu")] = None,
    devices: Annotated[str | None, typer.Option(help="auto | N | 0,1")] = None,
    strategy: Annotated[str | None, typer.Option(help="auto | ddp | fsdp")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Nodes.")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true | bf16-mixed | 16-mixed")] = None,
    accumulate: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of cells held out.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Save last.ckpt and model/ every N steps.")
    ] = None,
    expression_weight: Annotated[
        float | None, typer.Option(help="Weight of the expression MSE (release: 200; small new models: ~1).")
    ] = None,
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    quiet: Quiet = False,
) -> None:
    """Train scMulan from scratch, or fine-tune a checkpoint with --init-from (new labels grow the vocabulary)."""
    from msfm.models.scmulan.train import ScMulanTrainConfig
    from msfm.models.scmulan.train import train as _train

    cfg = ScMulanTrainConfig.from_file(config) if config else ScMulanTrainConfig()
    overrides = {
        "init_from": str(init_from) if init_from is not None else None,
        "preset": preset,
        "meta_columns": meta_columns,
        "tasks": tasks,
        "time_key": time_key,
        "pair_key": pair_key,
        "vocabulary": vocabulary,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "num_nodes": num_nodes,
        "precision": precision,
        "accumulate": accumulate,
        "val_fraction": val_fraction,
        "seed": seed,
        "num_workers": num_workers,
        "checkpoint_every_n_steps": checkpoint_every,
        "expression_weight": expression_weight,
        "layer": layer,
        "pre_normalized": True if pre_normalized else None,
    }
    cfg = cfg.with_overrides({k: v for k, v in overrides.items() if v is not None}, progress_bar=not quiet)
    path = _train([str(p) for p in data], out, cfg)
    typer.echo(f"model written to {path}")
