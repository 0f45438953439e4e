"""The options every ``msfm <family> <verb>`` shares, declared once.

Single options are ``Annotated`` aliases (``checkpoint: Checkpoint``). The two groups that every reading or
training verb takes are decorators that add their options to a command and hand them over as one mapping:

* :func:`read_options` adds the reading options of :class:`msfm.data.CellReadOptions` (or
  :class:`msfm.data.SpatialReadOptions`) and passes ``read={...}``, ready for ``**read`` in the API call;
* :func:`trainer_options` adds the training options and passes ``overrides={...}`` (unset options left out, so a
  ``--config`` file's values stand), ready for ``train(..., config=..., **overrides)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

__all__ = [
    "BatchSize",
    "Checkpoint",
    "Config",
    "Device",
    "InitCheckpoint",
    "KeyAdded",
    "Out",
    "OutCsv",
    "OutDir",
    "OutH5ad",
    "PRECISION_HELP",
    "Overwrite",
    "Precision",
    "Preset",
    "Quiet",
    "Seed",
    "option_group",
    "option_parameter",
    "output_suffix",
    "read_options",
    "trainer_options",
]

F = TypeVar("F", bound=Callable[..., Any])

Checkpoint = Annotated[
    Path, typer.Option("--checkpoint", "-c", help="msfm checkpoint directory (convert or train writes one).")
]
InitCheckpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", "-c", help="Start from this msfm checkpoint (fine-tuning) instead of a preset."
    ),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output file (the command says which format).")]

#: What each output format is written as, for the error that names the right suffix.
_FORMATS = {".h5ad": "an AnnData .h5ad file", ".csv": "a CSV table", ".json": "a JSON file"}


def output_suffix(suffix: str) -> Callable[[Path | None], Path | None]:
    """A ``--out`` callback refusing a file name whose suffix is not ``suffix``, before anything is computed.

    Without it ``-o out.csv`` on a command that writes AnnData silently wrote HDF5 under a .csv name.
    """

    def check(value: Path | None) -> Path | None:
        if value is None or value.suffix.lower() == suffix:
            return value
        got = f"the suffix {value.suffix!r}" if value.suffix else "no suffix"
        msg = (
            f"{str(value)!r} has {got}, but this command writes {_FORMATS[suffix]}. "
            f"Name the output with {suffix}, e.g. {value.with_suffix(suffix).name!r}."
        )
        raise typer.BadParameter(msg)

    return check


OutH5ad = Annotated[
    Path, typer.Option("--out", "-o", help="Output .h5ad file (AnnData).", callback=output_suffix(".h5ad"))
]
OutCsv = Annotated[
    Path, typer.Option("--out", "-o", help="Output .csv table.", callback=output_suffix(".csv"))
]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder (a run folder resumes).")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")]
PRECISION_HELP = (
    "auto | 32 | bf16 | 16 (auto: bf16 where this machine computes it fast, else 32; MSFM_PRECISION_AUTO=32|bf16 "
    "overrides; Lightning's 32-true | bf16-mixed | 16-mixed are accepted too)."
)
Precision = Annotated[str, typer.Option(help=PRECISION_HELP)]
BatchSize = Annotated[int, typer.Option(help="Items per forward pass.")]
KeyAdded = Annotated[
    str, typer.Option(help="Prefix of what is added: obsm['X_<key>'], obs['<key>_<field>'], uns['<key>'].")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Preset = Annotated[
    str | None, typer.Option(help="Model preset of a new model (msfm.registry.list_models()).")
]
Config = Annotated[
    Path | None, typer.Option("--config", help="YAML/JSON settings file; options given here take precedence.")
]


def option_parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """One option of a group: ``option_parameter("layer", Annotated[str | None, typer.Option(...)], None)``."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


_CELL_OPTIONS = (
    option_parameter(
        "layer",
        Annotated[
            str | None, typer.Option(help="Matrix to read (default: layers['counts'], else integer X).")
        ],
        None,
    ),
    option_parameter(
        "pre_normalized",
        Annotated[
            bool,
            typer.Option(
                "--pre-normalized", help="Input is already log1p-normalised (used as it is; warns)."
            ),
        ],
        False,
    ),
    option_parameter(
        "gene_column",
        Annotated[str | None, typer.Option(help="var column with symbols or Ensembl IDs.")],
        None,
    ),
    option_parameter(
        "species", Annotated[str, typer.Option(help="human | mouse (mouse genes via orthologs).")], "human"
    ),
    option_parameter(
        "no_aliases",
        Annotated[bool, typer.Option("--no-aliases", help="Do not map previous/alias symbols.")],
        False,
    ),
)
_SPATIAL_OPTIONS = (
    option_parameter(
        "spatial_key", Annotated[str, typer.Option(help="obsm key of the coordinates.")], "spatial"
    ),
    option_parameter(
        "scale",
        Annotated[
            float | None,
            typer.Option(
                help="µm per coordinate unit (default: uns['msfm_spatial']['um_per_unit'], else 1)."
            ),
        ],
        None,
    ),
    option_parameter(
        "section_key",
        Annotated[str | None, typer.Option(help="obs column naming each cell's section.")],
        None,
    ),
    option_parameter(
        "duplicates",
        Annotated[str, typer.Option(help="Cells at identical coordinates: error | keep | jitter.")],
        "error",
    ),
)

