"""``msfm gest <verb>``: train, generate, embed, perturb, evaluate, annotate-train, annotate.

Thin over :mod:`msfm.models.gest`: AnnData (``.h5ad``, other formats :func:`msfm.data.read` knows, or a Visium
``outs`` folder) in, ``.h5ad`` / CSV / JSON / PNG out, every output written atomically and never over its input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import check_output_free
from msfm.runtime.jsonable import to_jsonable

__all__ = [
    "annotate",
    "annotate_train",
    "app",
    "bool_column",
    "embed",
    "evaluate",
    "generate",
    "parse_box",
    "parse_gene_list",
    "perturb",
    "read_input",
    "read_xy_table",
    "train",
]

app = typer.Typer(
    help=(
        "GeST: generative spatial transcriptomics. Train a spatial decoder over meta-cell tokens, generate "
        "expression at held-out or new positions, embed and cluster niches, perturb a region in silico, evaluate "
        "against baselines and fine-tune a niche classifier."
    ),
    no_args_is_help=True,
)

# --- shared options ----------------------------------------------------------------------------------------------
Data = Annotated[
    Path,
    typer.Argument(
        help="Cells/spots with obsm['spatial']: .h5ad (or another format msfm.data.read knows) or a Visium outs "
        "folder (spatial/ + a 10x .h5 matrix)."
    ),
]
Model = Annotated[Path, typer.Option("--model", "-m", help="GeST checkpoint directory (RUN/model).")]
Layer = Annotated[str | None, typer.Option(help="Matrix to read (default: layers['counts'], else X).")]
PreNorm = Annotated[
    bool, typer.Option("--pre-normalized", help="Input is already log1p-normalised (used as it is).")
]
SpatialKey = Annotated[str, typer.Option(help="obsm key of the coordinates.")]
Scale = Annotated[
    float | None,
    typer.Option(help="µm per coordinate unit (default: uns['msfm_spatial']['um_per_unit'], else 1)."),
]
SectionKey = Annotated[str | None, typer.Option(help="obs column naming the section (slide) of each cell.")]
Duplicates = Annotated[
    str,
    typer.Option(help="Cells at identical coordinates: error | keep | jitter (seeded sub-micron jitter)."),
]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")]
SideUm = Annotated[float | None, typer.Option(help="Window side in µm (default: the trained side).")]
BatchSize = Annotated[int, typer.Option(help="Windows (or niches) per forward pass.")]
Seed = Annotated[int, typer.Option(help="Seed of serialisation and sampling.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
GenMode = Annotated[
    str, typer.Option("--mode", help="pick (most likely meta-cell) | weighted (expected profile) | sample.")
]


def _read_kwargs(
    layer: str | None,
    pre_normalized: bool,
    spatial_key: str,
    scale: float | None,
    section_key: str | None,
) -> dict[str, Any]:
    return {
        "layer": layer,
        "pre_normalized": pre_normalized,
        "spatial_key": spatial_key,
        "scale": scale,
        "section_key": section_key,
    }


def _check_duplicates(value: str) -> str:
    if value not in ("error", "keep", "jitter"):
        msg = f"--duplicates {value!r}: expected error, keep or jitter."
        raise MsfmInputError(msg)
    return value


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def _check_out(data: Path, out: Path, *, overwrite: bool) -> None:
    """Refuse an output that is the input, lies inside an input folder, or exists (before anything is loaded)."""
    if _same_path(out, data) or (data.is_dir() and data.resolve() in out.resolve().parents):
        msg = f"--out {out} is (inside) the input {data}; msfm never writes over its input. Choose another path."
        raise MsfmInputError(msg)
    check_output_free(out, overwrite=overwrite)
    if not out.parent.is_dir():
        msg = f"Cannot write {out}: the folder {out.parent} does not exist. Create it first."
        raise MsfmInputError(msg)


def read_input(path: Path) -> Any:
    """Read the cells: a Visium ``outs`` folder through ``read_visium``, anything else through ``msfm.data.read``.

    Raises:
        MsfmInputError: missing path, unknown format, or a Visium folder without a single ``.h5`` matrix.
    """
    if not path.exists():
        msg = f"Input {path} does not exist."
        raise MsfmInputError(msg)
    if path.is_dir() and (path / "spatial").is_dir():
        from msfm.data.spatial import read_visium

        default = "filtered_feature_bc_matrix.h5"
        if (path / default).is_file():
            return read_visium(path)
        found = sorted(p.name for p in path.glob("*.h5"))
        if len(found) != 1:
            msg = (
                f"{path} looks like a Visium outs folder (it has spatial/) but holds {len(found)} .h5 matrices "
                f"{found[:5]} and no {default}; expected exactly one."
            )
            raise MsfmInputError(msg)
        return read_visium(path, counts_file=found[0])
    from msfm.data import read

    return read(path)


def _write_h5ad(adata: Any, out: Path, data: Path) -> None:
    from msfm.runtime.h5ad import write_h5ad_atomic

    write_h5ad_atomic(adata, out, overwrite_input_guard=[data])
    typer.echo(f"wrote {out} ({adata.n_obs} x {adata.n_vars})")


def bool_column(adata: Any, column: str, option: str) -> Any:
    """A boolean mask from an obs column of booleans, 0/1 or true/false strings.

    Raises:
        MsfmInputError: missing column or values that are not booleans.
    """
    import numpy as np
    import pandas as pd

    if column not in adata.obs:
        msg = f"{option} {column!r} is not an obs column; columns are {list(adata.obs.columns)[:30]}."
        raise MsfmInputError(msg)
    col = adata.obs[column]
    if pd.api.types.is_bool_dtype(col) and not col.isna().any():
        return col.to_numpy(dtype=bool)
    values = col.astype(str).str.strip().str.lower()
    mapping = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
    bad = sorted(set(values) - set(mapping))
    if bad:
        msg = (
            f"{option} {column!r} must hold booleans (True/False, 1/0); found other values {bad[:5]}. "
            f"Add a boolean column, e.g. adata.obs['{column}'] = adata.obs['region'] == 'A'."
        )
        raise MsfmInputError(msg)
    return np.asarray([mapping[v] for v in values], dtype=bool)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``'x0,y0,x1,y1'`` -> a tuple of four floats with x1 > x0 and y1 > y0.

    Raises:
        MsfmInputError: not four numbers, or an empty box.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        vals = [float(p) for p in parts]
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


def parse_gene_list(text: str | None) -> list[str]:
    """``'G1, G2'`` -> ``['G1', 'G2']`` (empty or None -> [])."""
    if not text:
        return []
    return [g.strip() for g in text.split(",") if g.strip()]


def _name_list(text: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(parse_gene_list(text))
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        msg = f"{option} {text!r}: expected a comma-separated subset of {', '.join(allowed)}."
        raise MsfmInputError(msg)
    return items


def _int_tuple(text: str, option: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        msg = f"{option} {text!r}: expected comma-separated integers, e.g. 15,10,5."
        raise MsfmInputError(msg) from None


def read_xy_table(path: Path, option: str) -> Any:
    """``[k, 2]`` float array from the ``x``, ``y`` columns of a CSV/TSV file.

    Raises:
        MsfmInputError: missing file or columns, no rows, non-numeric values.
    """
    import numpy as np
    import pandas as pd

    if not path.is_file():
        msg = f"{option} {path} does not exist."
        raise MsfmInputError(msg)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    table = pd.read_csv(path, sep=sep)
    cols = {str(c).strip().lower(): c for c in table.columns}
    if "x" not in cols or "y" not in cols:
        msg = f"{option} {path} needs columns x and y; it has {list(table.columns)[:20]}."
        raise MsfmInputError(msg)
    if table.empty:
        msg = f"{option} {path} has no rows."
        raise MsfmInputError(msg)
    try:
        xy = table[[cols["x"], cols["y"]]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        msg = f"{option} {path}: columns x and y must be numbers."
        raise MsfmInputError(msg) from None
    if not np.isfinite(xy).all():
        msg = f"{option} {path}: x and y must be finite numbers (found NaN/inf or empty cells)."
        raise MsfmInputError(msg)
    return xy


def _read_config(path: Path) -> dict[str, Any]:
    from msfm.runtime.config import read_config_file

    return read_config_file(path, what="GestTrainConfig")


def _parse_devices(value: str | None) -> Any:
    if value is None or value == "auto":
        return value
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        return int(value)
    except ValueError:
        msg = f"--devices {value!r}: expected auto, a count (e.g. 2, -1 for all) or indices (e.g. 0,1)."
        raise MsfmInputError(msg) from None


def _device_to_trainer(device: str | None) -> dict[str, Any]:
    """``--device`` as trainer settings: cpu -> accelerator cpu; cuda / cuda:N -> gpu (device N)."""
    if device is None or device == "auto":
        return {}
    if device == "cpu":
        return {"accelerator": "cpu"}
    if device == "mps":
        return {"accelerator": "mps", "devices": 1}
    if device in ("cuda", "gpu"):
        return {"accelerator": "gpu"}
    if device.startswith("cuda:") and device[5:].isdigit():
        return {"accelerator": "gpu", "devices": [int(device[5:])]}
    msg = f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps."
    raise MsfmInputError(msg)


def _trainer_overrides(
    *,
    steps: int | None,
    accelerator: str | None,
    devices: str | None,
    strategy: str | None,
    precision: str | None,
    checkpoint_every: int | None,
    seed: int | None,
    device: str | None,
    quiet: bool,
) -> dict[str, Any]:
    if device is not None and device != "auto" and (accelerator is not None or devices is not None):
        msg = "Give either --device or --accelerator/--devices, not both."
        raise MsfmInputError(msg)
    out: dict[str, Any] = {
        "max_steps": steps,
        "accelerator": accelerator,
        "devices": _parse_devices(devices),
        "strategy": strategy,
        "precision": precision,
        "checkpoint_every_n_steps": checkpoint_every,
        "seed": seed,
        "progress_bar": False if quiet else None,
    }
    out.update(_device_to_trainer(device))
    return {k: v for k, v in out.items() if v is not None}


def _validate(cls: Any, data: dict[str, Any], what: str) -> Any:
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = (
            f"Invalid {what} setting {where or '(config)'}: {first.get('msg')} (got {first.get('input')!r})."
        )
        raise MsfmInputError(msg) from err


def _merge(base: dict[str, Any], key: str, extra: dict[str, Any]) -> None:
    if not extra:
        return
    current = base.get(key) or {}
    if not isinstance(current, dict):
        msg = f"Config field {key!r} must be a mapping; got {current!r}."
        raise MsfmInputError(msg)
    base[key] = {**current, **extra}


def _echo_table(df: Any) -> None:
    import pandas as pd

    with pd.option_context(
        "display.max_columns", 50, "display.width", 160, "display.float_format", "{:.4f}".format
    ):
        typer.echo(df.to_string())


# --- verbs -------------------------------------------------------------------------------------------------------
@app.command()
def train(
    data: Data,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run directory; re-running the same command resumes the run.")
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML/JSON with GestTrainConfig fields (command-line flags override).")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="gest-small (default) | gest-tiny | gest-l8h8")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default 2000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per micro-batch (default 8).")] = None,
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
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 3e-4).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 100).")] = None,
    hold_out_column: Annotated[
        str | None,
        typer.Option(help="Boolean obs column: those cells are left out of training (for evaluate)."),
    ] = None,
    accelerator: Annotated[str | None, typer.Option(help="auto | cpu | gpu | mps")] = None,
    devices: Annotated[str | None, typer.Option(help="auto | N | 0,1")] = None,
    strategy: Annotated[str | None, typer.Option(help="auto | ddp | fsdp")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true | bf16-mixed | 16-mixed")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Save last.ckpt and model/ every N steps (default 200).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of vocabulary, windows and initialisation.")] = None,
    device: Annotated[
        str | None, typer.Option(help="Shortcut for --accelerator/--devices: cpu | cuda | cuda:N | mps.")
    ] = None,
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    spatial_key: Annotated[
        str | None, typer.Option(help="obsm key of the coordinates (default spatial).")
    ] = None,
    scale: Scale = None,
    section_key: SectionKey = None,
    duplicates: Annotated[str | None, typer.Option(help="error (default) | keep | jitter")] = None,
    quiet: Quiet = False,
) -> None:
    """Pretrain GeST (vocabulary + decoder) into RUN; re-running the same command resumes a stopped run."""
    from msfm.models.gest.train import GestTrainConfig
    from msfm.models.gest.train import train as _train

    if data.exists() and (_same_path(out, data) or out.resolve() in data.resolve().parents):
        msg = f"--out {out} is (or holds) the input {data}; choose a separate run directory."
        raise MsfmInputError(msg)
    if out.exists() and not out.is_dir():
        msg = f"--out {out} is a file; the run directory must be a folder."
        raise MsfmInputError(msg)
    base = _read_config(config) if config is not None else {}
    top = {
        "preset": preset,
        "n_genes": n_genes,
        "n_metacells": n_metacells,
        "n_pcs": n_pcs,
        "levels": _int_tuple(levels, "--levels") if levels is not None else None,
        "side_um": side_um,
        "max_cells": max_cells,
        "order": order,
        "batch_size": batch_size,
        "seed": seed,
        "layer": layer,
        "pre_normalized": True if pre_normalized else None,
        "spatial_key": spatial_key,
        "scale": scale,
        "section_key": section_key,
        "duplicates": _check_duplicates(duplicates) if duplicates is not None else None,
    }
    merged = {**base, **{k: v for k, v in top.items() if v is not None}}
    _merge(
        merged, "optim", {k: v for k, v in {"lr": lr, "warmup_steps": warmup_steps}.items() if v is not None}
    )
    _merge(
        merged,
        "trainer",
        _trainer_overrides(
            steps=steps,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            checkpoint_every=checkpoint_every,
            seed=seed,
            device=device,
            quiet=quiet,
        ),
    )
    cfg = _validate(GestTrainConfig, merged, "GeST training")
    adata = read_input(data)
    train_mask = None
    if hold_out_column is not None:
        train_mask = ~bool_column(adata, hold_out_column, "--hold-out-column")
        typer.echo(f"training on {int(train_mask.sum())} of {adata.n_obs} cells ({hold_out_column} held out)")
    resumed = (out / "checkpoints" / "last.ckpt").is_file()
    if resumed:
        typer.echo(f"resuming the run in {out}")
    path = _train(adata, out, cfg, train_mask=train_mask)
    typer.echo(f"model written to {path}")


@app.command()
def generate(
    data: Data,
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad (generated cells x model genes).")],
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
    temperature: Annotated[float, typer.Option(help="Softmax temperature of --mode sample.")] = 1.0,
    seed: Seed = 0,
    side_um: SideUm = None,
    batch_size: BatchSize = 16,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute every step instead of KV caching (same result).")
    ] = False,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    spatial_key: SpatialKey = "spatial",
    scale: Scale = None,
    section_key: SectionKey = None,
    duplicates: Duplicates = "error",
    overwrite: Overwrite = False,
) -> None:
    """Generate expression at held-out cells (--query-column) or new positions (--positions)."""
    from msfm.models.gest.api import generate as _generate

    if (query_column is None) == (positions is None):
        msg = "Give exactly one of --query-column COL (cells to generate) or --positions FILE.csv (x,y columns)."
        raise MsfmInputError(msg)
    if positions_section is not None and positions is None:
        msg = "--positions-section goes with --positions."
        raise MsfmInputError(msg)
    _check_duplicates(duplicates)
    _check_out(data, out, overwrite=overwrite)
    pos = read_xy_table(positions, "--positions") if positions is not None else None
    adata = read_input(data)
    query = bool_column(adata, query_column, "--query-column") if query_column is not None else None
    result = _generate(
        adata,
        model,
        query=query,
        positions=pos,
        positions_section=positions_section,
        mode=mode,  # type: ignore[arg-type]
        temperature=temperature,
        seed=seed,
        side_um=side_um,
        batch_size=batch_size,
        device=device,
        use_cache=not no_cache,
        duplicates=duplicates,
        **_read_kwargs(layer, pre_normalized, spatial_key, scale, section_key),
    )
    _write_h5ad(result, out, data)


@app.command()
def embed(
    data: Data,
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad (the input plus the embedding).")],
    key_added: Annotated[str, typer.Option(help="obsm key of the niche embedding.")] = "X_gest",
    max_cells: Annotated[int, typer.Option(help="Cells per niche sequence (centre included).")] = 256,
    side_um: SideUm = None,
    cluster: Annotated[str, typer.Option(help="Cluster the niches: kmeans | leiden | none.")] = "none",
    n_clusters: Annotated[int | None, typer.Option(help="Clusters of --cluster kmeans.")] = None,
    resolution: Annotated[float, typer.Option(help="Resolution of --cluster leiden.")] = 1.0,
    cluster_key: Annotated[str, typer.Option(help="obs column of the niche clusters.")] = "gest_niche",
    seed: Annotated[int, typer.Option(help="Seed of the clustering.")] = 0,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    spatial_key: SpatialKey = "spatial",
    scale: Scale = None,
    section_key: SectionKey = None,
    duplicates: Duplicates = "error",
    overwrite: Overwrite = False,
) -> None:
    """Zero-shot niche embeddings to obsm[--key-added], optionally clustered into obs[--cluster-key]."""
    from msfm.models.gest.api import cluster_niches
    from msfm.models.gest.api import embed as _embed

    if cluster not in ("kmeans", "leiden", "none"):
        msg = f"--cluster {cluster!r}: expected kmeans, leiden or none."
        raise MsfmInputError(msg)
    if cluster == "kmeans" and (n_clusters is None or n_clusters < 2):
        msg = f"--cluster kmeans needs --n-clusters N (N >= 2); got {n_clusters}."
        raise MsfmInputError(msg)
    _check_duplicates(duplicates)
    _check_out(data, out, overwrite=overwrite)
    adata = read_input(data)
    result = _embed(
        adata,
        model,
        side_um=side_um,
        max_cells=max_cells,
        batch_size=batch_size,
        device=device,
        key_added=key_added,
        duplicates=duplicates,
        copy=True,
        **_read_kwargs(layer, pre_normalized, spatial_key, scale, section_key),
    )
    assert result is not None  # copy=True returns the copy
    if cluster != "none":
        cluster_niches(
            result,
            use_rep=key_added,
            method=cluster,  # type: ignore[arg-type]
            n_clusters=n_clusters,
            resolution=resolution,
            seed=seed,
            key_added=cluster_key,
        )
        counts = result.obs[cluster_key].value_counts().sort_index().to_dict()
        typer.echo(f"{cluster} niches in obs[{cluster_key!r}]: {counts}")
    typer.echo(f"embedding obsm[{key_added!r}]: {result.obsm[key_added].shape}")
    _write_h5ad(result, out, data)


@app.command()
def perturb(
    data: Data,
    model: Model,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: perturbation.h5ad, report.csv, summary.json, perturbation.png.",
        ),
    ],
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
    temperature: Annotated[float, typer.Option(help="Softmax temperature of --mode sample.")] = 1.0,
    seed: Seed = 0,
    reference_up: Annotated[
        str | None, typer.Option(help="Reference up-regulated DEGs (scores the direction of change).")
    ] = None,
    reference_down: Annotated[str | None, typer.Option(help="Reference down-regulated DEGs.")] = None,
    batch_size: BatchSize = 16,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    spatial_key: SpatialKey = "spatial",
    scale: Scale = None,
    section_key: SectionKey = None,
    duplicates: Duplicates = "error",
    overwrite: Overwrite = False,
) -> None:
    """Edit genes in a region and compare the regenerated surroundings with a control generation."""
    from msfm.models.gest.perturb import perturb as _perturb
    from msfm.runtime.atomic import atomic_dir, atomic_write_json, atomic_write_text

    given = [n for n, v in (("--region-box", region_box), ("--region-polygon", region_polygon),
                            ("--region-column", region_column)) if v is not None]  # fmt: skip
    if len(given) != 1:
        msg = f"Give exactly one region: --region-box, --region-polygon or --region-column; got {given or 'none'}."
        raise MsfmInputError(msg)
    genes_up, genes_down = parse_gene_list(up), parse_gene_list(down)
    if not genes_up and not genes_down:
        msg = "Nothing to perturb: give --up G1,G2 and/or --down G3 (genes of the model's panel)."
        raise MsfmInputError(msg)
    for option, value, allowed in (
        ("--how", how, ("set_quantile", "scale", "add_log_fc")),
        ("--context", context, ("region", "all")),
        ("--perturb-mode", perturb_mode, ("requantize", "continuous")),
        ("--mode", mode, ("pick", "weighted", "sample")),
    ):
        if value not in allowed:
            msg = f"{option} {value!r}: expected one of {', '.join(allowed)}."
            raise MsfmInputError(msg)
    _check_duplicates(duplicates)
    box = parse_box(region_box) if region_box is not None else None
    polygon = read_xy_table(region_polygon, "--region-polygon") if region_polygon is not None else None
    _check_out(data, out, overwrite=overwrite)
    adata = read_input(data)
    cells = bool_column(adata, region_column, "--region-column") if region_column is not None else None
    result = _perturb(
        adata,
        model,
        region_box=box,
        region_polygon=polygon,
        region_cells=cells,
        genes_up=genes_up,
        genes_down=genes_down,
        how=how,  # type: ignore[arg-type]
        amount=amount,
        ring_um=ring_um,
        context=context,  # type: ignore[arg-type]
        perturb_mode=perturb_mode,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        n_samples=n_samples,
        temperature=temperature,
        seed=seed,
        reference_up=parse_gene_list(reference_up) or None,
        reference_down=parse_gene_list(reference_down) or None,
        batch_size=batch_size,
        device=device,
        duplicates=duplicates,
        **_read_kwargs(layer, pre_normalized, spatial_key, scale, section_key),
    )
    summary = to_jsonable({**result.summary, "params": result.params})
    with atomic_dir(out) as tmp:
        result.adata.write_h5ad(tmp / "perturbation.h5ad")
        atomic_write_text(tmp / "report.csv", result.report.to_csv(index_label="gene"))
        atomic_write_json(tmp / "summary.json", summary)
        fig = result.figure(save=tmp / "perturbation.png")
        import matplotlib.pyplot as plt  # msfm.pl already selected the headless backend

        plt.close(fig)
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
def evaluate(
    data: Data,
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: generation.csv (+ niches.csv).")],
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
    label_key: Annotated[
        str | None, typer.Option(help="obs column of niche labels: also score niche clustering (AMI/ARI).")
    ] = None,
    n_clusters: Annotated[
        int | None, typer.Option(help="Clusters for the niche scores (default: n labels).")
    ] = None,
    max_cells: Annotated[int, typer.Option(help="Cells per niche sequence for the niche scores.")] = 256,
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    spatial_key: SpatialKey = "spatial",
    scale: Scale = None,
    section_key: SectionKey = None,
    overwrite: Overwrite = False,
) -> None:
    """Score generation of held-out cells against baselines (and niche clustering against labels)."""
    from msfm.models.gest.evaluate import evaluate_generation, evaluate_niches
    from msfm.runtime.atomic import atomic_dir, atomic_write_text

    base = (
        ()
        if baselines.strip().lower() in ("", "none")
        else _name_list(baselines, "--baselines", ("mean", "knn", "mlp", "gp"))
    )
    mode_list = _name_list(modes, "--modes", ("pick", "weighted", "sample"))
    _check_out(data, out, overwrite=overwrite)
    adata = read_input(data)
    held = bool_column(adata, held_out_column, "--held-out-column")
    if label_key is not None and label_key not in adata.obs:
        msg = f"--label-key {label_key!r} is not an obs column; columns are {list(adata.obs.columns)[:30]}."
        raise MsfmInputError(msg)
    read = _read_kwargs(layer, pre_normalized, spatial_key, scale, section_key)
    result = evaluate_generation(
        adata,
        model,
        held_out=held,
        baselines=base,
        modes=mode_list,
        n_top_genes=n_top_genes,
        seed=seed,
        batch_size=batch_size,
        device=device,
        **read,
    )
    niches = None
    if label_key is not None:
        niches = evaluate_niches(
            adata,
            model,
            label_key=label_key,
            n_clusters=n_clusters,
            seed=seed,
            max_cells=max_cells,
            device=device,
            **read,
        )
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / "generation.csv", result.table.to_csv())
        if niches is not None:
            atomic_write_text(tmp / "niches.csv", niches.to_csv())
    typer.echo(f"generation of {int(held.sum())} held-out cells:")
    _echo_table(result.table)
    if niches is not None:
        typer.echo(f"niche clustering against obs[{label_key!r}]:")
        _echo_table(niches)
    typer.echo(f"wrote {out}/")


@app.command("annotate-train")
def annotate_train(
    data: Data,
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (resumes an existing run).")],
    label_key: Annotated[str, typer.Option(help="obs column with the niche labels.")],
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Niches per batch.")] = 16,
    max_cells: Annotated[int, typer.Option(help="Cells per niche sequence (centre included).")] = 64,
    side_um: SideUm = None,
    lr: Annotated[float, typer.Option(help="Learning rate of the head (backbone: x0.1).")] = 1e-3,
    val_fraction: Annotated[
        float, typer.Option(help="Share of labelled cells held out for validation.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of split, initialisation and batch order.")] = 0,
    accelerator: Annotated[str | None, typer.Option(help="auto | cpu | gpu | mps")] = None,
    devices: Annotated[str | None, typer.Option(help="auto | N | 0,1")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true | bf16-mixed | 16-mixed")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Save last.ckpt and model/ every N steps.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Shortcut for --accelerator/--devices: cpu | cuda | cuda:N | mps.")
    ] = None,
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    spatial_key: SpatialKey = "spatial",
    scale: Scale = None,
    section_key: SectionKey = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune GeST plus a linear head to predict niche labels (RUN/model, for `msfm gest annotate`)."""
    from msfm.models.gest.finetune import NicheClassifierConfig, train_niche_classifier

    if data.exists() and (_same_path(out, data) or out.resolve() in data.resolve().parents):
        msg = f"--out {out} is (or holds) the input {data}; choose a separate run directory."
        raise MsfmInputError(msg)
    defaults = NicheClassifierConfig(label_key=label_key)
    trainer = _trainer_overrides(
        steps=steps,
        accelerator=accelerator,
        devices=devices,
        strategy=None,
        precision=precision,
        checkpoint_every=checkpoint_every,
        seed=seed,
        device=device,
        quiet=quiet,
    )
    cfg = _validate(
        NicheClassifierConfig,
        {
            "label_key": label_key,
            "side_um": side_um,
            "max_cells": max_cells,
            "val_fraction": val_fraction,
            "batch_size": batch_size,
            "optim": {
                **defaults.optim.model_dump(),
                "lr": lr,
                "warmup_steps": min(defaults.optim.warmup_steps, steps),
            },
            "trainer": {**defaults.trainer.model_dump(), **trainer},
            "seed": seed,
            **_read_kwargs(layer, pre_normalized, spatial_key, scale, section_key),
        },
        "niche classifier",
    )
    adata = read_input(data)
    if label_key not in adata.obs:
        msg = f"--label-key {label_key!r} is not an obs column; columns are {list(adata.obs.columns)[:30]}."
        raise MsfmInputError(msg)
    path = train_niche_classifier(adata, model, out, cfg)
    typer.echo(f"niche classifier written to {path}")


@app.command()
def annotate(
    data: Data,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Niche classifier checkpoint (annotate-train RUN/model).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad (the input plus the labels).")],
    key_added: Annotated[
        str, typer.Option(help="obs column of the labels (+ '_confidence'; obsm '_probs').")
    ] = "gest_niche_label",
    batch_size: BatchSize = 64,
    device: Device = "auto",
    layer: Layer = None,
    pre_normalized: PreNorm = False,
    spatial_key: SpatialKey = "spatial",
    scale: Scale = None,
    section_key: SectionKey = None,
    overwrite: Overwrite = False,
) -> None:
    """Predict niche labels with a fine-tuned classifier into obs[--key-added]."""
    from msfm.models.gest.finetune import annotate_niches

    _check_out(data, out, overwrite=overwrite)
    adata = read_input(data)
    result = annotate_niches(
        adata,
        model,
        batch_size=batch_size,
        device=device,
        key_added=key_added,
        copy=True,
        **_read_kwargs(layer, pre_normalized, spatial_key, scale, section_key),
    )
    assert result is not None  # copy=True returns the copy
    counts = result.obs[key_added].value_counts().to_dict()
    typer.echo(f"niche labels in obs[{key_added!r}]: {counts}")
    _write_h5ad(result, out, data)
