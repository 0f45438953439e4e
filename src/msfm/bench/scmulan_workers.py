"""scMulan benchmark workers: each configuration runs in its own process (``python -m
msfm.bench.scmulan_workers ARGS.json``), so its peak RSS is its own; quick mode runs them all in one process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msfm.bench._machine import cpu_snapshot, loadavg, others_cpu_share, peak_rss_mb
from msfm.bench.scmulan_paths import (
    AnnotationResult,
    forward_flops,
    msfm_annotate_batched,
    official_style_loop,
    quantize,
    sync,
)

__all__ = ["run_worker", "worker"]


# ----------------------------------------------------------------------------------------------------------
# workers (run in subprocesses)
# ----------------------------------------------------------------------------------------------------------
def _load(preset: str, weights: str, device: torch.device, precision: str) -> tuple[Any, float]:
    """The model with the saved random weights (built on the meta device: no second init)."""
    from safetensors.torch import load_file

    from msfm.models.scmulan.loading import FAMILY, preprocessing_record
    from msfm.models.scmulan.model import ScMulan
    from msfm.registry import preset_config
    from msfm.runtime.loaded import Loaded
    from msfm.tokenizers.cell_sentence import CellSentenceVocab

    cfg = preset_config(preset)
    with torch.device("meta"):
        model = ScMulan(cfg)
    model.load_state_dict(load_file(weights), assign=True)
    model = model.to(device).eval()
    quant_s = 0.0
    if precision == "int8":
        t0 = time.perf_counter()
        quantize(model)
        quant_s = time.perf_counter() - t0
    meta = {"preprocessing": preprocessing_record()}
    loaded = Loaded(FAMILY, model, cfg, meta, None, device, CellSentenceVocab.official())
    return loaded, quant_s


def _cfg_flops(cfg: Any, n_new: int, n_past: int) -> float:
    return forward_flops(
        n_new, n_past, dim=cfg.dim, depth=cfg.depth, mlp_ratio=cfg.mlp_ratio, vocab=cfg.vocab_size
    )


def _annotation_flops(cfg: Any, res: AnnotationResult, mode: str) -> float:
    """Useful FLOPs of the run: the loop's full re-runs, or one prefill plus the cached steps."""
    total = 0.0
    for p, f in zip(res.prompt_len.tolist(), res.n_forward.tolist(), strict=True):
        if mode == "loop":
            total += sum(_cfg_flops(cfg, p + k, 0) for k in range(f))
        else:
            total += _cfg_flops(cfg, p, 0) + sum(_cfg_flops(cfg, 1, p + k) for k in range(max(f - 1, 0)))
    return total


def _worker_annotation(job: dict[str, Any]) -> dict[str, Any]:
    import anndata as ad

    from msfm.data import CellSource, GenePanel, harmonize_genes
    from msfm.data.normalize import normalized_rows

    device = torch.device(job["device"])
    mode, precision = job["mode"], job["precision"]
    t_load = time.perf_counter()
    loaded, quant_s = _load(job["preset"], job["weights"], device, precision)
    load_s = time.perf_counter() - t_load
    panel = GenePanel.from_symbols(list(loaded.vocab.genes), name="scmulan")
    # warm-up (not timed): thread pool, allocator and kernel selection on a short prompt
    warm = torch.randint(1, 2001, (2, 24), device=device)
    with torch.inference_mode():
        loaded.model(warm, torch.ones_like(warm), heads="last")
    rows = []
    for inp in job["inputs"]:
        adata = ad.read_h5ad(inp["path"])[: inp["n_cells"]].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real PBMCs hold ~10 % of the vocabulary genes (expected)
            mapping = harmonize_genes(adata.var, panel)
            source = CellSource(adata)
        load_before = loadavg()
        cpu_before = cpu_snapshot()
        if mode == "loop":
            # The release is handed an AnnData already normalised and reduced to its 2,000 genes: not timed.
            x_norm = normalized_rows(source, None, mapping)
            sync(device)
            t0 = time.perf_counter()
            res = official_style_loop(loaded.model, loaded.vocab, x_norm, device=device)
        else:
            sync(device)
            t0 = time.perf_counter()
            res = msfm_annotate_batched(
                loaded, source, mapping, batch_size=job["batch_size"], precision=precision
            )
        sync(device)
        elapsed = time.perf_counter() - t0
        others = others_cpu_share(cpu_before, cpu_snapshot(), elapsed)
        flops = _annotation_flops(loaded.config, res, mode)
        stem = (
            Path(job["save_dir"]) / f"{job['preset']}_{inp['name']}_{mode}_{precision}_b{job['batch_size']}"
        )
        np.save(f"{stem}_ids.npy", res.ids)
        np.save(f"{stem}_emb.npy", res.embedding)
        rows.append(
            {
                "kind": "annotation",
                "preset": job["preset"],
                "input": inp["name"],
                "mode": mode,
                "precision": precision,
                "batch_size": job["batch_size"],
                "n_cells": int(source.n_obs),
                "mean_prompt_words": float(res.prompt_len.mean()),
                "max_prompt_words": int(res.prompt_len.max()),
                # loop: full re-runs of the sentence; batched: 1 prefill + cached one-word steps
                "forwards_per_cell": float(res.n_forward.mean()),
                "seconds": elapsed,
                "cells_per_s": source.n_obs / elapsed,
                "gflop_per_cell": flops / source.n_obs / 1e9,
                "achieved_gflops": flops / elapsed / 1e9,
                "peak_rss_mb": peak_rss_mb(),  # cumulative over this process (inputs run shortest first)
                "load_s": load_s,
                "quantize_s": quant_s,
                "threads": torch.get_num_threads(),
                "loadavg_before": load_before,
                "others_cpu_share": others,
                "stem": str(stem),
            }
        )
    return {"rows": rows}


