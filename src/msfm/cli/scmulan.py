"""``msfm scmulan <verb>``: convert, predict, embed, generate, perturb, perturb-screen, next-state, train.

Every command parses its options and calls the verb of the same name in ``msfm.scmulan``; the decoding options
are declared once below (they are the fields of ``msfm.scmulan.DecodeOptions``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

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
    option_group,
    option_parameter,
    read_options,
    trainer_options,
)

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    help=(
        "scMulan: cell-sentence GPT for zero-shot cell-type and organ prediction, embeddings, conditional "
        "generation, in-silico perturbation, next-state prediction and training/fine-tuning."
    ),
    no_args_is_help=True,
)

Data = Annotated[Path, typer.Argument(help="Cells: .h5ad, 10x .h5 / folder, .csv/.tsv, .zarr")]


# Decoding options (the fields of msfm.scmulan.DecodeOptions), declared once; unset ones keep the verb's defaults.
def _decode_option(name: str, annotation: Any) -> inspect.Parameter:
    return option_parameter(name, annotation, None)


_DECODE_OPTIONS = {
    "constrained": _decode_option(
        "constrained",
        Annotated[
            bool | None,
            typer.Option(
                "--constrained/--no-constrained",
                help="Restrict each step to the words the task expects (default); --no-constrained decodes as the release.",
            ),
        ],
    ),
    "repeat_mask": _decode_option(
        "repeat_mask",
        Annotated[
            str | None,
            typer.Option(
                help="Repeat ban while decoding: official | all | generated | none (default: the verb's)."
            ),
        ],
    ),
    "greedy": _decode_option(
        "greedy",
        Annotated[
            bool | None,
            typer.Option("--greedy/--sample", help="Most probable word at every step, or sample (default)."),
        ],
    ),
    "temperature": _decode_option(
        "temperature", Annotated[float | None, typer.Option(help="Sampling temperature (default 1).")]
    ),
    "top_k": _decode_option(
        "top_k", Annotated[int | None, typer.Option(help="Sample among the k most probable words.")]
    ),
    "end_weight": _decode_option(
        "end_weight",
        Annotated[
            float | None,
            typer.Option(help="Multiply the probability of <E> (the release's gamma; 0.1 in the paper)."),
        ],
    ),
    "max_new_tokens": _decode_option(
        "max_new_tokens",
        Annotated[
            int | None,
            typer.Option(help="Most words generated per cell (default: every gene once, within max_length)."),
        ],
    ),
    "seed": _decode_option("seed", Seed),
}
#: The decoding options of open generation (generate, perturb, perturb-screen).
_GENERATION = (
    "greedy",
    "temperature",
    "top_k",
    "end_weight",
    "max_new_tokens",
    "repeat_mask",
    "constrained",
    "seed",
)


def decode_options(*names: str) -> Callable[[F], F]:
    """Add the decoding options ``names`` to a command; it receives the ones given as ``decode`` (a dict)."""
    return option_group([_DECODE_OPTIONS[n] for n in names], "decode")


MaxTokens = Annotated[int, typer.Option(help="Most words (cells x longest prompt) per batch.")]

# Options of the prediction commands.
Target = Annotated[str, typer.Option(help="cell_type (coarse and fine) | organ (organ and region).")]
MinConfidence = Annotated[
    float | None,
    typer.Option(
        help="Below this confidence labels become Unclassified (default 0.1 for cell types, 0 for organs)."
    ),
]
Embedding = Annotated[str, typer.Option(help="official | task | mean")]
Meta = Annotated[
    str | None,
    typer.Option(help="Metadata words from obs columns, e.g. 'organ=tissue' (category=column)."),
]


def _meta(text: str | None) -> dict[str, str] | None:
    from msfm.models.scmulan.prompts import parse_prompt

    return parse_prompt(text) if text else None


def _deprecated(old: str, new: str) -> None:
    typer.echo(
        f"`msfm scmulan {old}` is deprecated and will be removed in the next release; use `{new}`.", err=True
    )


@app.command()
def convert(
    official: Annotated[Path, typer.Argument(help="Official ckpt_scMulan.pt (read with weights_only=True).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    overwrite: Overwrite = False,
) -> None:
    """Convert an official scMulan checkpoint into an msfm checkpoint directory."""
    import msfm

    typer.echo(f"wrote {msfm.scmulan.convert(official, out, overwrite=overwrite)}")


@app.command()
@read_options("cells")
@decode_options("constrained", "repeat_mask")
def predict(
    data: Data,
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict,
    decode: dict,
    target: Target = "cell_type",
    min_confidence: MinConfidence = None,
    embedding: Embedding = "official",
    meta: Meta = None,
    smoothing: Annotated[bool, typer.Option("--smoothing", help="Also kNN-smooth the fine labels.")] = False,
    n_neighbors: Annotated[int, typer.Option(help="Neighbours for --smoothing.")] = 15,
    batch_size: BatchSize = 32,
    max_tokens: MaxTokens = 32768,
    device: Device = "auto",
    precision: Precision = "auto",
    key_added: KeyAdded = "scmulan",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cell types (coarse, fine, confidence; embedding to obsm['X_scmulan']), or organ and region (--target organ)."""
    import msfm

    msfm.scmulan.predict(
        data,
        checkpoint,
        target=target,
        key_added=key_added,
        min_confidence=min_confidence,
        meta=_meta(meta),
        embedding=embedding,
        smoothing=smoothing,
        n_neighbors=n_neighbors,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **decode,
        **read,
    )
    typer.echo(f"wrote {out}")


