"""``msfm bench all``: every family's official-style loop vs msfm, in one run, on whatever machine it runs on.

One run measures and writes (``out/bench_all.json`` and ``out/bench_all.md``, atomically):

* the machine line (:func:`msfm.runtime.precision.cpu_capability`: CPU model, torch capability, bf16 hardware
  flags, cores; torch version, load average; the GPU name on CUDA);
* matmul rates per dtype (fp32, bf16, fp16 on CUDA) from :func:`msfm.runtime.precision.matmul_rate`;
* per family (section), the official-style loop (batch 1, per cell, as the official code runs) vs msfm, with random
  weights at the released sizes (``--quick``: the tiny presets): items/s, the ratio to the loop, the fraction of the
  matmul limit of the row's dtype (FLOPs per item / time / matmul rate), the agreement of bf16 rows with fp32
  (embedding cosine, identical labels) and the peak RSS (``VmHWM``) of the fresh subprocess each configuration
  ran in. The per-family benchmarks (:mod:`msfm.bench.scfoundation`, :mod:`msfm.bench.scmulan_workers`,
  :mod:`msfm.bench.roam_model`, :mod:`msfm.bench.gest`) do the measuring; this module orchestrates them;
* ``train``: bf16 training steps/s per family (autocast, a fixed synthetic batch, one optimizer step);
* ``ddp``: one 2-GPU DDP training step rate; skipped with a line saying so on fewer than 2 GPUs.
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

from msfm.bench._machine import cpu_snapshot, fmt, loadavg, peak_rss_mb

logger = logging.getLogger(__name__)

__all__ = ["SECTIONS", "format_markdown", "machine_info", "run_all"]

SECTIONS = ("scfoundation", "scmulan", "roam", "gest", "train", "ddp")


# ----------------------------------------------------------------------------------------------------------
# machine and matmul rates
# ----------------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine line's fields (CPU capability, cores, torch, load; GPU name and count on CUDA)."""
    from msfm.runtime.precision import cpu_capability

    cap = cpu_capability()
    info: dict[str, Any] = {
        **cap.summary(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": str(device),
        "loadavg": loadavg(),
        "line": "",
    }
    line = f"{cap.line()}; torch {torch.__version__}; load {info['loadavg']}"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
        line += f"; GPU {info['gpu']} x{info['gpu_count']}"
    info["line"] = line
    return info


def _matmul_rates(device: torch.device, quick: bool) -> dict[str, float]:
    from msfm.runtime.precision import matmul_rate

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    # On a CPU without bf16 hardware a full-size bf16 product takes seconds: a smaller m is just as telling.
    rates = {}
    for name, dt in dtypes.items():
        m = 4096 if device.type == "cuda" else (512 if quick else 2048)
        if device.type == "cpu" and name == "bf16" and not _cpu_bf16_hw():
            m = 128 if quick else 512
        # nn.Linear's layout (matmul_rate times x @ w.T, the kernel every model layer takes).
        rates[name] = matmul_rate(device, dt, shape=(m, 768, 3072), repeats=3 if quick else 5)
    return rates


def _cpu_bf16_hw() -> bool:
    from msfm.runtime.precision import cpu_capability

    return cpu_capability().bf16_hardware


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Minimum row cosine of two embedding matrices (same rows)."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).min())


def _row(
    family: str, config: str, mode: str, precision: str, per_s: float, unit: str, **extra: Any
) -> dict[str, Any]:
    return {
        "family": family,
        "config": config,
        "mode": mode,
        "precision": precision,
        "per_s": per_s,
        "unit": unit,
        **extra,
    }


def _finish_rows(rows: list[dict[str, Any]], rates: dict[str, float]) -> None:
    """Ratio to the official-style loop of the same family and config, and the fraction of the matmul limit."""
    loops = {(r["family"], r["config"]): r["per_s"] for r in rows if r["mode"].startswith("official")}
    for r in rows:
        base = loops.get((r["family"], r["config"]))
        r["ratio_vs_official"] = r["per_s"] / base if base else None
        dt = "bf16" if r["precision"] == "bf16" else "fp32"
        rate = rates.get(dt, 0.0)
        gflop = r.get("gflop_per_item")
        r["fraction_of_matmul"] = gflop * r["per_s"] / rate if gflop and rate else None


# ----------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------
def _scfoundation(dev: torch.device, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    from msfm.bench.scfoundation import _run_worker

    preset = "scfoundation-tiny" if quick and dev.type == "cpu" else "scfoundation-100m"
    gpu = dev.type == "cuda"
    # A GPU runs the released size even with --quick (the >= 20x targets are measured there).
    n_loop = 64 if gpu else (8 if quick else 6)
    n_batched = (256 if quick else 1024) if gpu else (32 if quick else 16)
    batch = 16 if not gpu else 64
    rows, embs = [], {}
    for mode, precision, n, bs in (
        ("loop", "32", n_loop, 1),
        ("batched", "32", n_batched, batch),
        ("batched", "bf16", n_batched if gpu or _cpu_bf16_hw() or quick else 4, batch),
    ):
        path = str(tmp / f"scf_{mode}_{precision}.npy")
        r = _run_worker(
            "speed",
            {
                "preset": preset,
                "mode": mode,
                "precision": precision,
                "n_cells": n,
                "batch_size": bs,
                "device": str(dev),
                "emb_path": path,
            },
        )
        embs[(mode, precision)] = np.load(path)
        rows.append(
            _row(
                "scfoundation",
                preset,
                "official-style loop" if mode == "loop" else f"msfm batched (b={bs})",
                "bf16" if precision == "bf16" else "fp32",
                r["cells_per_s"],
                "cells/s",
                n_items=r["n_cells"],
                gflop_per_item=r["encoder_gflop_per_cell"],
                peak_rss_mb=r["peak_rss_mb"],
                peak_gpu_mb=r.get("peak_gpu_mb"),
            )
        )
    ref = embs[("batched", "32")]
    bf = embs[("batched", "bf16")]
    rows[2]["agreement"] = f"cosine min {_cos(bf, ref[: bf.shape[0]]):.5f}"
    lp = embs[("loop", "32")]
    rows[1]["agreement"] = f"max abs vs loop {float(np.abs(ref[: lp.shape[0]] - lp).max()):.1e}"
    return rows


def _scmulan(dev: torch.device, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    from msfm.bench.scmulan_paths import real_cells
    from msfm.bench.scmulan_workers import run_worker
    from msfm.models.scmulan.model import ScMulan
    from msfm.registry import preset_config

    preset = "scmulan-tiny" if quick and dev.type == "cpu" else "scmulan-368m"
    gpu = dev.type == "cuda"
    n_loop = 32 if gpu else (4 if quick else 2)
    n_batched = (256 if quick else 700) if gpu else (16 if quick else 8)
    n_bf16 = n_batched if gpu or _cpu_bf16_hw() or quick else 4
    bs = 16 if not gpu else 64
    torch.manual_seed(0)
    weights = tmp / f"{preset}.safetensors"
    save_file(ScMulan(preset_config(preset)).state_dict(), str(weights))
    inp = tmp / "scmulan_real.h5ad"
    real_cells(max(n_loop, n_batched)).write_h5ad(inp)
    save_dir = tmp / "scmulan_arrays"
    save_dir.mkdir(exist_ok=True)
    base = {"kind": "annotation", "preset": preset, "weights": str(weights), "device": str(dev)}
    base["save_dir"] = str(save_dir)
    jobs = [
        {**base, "mode": "loop", "precision": "32", "batch_size": 1, "n": n_loop},
        {**base, "mode": "batched", "precision": "32", "batch_size": bs, "n": n_batched},
        {**base, "mode": "batched", "precision": "bf16", "batch_size": bs, "n": n_bf16},
    ]
    rows, arrays = [], {}
    for job in jobs:
        job["inputs"] = [{"name": "real", "path": str(inp), "n_cells": job.pop("n")}]
        (r,) = run_worker({"jobs": [job], "threads": torch.get_num_threads()})
        arrays[(r["mode"], r["precision"])] = (
            np.load(r["stem"] + "_ids.npy"),
            np.load(r["stem"] + "_emb.npy"),
        )
        rows.append(
            _row(
                "scmulan",
                preset,
                "official-style loop" if r["mode"] == "loop" else f"msfm batched (b={bs})",
                "bf16" if r["precision"] == "bf16" else "fp32",
                r["cells_per_s"],
                "cells/s",
                n_items=r["n_cells"],
                gflop_per_item=r["gflop_per_cell"],
                peak_rss_mb=r["peak_rss_mb"],
            )
        )
    ids0, emb0 = arrays[("batched", "32")]
    ids1, emb1 = arrays[("batched", "bf16")]
    n = ids1.shape[0]
    same = float((ids1 == ids0[:n]).all(1).mean())
    rows[2]["agreement"] = f"identical labels {same:.0%}, cosine min {_cos(emb1, emb0[:n]):.4f}"
    return rows


def _roam(dev: torch.device, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    from msfm.bench.roam_model import run_model_bench

    small = quick and dev.type == "cpu"
    preset = "roam-tiny" if small else "roam-subtyping"
    k = 32 if small else 256
    rows = []
    # The official forward encodes every ROI of the slide at once: roi_chunk = K is that shape.
    for label, chunk in (("official-style (all ROIs at once)", k), ("msfm (roi_chunk 64)", 64)):
        res = run_model_bench(
            None,
            ks=(k,),
            train_ks=(),
            preset=preset,
            threads=torch.get_num_threads(),
            repeats=2,
            roi_chunk=chunk,
        )
        (r,) = res["rows"]
        rows.append(
            _row(
                "roam",
                f"{preset}, K={k} ROIs",
                label,
                "fp32",
                1.0 / r["seconds"],
                "slides/s",
                gflop_per_item=r["gflops"],
                peak_rss_mb=r["peak_rss_mb"],
            )
        )
    if dev.type != "cpu":
        rows.append({"family": "roam", "note": "ROAM model rows ran on CPU (roam_model is CPU-only)."})
    return rows


def _gest(dev: torch.device, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    from msfm.bench.gest import run_speed_bench

    n_cells, n_context = (60, 20) if quick else (300, 100)
    res = run_speed_bench(
        None,
        presets=("gest-small",),
        n_cells=n_cells,
        n_context=n_context,
        n_genes=200 if quick else 2000,
        n_metacells=128 if quick else 2048,
        threads=torch.get_num_threads(),
        repeats=1,
    )
    rows = []
    for r in res["rows"]:
        row = _row(
            "gest",
            f"{r['preset']}, {r['n_generated']} cells generated",
            "msfm (KV cache)" if r["use_cache"] else "official-style (full re-run per cell)",
            "fp32",
            r["cells_per_s"],
            "cells/s",
            peak_rss_mb=r["peak_rss_mb"],
        )
        if r["use_cache"]:
            row["agreement"] = "same tokens" if r.get("same_tokens_as_uncached") else "tokens differ"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# training steps (subprocess workers)
# ----------------------------------------------------------------------------------------------------------
def _train_step_fn(family: str, preset: str, device: torch.device, batch: int) -> tuple[Any, Any]:
    """A model and ``loss(module)``: a scalar loss of ``module`` (the model or its DDP wrapper) on a fixed batch.

    The losses are proxies with the real cost (the family's forward, cross-entropy or MSE, the backward).
    """
    from msfm.registry import create_model

    g = torch.Generator().manual_seed(0)
    if family == "roam":
        model = create_model(preset, n_classes=3).to(device)
        x = torch.randn(batch, 64, 84, model.config.d_in, generator=g).to(device)
        y = torch.randint(0, 3, (batch,), generator=g).to(device)

        def loss(m: Any) -> torch.Tensor:
            out = m(x, labels=y)
            return torch.nn.functional.cross_entropy(out.logits.float(), y) + out.instance_loss

    elif family == "scmulan":
        model = create_model(preset).to(device)
        cfg = model.config
        ids = torch.randint(1, cfg.vocab_size, (batch, 128), generator=g).to(device)
        lev = torch.randint(0, cfg.n_levels, (batch, 128), generator=g).to(device)

        def loss(m: Any) -> torch.Tensor:
            out = m(ids, lev)
            return torch.nn.functional.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1)
            )

    elif family == "scfoundation":
        model = create_model(preset).to(device)
        cfg = model.config
        n_tok = 1024
        gene_ids = torch.stack(
            [torch.randperm(cfg.num_genes, generator=g)[:n_tok].sort().values for _ in range(batch)]
        )
        values = torch.rand(batch, n_tok, generator=g)

        def loss(m: Any) -> torch.Tensor:
            h = m.encode(
                values.to(device),
                gene_ids.to(device),
                torch.zeros(batch, n_tok, dtype=torch.bool, device=device),
            )
            return h.float().pow(2).mean()

    else:
        msg = f"no training step for family {family!r}"
        raise ValueError(msg)
    return model, loss


def _worker_train(job: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(job["device"])
    torch.manual_seed(0)
    model, loss_fn = _train_step_fn(job["family"], job["preset"], device, job["batch"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()

    step()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    out = {**job, "steps_per_s": job["steps"] / elapsed, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _ddp_rank(rank: int, job: dict[str, Any], port: int, result_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    model, loss_fn = _train_step_fn(job["family"], job["preset"], device, job["batch"])
    ddp = DistributedDataParallel(model, device_ids=[rank])
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(ddp)  # through the wrapper's forward, so gradients are all-reduced
        loss.backward()
        opt.step()

    step()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        Path(result_path).write_text(
            json.dumps({**job, "world_size": 2, "steps_per_s": job["steps"] / elapsed})
        )
    dist.destroy_process_group()


def _worker_ddp(job: dict[str, Any]) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ddp.json")
        mp.spawn(_ddp_rank, args=(job, port, path), nprocs=2, join=True)
        return json.loads(Path(path).read_text())


def _cpu_times() -> tuple[float, float] | None:
    """(busy CPU seconds of the machine, CPU seconds of this process and its finished children)."""
    import resource

    snap = cpu_snapshot()
    if snap is None:
        return None
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return snap[0], snap[1] + kids.ru_utime + kids.ru_stime


def _others_share(
    before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float
) -> float | None:
    """Fraction of the machine's CPU used by other processes during a section (0 = quiet machine)."""
    if before is None or after is None or wall <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _subprocess(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a fresh interpreter (its own peak RSS)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh)
        arg = fh.name
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "msfm.bench.all", kind, arg], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(arg)
    if proc.returncode != 0:
        msg = f"bench all worker {kind} failed ({job}):\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_presets(dev: torch.device, quick: bool) -> list[tuple[str, str, int, int]]:
    """(family, preset, batch, steps): released sizes on a GPU, the tiny presets on a CPU or with --quick."""
    if dev.type == "cuda":
        return [
            ("scfoundation", "scfoundation-100m", 8, 5 if quick else 20),
            ("scmulan", "scmulan-368m", 8, 5 if quick else 20),
            ("roam", "roam-subtyping", 4, 5 if quick else 20),
        ]
    return [
        ("scfoundation", "scfoundation-tiny", 2, 2 if quick else 5),
        ("scmulan", "scmulan-tiny", 2, 2 if quick else 5),
        ("roam", "roam-tiny", 1, 2 if quick else 5),
    ]


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def run_all(
    out: str | os.PathLike[str],
    *,
    sections: list[str] | tuple[str, ...] | None = None,
    quick: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the selected sections; write ``out/bench_all.json`` and ``out/bench_all.md``; return the results."""
    from msfm.errors import MsfmInputError
    from msfm.runtime.atomic import atomic_write_json, atomic_write_text
    from msfm.runtime.devices import resolve_device

    chosen = list(sections or SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        msg = f"unknown bench sections {unknown}; expected a subset of {list(SECTIONS)} (e.g. --sections roam,gest)."
        raise MsfmInputError(msg)
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(dev),
        "quick": quick,
        "sections": chosen,
        "notes": [
            "Random weights at the released sizes"
            + (
                " (QUICK on CPU: tiny presets and few items; a smoke run, not the released sizes)"
                if quick and dev.type == "cpu"
                else (" (QUICK on GPU: released sizes, fewer items)" if quick else "")
            )
            + "; each configuration in its own subprocess (peak RSS = its VmHWM).",
            "fraction of matmul = GFLOP per item x items/s / the measured matmul GFLOP/s of the row's dtype "
            "(msfm.runtime.precision.matmul_rate: nn.Linear's x @ w.T layout, the kernel every layer takes).",
        ],
    }
    results["matmul_gflops"] = _matmul_rates(dev, quick)
    runners = {"scfoundation": _scfoundation, "scmulan": _scmulan, "roam": _roam, "gest": _gest}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="msfm-bench-all-") as tmp_name:
        for name in chosen:
            if name not in runners:
                continue
            t0 = time.perf_counter()
            before = _cpu_times()
            got = runners[name](dev, quick, Path(tmp_name))
            wall = time.perf_counter() - t0
            share = _others_share(before, _cpu_times(), wall)
            results.setdefault("section_seconds", {})[name] = wall
            results.setdefault("others_cpu_share", {})[name] = share
            logger.info("bench all: %s took %.0f s (other processes: %s of the CPU)", name, wall, share)
            rows.extend(got)
    results["notes"] += [r["note"] for r in rows if "note" in r]
    rows = [r for r in rows if "note" not in r]
    # Measure the rates again after the sections and keep the best of both, so that a slow first measurement
    # (other work on the machine, frequency ramp) cannot inflate the fractions of the limit.
    for key, again in _matmul_rates(dev, quick).items():
        results["matmul_gflops"][key] = max(results["matmul_gflops"][key], again)
    _finish_rows(rows, results["matmul_gflops"])
    results["rows"] = rows
    if "train" in chosen:
        results["train"] = [
            _subprocess("train", {"family": f, "preset": p, "batch": b, "steps": s, "device": str(dev)})
            for f, p, b, s in _train_presets(dev, quick)
        ]
    if "ddp" in chosen:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.type != "cuda" or n_gpu < 2:
            results["ddp"] = {
                "skipped": f"2-GPU DDP step skipped: {n_gpu} GPU(s) visible, device {dev} (needs 2)."
            }
        else:
            job = {"family": "scmulan", "preset": "scmulan-368m", "batch": 8, "steps": 5 if quick else 20}
            results["ddp"] = _subprocess("ddp", {**job, "device": "cuda"})
    results["loadavg_end"] = loadavg()
    results["total_s"] = time.perf_counter() - t_start
    results["markdown"] = format_markdown(results)
    atomic_write_json(out / "bench_all.json", results)
    atomic_write_text(out / "bench_all.md", results["markdown"])
    return results


def format_markdown(results: dict[str, Any]) -> str:
    """The machine line, the matmul rates and one table per family."""
    m = results["machine"]
    lines = [f"**Machine:** {m['line']}", ""]
    if results.get("quick"):
        if m["device"].startswith("cuda"):
            lines += ["_QUICK run on GPU: released sizes, fewer items._", ""]
        else:
            lines += ["_QUICK run: tiny presets, few items (a smoke run; not the released sizes)._", ""]
    rates = ", ".join(f"{k} {fmt(v)} GFLOP/s" for k, v in results["matmul_gflops"].items())
    lines += [f"**Matmul rates** (`[m,768] x [768,3072]`): {rates}", ""]
    for family in ("scfoundation", "scmulan", "roam", "gest"):
        fam = [r for r in results.get("rows", []) if r["family"] == family]
        if not fam:
            continue
        share = results.get("others_cpu_share", {}).get(family)
        busy = (
            []
            if share is None
            else [f"_Other processes used {share:.0%} of the CPU during this section._", ""]
        )
        lines += [
            f"### {family}",
            "",
            *busy,
            "| config | path | dtype | items/s | vs official | of matmul limit | agreement | peak RSS (MB) |",
            "|---|---|---|---:|---:|---:|---|---:|",
        ]
        for r in fam:
            frac = r.get("fraction_of_matmul")
            lines.append(
                f"| {r['config']} | {r['mode']} | {r['precision']} | {fmt(r['per_s'])} {r['unit']} | "
                f"{fmt(r.get('ratio_vs_official'))}x | {'-' if frac is None else f'{frac:.1%}'} | "
                f"{r.get('agreement', '-')} | {fmt(r.get('peak_rss_mb'))} |"
            )
        lines.append("")
    if results.get("train"):
        lines += [
            "### bf16 training steps/s",
            "",
            "| family | preset | batch | steps/s | peak RSS (MB) |",
            "|---|---|---:|---:|---:|",
        ]
        for r in results["train"]:
            lines.append(
                f"| {r['family']} | {r['preset']} | {r['batch']} | {fmt(r['steps_per_s'])} | {fmt(r['peak_rss_mb'])} |"
            )
        lines.append("")
    if "ddp" in results:
        d = results["ddp"]
        lines += [
            "### 2-GPU DDP",
            "",
            d.get("skipped") or f"{d['preset']} batch {d['batch']}/GPU: {fmt(d['steps_per_s'])} steps/s",
            "",
        ]
    lines += [
        f"_Notes:_ {' '.join(results.get('notes', []))}",
        f"_Total: {results.get('total_s', 0):.0f} s._",
    ]
    return "\n".join(lines)


def _main() -> None:
    kind, arg = sys.argv[1], sys.argv[2]
    logging.disable(logging.WARNING)
    job = json.loads(Path(arg).read_text())
    # Through the imported module (not __main__), so that mp.spawn pickles msfm.bench.all._ddp_rank by name.
    import msfm.bench.all as this

    fn = {"train": this._worker_train, "ddp": this._worker_ddp}[kind]
    print(json.dumps(fn(job)))


if __name__ == "__main__":
    _main()