def _worker_generation(job: dict[str, Any]) -> dict[str, Any]:
    from msfm.models.scmulan.decoding import DecodeOptions, generate_tokens, id_mask
    from msfm.models.scmulan.loading import tokenizer_for
    from msfm.tokenizers.cell_sentence import GENERATE

    device = torch.device(job["device"])
    t_load = time.perf_counter()
    loaded, _ = _load(job["preset"], job["weights"], device, "32")
    load_s = time.perf_counter() - t_load
    vocab = loaded.vocab
    tok = tokenizer_for(loaded)
    prompt = tok.prompts(None, meta={"organ": "Blood", "cell_type": "T cell"}, task=GENERATE)
    allowed = id_mask(np.append(vocab.gene_ids, vocab.end_id), len(vocab), device=device)
    use_cache = bool(job["use_cache"])
    rows = []
    for b in job["batch_sizes"]:
        ids, levels, mask = tok.left_pad(prompt, [0] * b)
        ids, levels, mask = ids.to(device), levels.to(device), mask.to(device)

        def run(steps: int, seed: int, ids: Any = ids, levels: Any = levels, mask: Any = mask) -> Any:
            opts = DecodeOptions(
                max_new_tokens=steps,
                greedy=False,
                end_weight=job["end_weight"],
                repeat_mask="all",
                end_id=vocab.end_id,
            )
            gen = torch.Generator(device=device).manual_seed(seed)
            with torch.inference_mode():
                return generate_tokens(
                    loaded.model, ids, levels, mask, opts, allowed=allowed, generator=gen, use_cache=use_cache
                )

        run(2, 1)  # warm-up, not timed
        load_before = loadavg()
        cpu_before = cpu_snapshot()
        sync(device)
        t0 = time.perf_counter()
        res = run(job["max_new_tokens"], job["seed"])
        sync(device)
        elapsed = time.perf_counter() - t0
        others = others_cpu_share(cpu_before, cpu_snapshot(), elapsed)
        n_tok = int(res.n_new.sum())
        stem = Path(job["save_dir"]) / f"{job['preset']}_gen_b{b}_{'cache' if use_cache else 'nocache'}"
        np.save(f"{stem}_ids.npy", res.ids.cpu().numpy())
        rows.append(
            {
                "kind": "generation",
                "preset": job["preset"],
                "use_cache": use_cache,
                "batch_size": b,
                "prompt_words": int(ids.shape[1]),
                "max_new_tokens": job["max_new_tokens"],
                "new_tokens": n_tok,
                "mean_new_tokens": n_tok / b,
                "seconds": elapsed,
                "tokens_per_s": n_tok / elapsed,
                "ms_per_step": 1e3 * elapsed / max(int(res.ids.shape[1]), 1),
                "peak_rss_mb": peak_rss_mb(),
                "load_s": load_s,
                "threads": torch.get_num_threads(),
                "loadavg_before": load_before,
                "others_cpu_share": others,
                "stem": str(stem),
            }
        )
    return {"rows": rows}


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """Run a list of jobs in this process (one job per process except in quick mode)."""
    torch.set_num_threads(int(args.get("threads") or os.cpu_count() or 1))
    rows: list[dict[str, Any]] = []
    for job in args["jobs"]:
        fn = _worker_annotation if job["kind"] == "annotation" else _worker_generation
        rows.extend(fn(job)["rows"])
    return {"rows": rows}


def run_worker(args: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(args, fh)
        arg_path = fh.name
    try:
        cmd = [sys.executable, "-m", "msfm.bench.scmulan_workers", arg_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        os.unlink(arg_path)
    if proc.returncode != 0:
        msg = f"scMulan benchmark worker failed ({[j['kind'] for j in args['jobs']]}):\n{proc.stderr[-4000:]}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])["rows"]


def _main() -> None:
    args = json.loads(Path(sys.argv[1]).read_text())
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    print(json.dumps(worker(args)))


if __name__ == "__main__":
    _main()
