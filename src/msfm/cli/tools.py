"""``msfm datasets``, ``msfm bench`` and ``msfm demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from msfm.cli.options import OutH5ad, Overwrite

datasets_app = typer.Typer(
    help="Real datasets bundled inside installed packages (offline).", no_args_is_help=True
)
bench_app = typer.Typer(
    help="Benchmarks that print numbers (recorded in docs/benchmarks.md).", no_args_is_help=True
)


#: Widest shown text of the source and licence columns (the full texts: --json).
_CELL_WIDTH = 48


def _kind(info: dict) -> str:
    """Provenance in one word: real data as shipped, derived from real data, or constructed."""
    if info.get("constructed"):
        return "constructed"
    return "derived" if info.get("derived") else "real"


def _size(shape: object) -> str:
    """``(700, 765)`` -> ``700 x 765``; symbolic sizes (``n_cells``) are kept as written."""
    if isinstance(shape, list | tuple) and shape and all(not isinstance(s, list | tuple) for s in shape):
        return " x ".join(f"{s:,}" if isinstance(s, int) else str(s) for s in shape)
    if isinstance(shape, list | tuple):
        return "; ".join(_size(s) for s in shape)
    return str(shape)


def _cell(text: object, width: int = _CELL_WIDTH) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def datasets_table(datasets: dict[str, dict]) -> str:
    """The bundled datasets as an aligned text table: name, kind, size, source, licence."""
    header = ("name", "kind", "size", "source", "licence")
    rows = [
        (
            name,
            _kind(info),
            _cell(_size(info.get("shape")), 30),
            _cell(info.get("source")),
            _cell(info.get("licence")),
        )
        for name, info in datasets.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@datasets_app.command("list")
def datasets_list(
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per line with every field (for scripts)."),
    ] = False,
) -> None:
    """List bundled datasets with their provenance (the full description, citation and licence: --json)."""
    from msfm.datasets import list_datasets

    datasets = list_datasets()
    if as_json:
        for name, info in datasets.items():
            typer.echo(json.dumps({"name": name, **info}, default=str))
        return
    typer.echo(datasets_table(datasets))
    typer.echo("\nmsfm datasets list --json: every field (description, labels, citation) in full.")


@datasets_app.command("export")
def datasets_export(
    name: Annotated[str, typer.Argument(help="Dataset name, e.g. pbmc68k")],
    out: OutH5ad,
    overwrite: Overwrite = False,
) -> None:
    """Write a bundled AnnData dataset to an .h5ad file (`msfm datasets list` says what each one holds)."""
    import msfm.datasets as ds
    from msfm.errors import MsfmInputError
    from msfm.runtime.h5ad import check_output, write_h5ad_atomic

    check_output(out, overwrite=overwrite)

    available = ds.list_datasets()
    if name not in available:
        msg = f"Unknown dataset {name!r}; available: {sorted(available)}."
        raise MsfmInputError(msg)
    loader = getattr(ds, name, None)
    if name == "histology_cohort":
        msg = "histology_cohort is a folder of slides, not an AnnData: write it with `msfm datasets slides -o FOLDER`."
        raise MsfmInputError(msg)
    if loader is None:
        msg = (
            f"Dataset {name!r} is not an AnnData dataset and cannot be exported to .h5ad; use "
            f"{available[name].get('function')} from Python."
        )
        raise MsfmInputError(msg)
    try:
        adata = loader()
    except TypeError as err:
        msg = f"Dataset {name!r} needs arguments ({available[name].get('function')}); use the Python API."
        raise MsfmInputError(msg) from err
    write_h5ad_atomic(adata, out, replace=overwrite)
    typer.echo(f"wrote {out}")


@datasets_app.command("slides")
def datasets_slides(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for slides/ and slides.csv (created).")],
    per_class: Annotated[int, typer.Option("--per-class", min=1, max=50, help="Slides per class.")] = 6,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed gives the same slides).")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Write the synthetic-label slide cohort: pyramid TIFFs cut from the two bundled real H&E images.

    Classes cmu / tia / cmu_restained (column `label`) and a second binary task `restained`; the labels are
    synthetic (which image a slide was cut from, whether its stain was changed), not biological.
    """
    from msfm.datasets.histology import build_cohort
    from msfm.runtime.atomic import check_output_free

    target = check_output_free(out, overwrite=overwrite)
    table = build_cohort(target, n_slides_per_class=per_class, seed=seed)
    counts = ", ".join(f"{k}: {v}" for k, v in table["label"].value_counts().sort_index().items())
    typer.echo(
        f"wrote {len(table)} slides ({counts}) to {target / 'slides'} and the table {target / 'slides.csv'}"
    )


@bench_app.command("scfoundation")
def bench_scfoundation(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the JSON results.")] = Path(
        "bench_out"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes (a smoke run, seconds).")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    sections: Annotated[str, typer.Option(help="Comma list: speed,flops,bf16,rss")] = "speed,flops,bf16,rss",
) -> None:
    """Cells/s, peak memory, FLOP rate vs matmul rate, bf16 agreement, backed-file RSS."""
    _results_folder(out)
    from msfm.bench.scfoundation import run_benchmarks

    results = run_benchmarks(
        out, quick=quick, device=device, sections=[s.strip() for s in sections.split(",")]
    )
    typer.echo(json.dumps(results, indent=2, default=str))


