"""ROAM model cost per slide: seconds, peak memory and FLOPs of the released-size model (never asserted in tests).

For ``roam-subtyping`` (d_in 1024, 8.77M parameters, random weights) and slides of K ROIs, each measured in its
own subprocess so that the peak RSS (``VmHWM``) is its own:

* inference: one forward pass in ``torch.inference_mode`` (ROIs encoded in chunks of ``roi_chunk``);
* training: one forward + backward with the instance loss (what one slide costs per epoch).

FLOPs are counted analytically from the matmuls (2 x multiply-adds), the same way for every K.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from msfm.bench._machine import peak_rss_mb

__all__ = ["format_markdown", "model_flops_per_roi", "run_model_bench"]


def model_flops_per_roi(cfg: Any) -> float:
    """Forward FLOPs of the ROI encoder for one ROI (matmuls only; the MIL head is negligible)."""
    inner = cfg.heads * cfg.dim_head

    def layer(t: int) -> float:
        qkv = 2 * t * cfg.dim * 3 * inner
        attn = 2 * 2 * t * t * inner
        out = 2 * t * inner * cfg.dim
        ff = 2 * 2 * t * cfg.dim * cfg.mlp_dim
        return qkv + attn + out + ff

    d20, d2010, d10, d105, d5 = cfg.depths
    embed = 2 * 84 * cfg.d_in * cfg.dim
    return float(
        embed
        + d20 * layer(65)
        + d2010 * 16 * layer(5)
        + d10 * layer(17)
        + d105 * 4 * layer(5)
        + d5 * layer(5)
    )


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from msfm.registry import create_model

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = create_model(job["preset"], n_classes=3)
    k = job["k"]
    x = torch.randn(1, k, 84, model.config.d_in)
    labels = torch.tensor([1])
    times = []
    if job["mode"] == "inference":
        model.eval()
        with torch.inference_mode():
            model(x[:, : min(k, 4)])  # warm-up
            for _ in range(job["repeats"]):
                t0 = time.perf_counter()
                model(x, roi_chunk=job["roi_chunk"])
                times.append(time.perf_counter() - t0)
    else:
        model.train()
        model(x[:, : min(k, 4)], labels=labels).logits.sum().backward()
        for _ in range(job["repeats"]):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out = model(x, labels=labels)
            loss = torch.nn.functional.cross_entropy(out.logits, labels) + out.instance_loss
            loss.backward()
            times.append(time.perf_counter() - t0)
    best = min(times)
    flops = model_flops_per_roi(model.config) * k * (1 if job["mode"] == "inference" else 3)
    return {
        **job,
        "seconds": best,
        "rois_per_s": k / best,
        "gflops": flops / 1e9,
        "gflop_per_s": flops / best / 1e9,
        "peak_rss_mb": peak_rss_mb(),
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_model_bench(
    out: str | Path | None = None,
    *,
    ks: tuple[int, ...] = (16, 64, 256, 1024),
    train_ks: tuple[int, ...] = (16, 64),
    preset: str = "roam-subtyping",
    threads: int = 2,
    repeats: int = 3,
    roi_chunk: int = 256,
) -> dict[str, Any]:
    """Measure each configuration in a fresh subprocess; write ``out/roam_model_bench.json`` if ``out`` is given."""
    import torch

    rows = []
    jobs = [{"mode": "inference", "k": k} for k in ks] + [{"mode": "train", "k": k} for k in train_ks]
    for job in jobs:
        job = {**job, "preset": preset, "threads": threads, "repeats": repeats, "roi_chunk": roi_chunk}
        res = subprocess.run(
            [sys.executable, "-m", "msfm.bench.roam_model", json.dumps(job)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    results = {"torch": torch.__version__, "threads": threads, "rows": rows}
    results["markdown"] = format_markdown(results)
    if out is not None:
        from msfm.runtime.atomic import atomic_write_json

        atomic_write_json(Path(out) / "roam_model_bench.json", results)
    return results


def format_markdown(results: dict[str, Any]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| mode | ROIs (K) | s per slide | ROIs/s | GFLOP | GFLOP/s | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['mode']} | {r['k']} | {r['seconds']:.3f} | {r['rois_per_s']:.0f} | {r['gflops']:.1f} | "
            f"{r['gflop_per_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
