"""scFoundation benchmarks: numbers for docs/benchmarks.md (never asserted in tests).

Sections (each measured in the same run, on the same machine):

* ``speed``: cells/s and peak memory of cell embedding, msfm batched (fp32 and bf16 autocast) vs a
  one-cell-at-a-time fp32 loop that mirrors the official ``get_embedding.py`` (dense 19,266-vector per
  cell, ``> 0`` gather, batch of 1), at the 100M architecture (random weights) and the tiny preset;
* ``flops``: achieved encoder FLOP rate against a matmul rate measured here for the same dtype;
* ``bf16``: cosine agreement of bf16 embeddings with fp32;
* ``rss``: peak RSS while embedding backed .h5ad files of 25k/50k/100k cells made by resampling real
  PBMCs (each in a fresh process, so the peaks do not mix).

Every configuration runs in its own subprocess so peak RSS is its own.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msfm.bench._machine import peak_rss_mb

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def encoder_flops(lengths: np.ndarray, dim: int, depth: int, num_bins: int = 100) -> float:
    """Useful forward FLOPs of the encoder for cells of the given token lengths (padding excluded).

    Per layer and token: QKV + output projections (4 d^2 MACs) and the FFN (8 d^2 MACs); attention
    scores and the weighted sum add 2 L d MACs per token. The value embedding adds (b + b^2 + b d) MACs
    per token. FLOPs = 2 x MACs.
    """
    L = np.asarray(lengths, dtype=np.float64)
    per_layer = 2.0 * (12.0 * dim * dim * L + 2.0 * L * L * dim)
    emb = 2.0 * L * (num_bins + num_bins * num_bins + num_bins * dim)
    return float(np.sum(depth * per_layer + emb))


def matmul_rate(
    dtype: torch.dtype, device: torch.device, *, m: int = 4096, k: int = 768, n: int = 3072, repeats: int = 8
) -> float:
    """Best-of-``repeats`` FLOP/s of an ``[m,k] @ [k,n]`` matmul (the FFN shape of the 100M encoder)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(5):  # warm up the thread pool and let the clock settle
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cells(n: int, seed: int = 0):
    """``n`` real PBMC cells (resampled with replacement when n > 700) as an AnnData with raw counts."""
    import msfm.datasets as ds

    if n <= 700:
        a = ds.pbmc68k()
        return a[:n].copy()
    return ds.pbmc68k_resampled(n, seed=seed)


def _build(preset: str, device: torch.device):
    from msfm.data import GenePanel
    from msfm.models.scfoundation.model import ScFoundation
    from msfm.registry import preset_config
    from msfm.runtime.loaded import Loaded

    cfg = preset_config(preset)
    torch.manual_seed(0)
    model = ScFoundation(cfg).to(device).eval()
    return Loaded(
        family="scfoundation",
        model=model,
        config=cfg,
        meta={},
        path=None,
        device=device,
        vocab=GenePanel.scfoundation(),
    )