@bench_app.command("scmulan")
def bench_scmulan(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the JSON results.")] = Path(
        "bench_out"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny model, few cells (a smoke run, seconds).")
    ] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    sections: Annotated[
        str, typer.Option(help="Comma list: annotation,generation")
    ] = "annotation,generation",
) -> None:
    """Annotation cells/s (official-style loop vs batched fp32/bf16/int8), generation tokens/s, peak RSS."""
    _results_folder(out)
    from msfm.bench.scmulan import run_benchmarks

    results = run_benchmarks(
        out, quick=quick, device=device, sections=[s.strip() for s in sections.split(",")]
    )
    typer.echo(results["markdown"])
    typer.echo(f"results: {Path(out) / 'scmulan_bench.json'}")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report and its figures.")] = Path(
        "demo_out"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="Fewer steps (tests).")] = False,
    parts: Annotated[
        str | None,
        typer.Option(
            help="Comma list of parts to run (default: all): scfoundation, scfoundation_downstream, scmulan, roam, gest."
        ),
    ] = None,
) -> None:
    """The main job on bundled real data: every family trained, evaluated beside baselines, in one report."""
    from msfm.demo import PARTS, run_demo

    chosen = PARTS if parts is None else tuple(p.strip() for p in parts.split(",") if p.strip())
    report = run_demo(out, quick=quick, parts=chosen)
    typer.echo(f"report: {report} (the same with figures inlined, one file: {report.with_suffix('.html')})")
    typer.echo(f"explore the slides, spots and cells in a browser: msfm view {out}")


@bench_app.command("roam-model")
def bench_roam_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the JSON results.")] = Path(
        "bench_out"
    ),
    ks: Annotated[str, typer.Option(help="Comma list of ROIs per slide (inference).")] = "16,64,256,1024",
    train_ks: Annotated[str, typer.Option(help="Comma list of ROIs per slide (training step).")] = "16,64",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
) -> None:
    """ROAM model cost per slide (released size): seconds, ROIs/s, GFLOP/s and peak RSS, each in its own process."""
    _results_folder(out)
    from msfm.bench.roam_model import run_model_bench

    results = run_model_bench(
        out,
        ks=tuple(int(k) for k in ks.split(",") if k.strip()),
        train_ks=tuple(int(k) for k in train_ks.split(",") if k.strip()),
        threads=threads,
    )
    typer.echo(results["markdown"])


@bench_app.command("gest")
def bench_gest(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the JSON results.")] = Path(
        "bench_out"
    ),
    steps: Annotated[int, typer.Option(help="Training steps of the quality run.")] = 1500,
    preset: Annotated[str, typer.Option(help="Model preset of the quality run.")] = "gest-small",
    n_metacells: Annotated[int, typer.Option(help="Meta-cell vocabulary size.")] = 128,
    speed_presets: Annotated[str, typer.Option(help="Comma list of presets for the KV-cache speed run.")] = (
        "gest-small,gest-l8h8"
    ),
    n_cells: Annotated[int, typer.Option(help="Cells per window in the speed run.")] = 500,
    n_context: Annotated[int, typer.Option(help="Known cells per window in the speed run.")] = 100,
    threads: Annotated[int, typer.Option(help="torch CPU threads of the speed run.")] = 2,
    skip_quality: Annotated[bool, typer.Option("--skip-quality", help="Only the speed run.")] = False,
    skip_speed: Annotated[bool, typer.Option("--skip-speed", help="Only the quality run.")] = False,
) -> None:
    """GeST: held-out generation vs baselines and niche AMI/ARI on real data; KV-cache generation speed."""
    _results_folder(out)
    from msfm.bench.gest import run_quality_bench, run_speed_bench

    if not skip_quality:
        res = run_quality_bench(out, preset=preset, steps=steps, n_metacells=n_metacells)
        typer.echo(res["markdown"])
    if not skip_speed:
        speed = run_speed_bench(
            out,
            presets=tuple(p.strip() for p in speed_presets.split(",") if p.strip()),
            n_cells=n_cells,
            n_context=n_context,
            threads=threads,
        )
        typer.echo(speed["markdown"])


@bench_app.command("all")
def bench_all(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for bench_all.json and bench_all.md.")
    ] = Path("bench_out"),
    sections: Annotated[
        str, typer.Option(help="Comma list: scfoundation,scmulan,roam,gest,train,ddp (default: all).")
    ] = "scfoundation,scmulan,roam,gest,train,ddp",
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny presets, few items (CPU: < 3 min; CUDA: < 8 min).")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
) -> None:
    """Every family in one run: official-style loop vs msfm, matmul-limit fraction, bf16 agreement, peak RSS."""
    _results_folder(out)
    from msfm.bench.all import run_all

    results = run_all(
        out, sections=[s.strip() for s in sections.split(",") if s.strip()], quick=quick, device=device
    )
    typer.echo(results["markdown"])
    typer.echo(f"results: {Path(out) / 'bench_all.json'}")


def _register_roam_bench() -> None:
    from msfm.bench.roam import register_bench

    register_bench(bench_app, name="roam")


_register_roam_bench()


def _results_folder(out: Path) -> None:
    # Create (and probe) the results folder before a benchmark runs for minutes, not when it saves its JSON.
    from msfm.runtime.atomic import probe_writable

    probe_writable(out)
    out.mkdir(parents=True, exist_ok=True)