def _with_defaults(command: Callable[..., Any], **defaults: Any) -> Callable[..., Any]:
    """``command`` with other defaults (for an old command name that meant a setting of the new one)."""
    sig = inspect.signature(command)
    params = [
        p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        return command(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


# Old command names, one release (click prints a deprecation note when they run).
app.command("annotate", hidden=True, deprecated=True, help="Deprecated: msfm scmulan predict.")(predict)
app.command("organ", hidden=True, deprecated=True, help="Deprecated: msfm scmulan predict --target organ.")(
    _with_defaults(predict, target="organ")
)


@app.command()
@read_options("cells")
@decode_options("constrained", "repeat_mask")
def embed(
    data: Data,
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict,
    decode: dict,
    embedding: Embedding = "official",
    meta: Meta = None,
    batch_size: BatchSize = 32,
    max_tokens: MaxTokens = 32768,
    device: Device = "auto",
    precision: Precision = "auto",
    key_added: KeyAdded = "scmulan",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cell embeddings to obsm['X_scmulan']."""
    import msfm

    msfm.scmulan.embed(
        data,
        checkpoint,
        key_added=key_added,
        embedding=embedding,
        meta=_meta(meta),
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **decode,
        **read,
    )
    typer.echo(f"wrote {out}")


@app.command()
@decode_options(*_GENERATION)
def generate(
    checkpoint: Checkpoint,
    out: OutH5ad,
    decode: dict,
    prompts: Annotated[
        list[str] | None,
        typer.Argument(
            help="Prompts: 'organ=Blood,cell_type=T cell' (one per argument) or .csv/.tsv tables (a row each)."
        ),
    ] = None,
    n_per_prompt: Annotated[int, typer.Option("--n-per-prompt", "--n", help="Cells per prompt.")] = 1,
    batch_size: BatchSize = 64,
    max_tokens: MaxTokens = 32768,
    device: Device = "auto",
    prompt: Annotated[list[str] | None, typer.Option(hidden=True)] = None,
    prompt_table: Annotated[Path | None, typer.Option("--prompts", hidden=True)] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Generate cells from metadata prompts (X = level / 10 over the vocabulary genes)."""
    import msfm
    from msfm.errors import MsfmInputError

    given: list[Any] = list(prompts or [])
    if prompt or prompt_table is not None:
        _deprecated("generate --prompt/--prompts", "msfm scmulan generate PROMPT... (positional)")
        given += [*(prompt or []), *([prompt_table] if prompt_table is not None else [])]
    if not given:
        msg = "Give prompts: msfm scmulan generate 'organ=Blood,cell_type=T cell' [more prompts or prompts.csv] -c CKPT -o OUT."
        raise MsfmInputError(msg)
    msfm.scmulan.generate(
        given,
        checkpoint,
        n_per_prompt=n_per_prompt,
        device=device,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **decode,
    )
    typer.echo(f"wrote {out}")


Prompt = Annotated[
    str, typer.Argument(help="Start state, e.g. 'organ=Bone marrow,cell_type=Haematopoietic stem cell'.")
]
Reference = Annotated[
    Path | None, typer.Option(help="Real cells (.h5ad ...) defining the PCA space and the groups.")
]
GroupKey = Annotated[str | None, typer.Option(help="obs column of --reference with the groups.")]
Source = Annotated[str | None, typer.Option(help="Start group of the reference, e.g. HSC.")]
Targets = Annotated[str | None, typer.Option(help="Comma-separated direction groups, e.g. MEP,LMPP.")]
NCells = Annotated[int, typer.Option(help="Generated cells per condition (and for the control).")]


def _targets(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _levels(text: str) -> list[int]:
    from msfm.errors import MsfmInputError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"--levels {text!r}: expected comma-separated integers, e.g. 0,5,10."
        raise MsfmInputError(msg) from None


@app.command()
@read_options("cells")
@decode_options(*_GENERATION)
def perturb(
    prompt: Prompt,
    checkpoint: Checkpoint,
    out: OutDir,
    genes: Annotated[str, typer.Option(help="Comma-separated vocabulary genes, e.g. SPI1,GATA1.")],
    read: dict,
    decode: dict,
    levels: Annotated[str, typer.Option(help="Comma-separated levels 0..10 to force.")] = "0,5,10",
    n_cells: NCells = 50,
    reference: Reference = None,
    group_key: GroupKey = None,
    source: Source = None,
    targets: Targets = None,
    n_pcs: Annotated[int, typer.Option(help="Principal components of the reference.")] = 10,
    batch_size: BatchSize = 64,
    max_tokens: MaxTokens = 32768,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """In-silico perturbation: force (gene, level) words after <SPToken1>; writes OUTDIR/cells.h5ad and scores.csv."""
    import msfm
    from msfm.runtime.atomic import check_output_free

    check_output_free(out, overwrite=overwrite)
    result = msfm.scmulan.perturb(
        prompt,
        checkpoint,
        genes=genes,
        levels=_levels(levels),
        n_cells=n_cells,
        reference=reference,
        group_key=group_key,
        source=source,
        targets=_targets(targets),
        n_pcs=n_pcs,
        device=device,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=not quiet,
        **decode,
        **read,
    )
    typer.echo(f"wrote {result.save(out, overwrite=overwrite)}")


@app.command("perturb-screen")
@read_options("cells")
@decode_options(*_GENERATION)
def perturb_screen(
    prompt: Prompt,
    checkpoint: Checkpoint,
    out: OutDir,
    read: dict,
    decode: dict,
    genes: Annotated[
        str | None,
        typer.Option(help="Comma-separated vocabulary genes (default: every gene of the vocabulary)."),
    ] = None,
    level: Annotated[int | None, typer.Option(help="Level to force (default: the highest).")] = None,
    n_cells: NCells = 50,
    reference: Reference = None,
    group_key: GroupKey = None,
    source: Source = None,
    targets: Targets = None,
    sort_by: Annotated[
        str | None, typer.Option(help="Score column to rank by (default: score_<first target>).")
    ] = None,
    batch_size: BatchSize = 64,
    max_tokens: MaxTokens = 32768,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Regulator screen: perturb many genes at one level and rank them; writes OUTDIR/scores.csv."""
    import msfm
    from msfm.runtime.atomic import check_output_free

    check_output_free(out, overwrite=overwrite)
    result = msfm.scmulan.perturb_screen(
        prompt,
        checkpoint,
        genes=genes,
        level=level,
        n_cells=n_cells,
        reference=reference,
        group_key=group_key,
        source=source,
        targets=_targets(targets),
        sort_by=sort_by,
        device=device,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=not quiet,
        **decode,
        **read,
    )
    typer.echo(f"wrote {result.save(out, overwrite=overwrite)}")


@app.command("next-state")
@read_options("cells")
@decode_options("greedy", "temperature", "top_k", "end_weight", "max_new_tokens", "repeat_mask", "seed")
def next_state(
    data: Data,
    checkpoint: Checkpoint,
    out: OutH5ad,
    read: dict,
    decode: dict,
    n_per_cell: Annotated[int, typer.Option(help="Predicted cells per input cell.")] = 1,
    batch_size: BatchSize = 32,
    max_tokens: MaxTokens = 32768,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Predict each cell's next state (<SPToken2>; needs a model trained with the next_state task)."""
    import msfm

    msfm.scmulan.next_state(
        data,
        checkpoint,
        n_per_cell=n_per_cell,
        device=device,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=not quiet,
        out=out,
        overwrite=overwrite,
        **decode,
        **read,
    )
    typer.echo(f"wrote {out}")


@app.command()
@read_options("cells")
@trainer_options()
def train(
    data: Annotated[list[Path], typer.Argument(help="One or more .h5ad files (cells with metadata in obs).")],
    out: OutDir,
    read: dict,
    overrides: dict,
    config: Config = None,
    preset: Preset = None,
    checkpoint: InitCheckpoint = None,
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
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of cells held out.")] = None,
    n_genes: Annotated[
        int | None,
        typer.Option(
            help="'data' vocabulary: the N most variable genes (default 2000; fewer trains faster)."
        ),
    ] = None,
    expression_weight: Annotated[
        float | None, typer.Option(help="Weight of the expression MSE (release: 200; small new models: ~1).")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Train scMulan from scratch, or fine-tune a checkpoint with -c (new labels grow the vocabulary)."""
    import msfm
    from msfm.data import CellReadOptions

    # Reading options given on the command line (their defaults must not replace a --config file's values).
    given_read = {k: v for k, v in read.items() if v != CellReadOptions.model_fields[k].default}
    settings = {
        "preset": preset,
        "meta_columns": meta_columns,
        "tasks": tasks,
        "time_key": time_key,
        "pair_key": pair_key,
        "vocabulary": vocabulary,
        "val_fraction": val_fraction,
        "n_genes": n_genes,
        "expression_weight": expression_weight,
        "progress_bar": False if quiet else None,
    }
    result = msfm.scmulan.train(
        [str(p) for p in data],
        out,
        config=config,
        checkpoint=checkpoint,
        **{k: v for k, v in settings.items() if v is not None},
        **given_read,
        **overrides,
    )
    typer.echo(f"model written to {result.checkpoint}")