# ----------------------------------------------------------------------------------------------------------
# workers (run in subprocesses)
# ----------------------------------------------------------------------------------------------------------
def _worker_speed(args: dict[str, Any]) -> dict[str, Any]:
    from msfm.data import CellSource, harmonize_genes
    from msfm.models.scfoundation.embedding import embed_source

    device = torch.device(args["device"])
    loaded = _build(args["preset"], device)
    adata = _cells(args["n_cells"])
    source = CellSource(adata)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = harmonize_genes(adata.var, loaded.vocab)
    mode = args["mode"]
    lengths = None
    if mode == "loop":
        t0 = time.perf_counter()
        emb, lengths = _official_style_loop(loaded, source, mapping)
        _sync(device)
        elapsed = time.perf_counter() - t0
    else:
        # warm-up on a few cells (allocator, oneDNN kernel selection), not timed
        embed_source(
            loaded,
            source,
            mapping,
            rows=np.arange(min(8, source.n_obs)),
            batch_size=args["batch_size"],
            precision=args["precision"],
            progress=False,
        )
        _sync(device)
        t0 = time.perf_counter()
        emb, _ = embed_source(
            loaded,
            source,
            mapping,
            batch_size=args["batch_size"],
            precision=args["precision"],
            progress=False,
            max_tokens=args.get("max_tokens"),
        )
        _sync(device)
        elapsed = time.perf_counter() - t0
    if lengths is None:
        panel = mapping.apply(source.rows(np.arange(source.n_obs)))
        lengths = np.diff(panel.indptr) + 2
    flops = encoder_flops(
        lengths, loaded.config.encoder_dim, loaded.config.encoder_depth, loaded.config.num_bins
    )
    out = {
        "preset": args["preset"],
        "mode": mode,
        "precision": args.get("precision", "32"),
        "batch_size": args.get("batch_size", 1),
        "n_cells": int(source.n_obs),
        "seconds": elapsed,
        "cells_per_s": source.n_obs / elapsed,
        "mean_tokens": float(np.mean(lengths)),
        "encoder_gflop_per_cell": flops / source.n_obs / 1e9,
        "achieved_gflops": flops / elapsed / 1e9,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    np.save(args["emb_path"], np.asarray(emb, dtype=np.float32))
    return out


@torch.inference_mode()
def _official_style_loop(loaded: Any, source: Any, mapping: Any) -> tuple[np.ndarray, np.ndarray]:
    """One cell at a time, the way the official ``get_embedding.py`` runs (re-implemented, not copied).

    Per cell: a dense 19,264-value row, normalised in float64 and turned into a Python list, a tensor of
    ``list + [T, S]``, the "stable gather" of values > 0 by adding descending offsets and ``topk``, value +
    gene embeddings, the encoder at batch size 1 and the S/T/max/mean pooling by fixed offsets. fp32.
    """
    model, device = loaded.model, loaded.device
    g = loaded.config.num_genes
    out = []
    lengths = []
    offsets = torch.arange(g + 2, 0, -1, dtype=torch.float32, device=device) * 20000.0
    for i in range(source.n_obs):
        row = mapping.apply(source.rows(np.array([i]))).toarray()[0].astype(np.float64)  # dense 19,264
        total = row.sum()
        values = np.log1p(row / total * 1e4).tolist()
        x = torch.tensor([*values, 4.0, float(np.log10(total))], device=device)[None].float()  # t4
        labels = x > 0
        n = int(labels.sum())
        score = torch.where(labels, offsets, torch.tensor(-float("inf"), device=device))
        idx = score.topk(n, dim=1).indices  # positions with a value, in ascending position order
        vals = torch.gather(x, 1, idx)
        pad = torch.zeros_like(vals, dtype=torch.bool)
        hidden = model.encode(vals, idx, pad)
        emb = torch.cat(
            [hidden[:, -1], hidden[:, -2], hidden[:, :-2].max(1).values, hidden[:, :-2].mean(1)], dim=1
        )
        out.append(emb.float().cpu().numpy()[0])
        lengths.append(n)
    return np.stack(out), np.asarray(lengths)


def _worker_rss(args: dict[str, Any]) -> dict[str, Any]:
    import msfm
    from msfm.models.scfoundation.provenance import preprocessing_record
    from msfm.runtime.checkpoint import save_checkpoint

    loaded = _build(args["preset"], torch.device("cpu"))
    ckpt = Path(args["tmp"]) / "ckpt"
    if not ckpt.exists():
        save_checkpoint(
            ckpt,
            family="scfoundation",
            config=loaded.config,
            state_dict=loaded.model.state_dict(),
            gene_panel=list(loaded.vocab.symbols),
            preprocessing=preprocessing_record(),
        )
    base = peak_rss_mb()
    t0 = time.perf_counter()
    out = Path(args["tmp"]) / f"out_{args['n_cells']}.h5ad"
    # An .h5ad path with out=: streamed from disk (backed), results written batch by batch.
    result = msfm.scfoundation.embed(
        args["data"], ckpt, out=out, overwrite=True, batch_size=128, device="cpu", progress=False
    )
    result.file.close()
    elapsed = time.perf_counter() - t0
    size = out.stat().st_size
    out.unlink()
    return {
        "n_cells": args["n_cells"],
        "seconds": elapsed,
        "cells_per_s": args["n_cells"] / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_embed_mb": base,
        "output_mb": size / 2**20,
    }


def _run_worker(kind: str, args: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(args, fh)
        arg_path = fh.name
    cmd = [sys.executable, "-m", "msfm.bench.scfoundation", kind, arg_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    os.unlink(arg_path)
    if proc.returncode != 0:
        msg = f"benchmark worker {kind} failed:\n{proc.stderr[-4000:]}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    c = num / den
    return {"min": float(c.min()), "mean": float(c.mean())}


def run_benchmarks(
    out: str | os.PathLike[str],
    *,
    quick: bool = False,
    device: str = "auto",
    sections: list[str] | None = None,
) -> dict[str, Any]:
    """Run the selected sections and write ``out/scfoundation.json``; returns the results."""
    from msfm.runtime.atomic import atomic_write_json
    from msfm.runtime.devices import resolve_device

    sections = sections or ["speed", "flops", "bf16", "rss"]
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="msfm-bench-"))
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(dev),
        },
        "quick": quick,
    }
    if dev.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name(dev)

    if "flops" in sections or "speed" in sections:
        results["matmul_gflops"] = {
            "fp32": matmul_rate(torch.float32, dev) / 1e9,
            "bf16": matmul_rate(torch.bfloat16, dev) / 1e9,
        }
    if "speed" in sections:
        plans = {
            "scfoundation-tiny": {
                "n_batched": 256 if quick else 700,
                "n_loop": 64 if quick else 200,
                "batch": 64,
            },
            "scfoundation-100m": {"n_batched": 8 if quick else 48, "n_loop": 4 if quick else 16, "batch": 16},
        }
        speed = []
        for preset, p in plans.items():
            embs = {}
            for mode, precision, n, bs in (
                ("loop", "32", p["n_loop"], 1),
                ("batched", "32", p["n_batched"], p["batch"]),
                ("batched", "bf16", p["n_batched"], p["batch"]),
            ):
                emb_path = str(tmp / f"{preset}_{mode}_{precision}.npy")
                r = _run_worker(
                    "speed",
                    {
                        "preset": preset,
                        "mode": mode,
                        "precision": precision,
                        "n_cells": n,
                        "batch_size": bs,
                        "device": str(dev),
                        "emb_path": emb_path,
                    },
                )
                embs[(mode, precision)] = np.load(emb_path)
                speed.append(r)
                logger.info("%s", r)
            # same cells first: the loop ran on the first n_loop cells of the batched set
            n_loop = embs[("loop", "32")].shape[0]
            agree = {
                "batched_fp32_vs_loop_max_abs": float(
                    np.abs(embs[("batched", "32")][:n_loop] - embs[("loop", "32")]).max()
                ),
                "bf16_vs_fp32_cosine": _cos(embs[("batched", "bf16")], embs[("batched", "32")]),
            }
            results.setdefault("agreement", {})[preset] = agree
        results["speed"] = speed
        # Measure the matmul rate again after the speed runs and keep the best of both, so a slow first
        # measurement (cold caches, frequency ramp) cannot flatter the achieved fractions.
        if "matmul_gflops" in results:
            for key, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                results["matmul_gflops"][key] = max(results["matmul_gflops"][key], matmul_rate(dt, dev) / 1e9)
        for preset in plans:
            rows = {(r["mode"], r["precision"]): r for r in speed if r["preset"] == preset}
            loop = rows[("loop", "32")]["cells_per_s"]
            summary = {f"{m}_{p}_speedup_vs_loop": r["cells_per_s"] / loop for (m, p), r in rows.items()}
            if "matmul_gflops" in results:
                for (m, p), r in rows.items():
                    peak = results["matmul_gflops"]["bf16" if p == "bf16" else "fp32"]
                    summary[f"{m}_{p}_fraction_of_matmul_rate"] = r["achieved_gflops"] / peak
            results.setdefault("summary", {})[preset] = summary

    if "rss" in sections:
        from msfm.datasets import write_backed_h5ad

        sizes = [5000, 10000] if quick else [25000, 50000, 100000]
        rss = []
        for n in sizes:
            path = tmp / f"pbmc_{n}.h5ad"
            write_backed_h5ad(path, n, seed=0)
            rss.append(
                _run_worker(
                    "rss", {"preset": "scfoundation-tiny", "n_cells": n, "data": str(path), "tmp": str(tmp)}
                )
            )
            path.unlink()
        results["rss"] = rss
    atomic_write_json(out / "scfoundation.json", results)
    return results


def _main() -> None:
    kind, arg_path = sys.argv[1], sys.argv[2]
    args = json.loads(Path(arg_path).read_text())
    logging.disable(logging.WARNING)
    fn = {"speed": _worker_speed, "rss": _worker_rss}[kind]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    _main()