_TRAINER_OPTIONS = {
    "max_steps": option_parameter(
        "max_steps", Annotated[int | None, typer.Option(help="Optimiser steps.")], None
    ),
    "max_epochs": option_parameter("max_epochs", Annotated[int | None, typer.Option(help="Epochs.")], None),
    "batch_size": option_parameter(
        "batch_size", Annotated[int | None, typer.Option(help="Examples per device per micro-step.")], None
    ),
    "lr": option_parameter("lr", Annotated[float | None, typer.Option(help="Peak learning rate.")], None),
    "accelerator": option_parameter(
        "accelerator", Annotated[str | None, typer.Option(help="auto | cpu | gpu | mps")], None
    ),
    "devices": option_parameter(
        "devices", Annotated[str | None, typer.Option(help="auto | N (-1: all) | 0,1 (indices)")], None
    ),
    "strategy": option_parameter(
        "strategy", Annotated[str | None, typer.Option(help="auto | ddp | fsdp")], None
    ),
    "num_nodes": option_parameter("num_nodes", Annotated[int | None, typer.Option(help="Machines.")], None),
    "precision": option_parameter(
        "precision", Annotated[str | None, typer.Option(help=PRECISION_HELP)], None
    ),
    "accumulate": option_parameter(
        "accumulate", Annotated[int | None, typer.Option(help="Gradient accumulation steps.")], None
    ),
    "num_workers": option_parameter(
        "num_workers", Annotated[int | None, typer.Option(help="DataLoader workers.")], None
    ),
    "seed": option_parameter(
        "seed", Annotated[int | None, typer.Option(help="Seed of everything random.")], None
    ),
    "checkpoint_every_n_steps": option_parameter(
        "checkpoint_every_n_steps",
        Annotated[
            int | None,
            typer.Option(
                "--checkpoint-every", help="Save the resume state and model/ every N optimiser steps."
            ),
        ],
        None,
    ),
    "allow_config_change": option_parameter(
        "allow_config_change",
        Annotated[
            bool,
            typer.Option(
                "--allow-config-change",
                help="Resume a run although its settings changed (recorded as a new version in config.json).",
            ),
        ],
        False,
    ),
}


def _extend(
    fn: Callable[..., Any], extra: Iterable[inspect.Parameter], collect: str
) -> tuple[Any, list[str]]:
    """The signature of ``fn`` without its ``collect`` parameter, plus ``extra`` options (before ``--quiet``)."""
    sig = inspect.signature(fn, eval_str=True)
    if collect not in sig.parameters:
        msg = f"{fn.__name__} must take a '{collect}' parameter to receive the shared options."
        raise TypeError(msg)
    own = [p for p in sig.parameters.values() if p.name != collect]
    extra = list(extra)
    names = [p.name for p in extra]
    clash = sorted(set(names) & {p.name for p in own})
    if clash:
        msg = f"{fn.__name__} declares {clash} itself; they come from the shared options."
        raise TypeError(msg)
    tail = [p for p in own if p.name in ("overwrite", "quiet")]
    head = [p for p in own if p.name not in ("overwrite", "quiet")]
    # typer passes everything by keyword, so every parameter can be keyword-only (any order is then valid).
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in (*head, *extra, *tail)]
    return sig.replace(parameters=params), names


def option_group(
    params: Iterable[inspect.Parameter],
    collect: str,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Callable[[F], F]:
    """Add the options ``params`` to a command; it receives the ones the user gave as one dict ``collect``.

    Options left at their default are not passed on, so the API's defaults (or a ``--config`` file's values)
    stand. ``transform`` may rename or reshape the dict first (e.g. ``--no-aliases`` -> ``use_aliases=False``).
    """
    params = tuple(params)
    defaults = {p.name: p.default for p in params}

    def decorate(fn: F) -> F:
        sig, names = _extend(fn, params, collect)

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            given = {k: v for k, v in given.items() if v is not None and v != defaults[k]}
            kwargs[collect] = transform(given) if transform is not None else given
            return fn(**kwargs)

        wrapper.__signature__ = sig  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
        return wrapper  # type: ignore[return-value]

    return decorate


def _aliases(given: dict[str, Any]) -> dict[str, Any]:
    if given.pop("no_aliases", False):
        given["use_aliases"] = False
    return given


def read_options(kind: Literal["cells", "spatial"] = "cells") -> Callable[[F], F]:
    """Add the reading options to a command; it receives the ones given as ``read`` (keywords of the API)."""
    return option_group(_CELL_OPTIONS + (_SPATIAL_OPTIONS if kind == "spatial" else ()), "read", _aliases)


def trainer_options(*names: str) -> Callable[[F], F]:
    """Add training options (all of them, or the ``names`` given); the command receives ``overrides``.

    ``overrides`` holds only the options the user gave, ready for ``train(..., **overrides)``.
    """
    chosen = names or tuple(_TRAINER_OPTIONS)
    unknown = sorted(set(chosen) - set(_TRAINER_OPTIONS))
    if unknown:
        msg = f"unknown trainer options {unknown}; known: {sorted(_TRAINER_OPTIONS)}."
        raise ValueError(msg)
    return option_group([_TRAINER_OPTIONS[n] for n in chosen], "overrides")
