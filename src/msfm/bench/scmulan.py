"""scMulan benchmarks: numbers for docs/benchmarks.md (never asserted in tests).

Sections (each measured in the same run, on the same machine, random weights with the model's own init):

* ``annotation``: cells/s of zero-shot annotation plus the integration embedding, at the 368M architecture
  and the tiny preset, for

  - the **official-style loop** (:func:`official_style_loop`): one cell at a time, the way the release's
    ``get_cell_types_and_embds_for_adata`` runs (re-implemented, not copied): a dense 2,000-value row, its
    expressed genes in reverse-alphabetical order, per-cell levels, ``genes + <PCT>``, then three greedy
    decoding steps that each re-run the **whole** sentence without a cache (about three prefills per cell),
    the embedding read from the last forward's hidden state at position -2; fp32, batch size 1;
  - **msfm batched** (:func:`msfm_annotate_batched`): length-bucketed, left-padded batches, one prefill with
    a KV cache and one cached step (two constrained steps: coarse then fine), in fp32, under bf16 autocast,
    and with dynamic int8 ``nn.Linear`` layers (fp32 activations);

  on real PBMCs (``msfm.datasets.pbmc68k``; only ~200 of the 2,000 vocabulary genes occur there, so prompts
  are ~63 words) and on cells **resampled** from them at ~64, ~256 and ~700 words
  (:func:`resampled_cells`);
* ``generation``: tokens/s of sampled conditional generation after ``<SPToken1>`` (constrained to genes and
  ``<E>``, a small ``end_weight`` so sentences run to the token budget), with and without the KV cache, at
  batch sizes 1 and 16.

Every configuration runs in its own subprocess (``quick=True`` runs them all in one process to finish in
seconds), so its peak RSS is its own. Results go to ``out/scmulan_bench.json`` (atomically) with a markdown
table.
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from msfm.bench._machine import cpu_model, cpu_snapshot, fmt, loadavg, others_cpu_share, peak_rss_mb

logger = logging.getLogger(__name__)

__all__ = [
    "AnnotationResult",
    "forward_flops",
    "format_markdown",
    "msfm_annotate_batched",
    "official_style_loop",
    "resampled_cells",
    "run_benchmarks",
]

SECTIONS = ("annotation", "generation")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(
    n_new: int, n_past: int, *, dim: int, depth: int, mlp_ratio: int, vocab: int, heads: int = 1
) -> float:
    """Useful FLOPs of one forward over ``n_new`` words after ``n_past`` cached ones (one sentence).

    Per layer and word: QKV + output projections (4 d^2 MACs) and the MLP (2 r d^2 MACs); causal attention
    adds 2 p d MACs for the word at position ``p`` (scores and weighted sum). The two heads add 2 d V MACs per
    position they read (``heads`` positions). FLOPs = 2 x MACs; embeddings, norms and padding are left out.
    """
    linear = 2.0 * n_new * depth * (4 + 2 * mlp_ratio) * dim * dim
    positions = np.arange(n_past + 1, n_past + n_new + 1, dtype=np.float64)
    attention = 2.0 * depth * 2.0 * dim * float(positions.sum())
    return linear + attention + 2.0 * heads * 2.0 * dim * vocab


def matmul_rate(dtype: str, *, m: int, k: int = 1120, n: int = 4480, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of ``F.linear([m,k], [n,k])`` on CPU (the MLP shape of the 368M model).

    ``dtype``: ``"fp32"``, ``"bf16"`` or ``"int8"`` (a dynamically quantized ``nn.Linear``, fp32 in and out).
    The weight is laid out as the model's (``[out, in]``): on some CPUs a bf16 ``a @ b`` with ``b`` as
    ``[in, out]`` misses the fast kernel and runs ~10x slower than the same product through ``F.linear``.
    """
    x = torch.randn(m, k)
    if dtype == "int8":
        lin = _quantize(nn.Sequential(nn.Linear(k, n, bias=False)))[0]

        def op() -> Any:
            return lin(x)
    else:
        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        a, w = x.to(dt), torch.randn(n, k, dtype=dt)

        def op() -> Any:
            return nn.functional.linear(a, w)

    with torch.inference_mode():
        for _ in range(2):  # warm up the thread pool and kernel selection
            op()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def _quantize(model: nn.Module) -> tuple[nn.Module, int]:
    """Dynamic int8 weights for every ``nn.Linear`` (in place); returns the model and how many were converted.

    Only ``nn.Linear`` modules convert: the attention's fused QKV projection is a bare parameter
    (``in_proj_weight``) and stays fp32 (a quarter of each block's matmul FLOPs).
    """
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model, n_linear


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def resampled_cells(n_cells: int, length: int, genes: list[str], *, seed: int = 0, jitter: float = 0.15):
    """Cells with ``~length``-word annotation prompts, **resampled** from real PBMC count profiles.

    The bundled PBMCs hold only ~200 of scMulan's 2,000 vocabulary genes (prompts of ~63 words). To measure at
    realistic prompt lengths each synthetic cell takes one real PBMC (cycling through a seeded permutation of
    the 700), draws ``n_genes = round(length * U(1 - jitter, 1 + jitter)) - 1`` distinct vocabulary genes
    uniformly, and gives them counts drawn with replacement from that real cell's non-zero counts. So the
    values follow real per-cell count distributions; which genes are expressed is random. The prompt is
    ``n_genes + 1`` words (genes + ``<PCT>``).

    Returns:
        AnnData of raw counts (``X`` and ``layers['counts']``, float32 CSR) over ``genes``;
        ``obs['source_cell']`` = the real PBMC each cell was drawn from.

    Shape:
        ``[n_cells, len(genes)]``.
    """
    import anndata as ad
    import pandas as pd

    import msfm.datasets as ds

    real = ds.pbmc68k()
    counts = sp.csr_matrix(real.layers["counts"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(real.n_obs)
    g = len(genes)
    rows, cols, vals, src = [], [], [], []
    for i in range(n_cells):
        r = int(order[i % real.n_obs])
        profile = counts.data[counts.indptr[r] : counts.indptr[r + 1]]
        n_genes = int(np.clip(round(length * rng.uniform(1.0 - jitter, 1.0 + jitter)) - 1, 1, g))
        cols.append(np.sort(rng.choice(g, size=n_genes, replace=False)))
        vals.append(rng.choice(profile, size=n_genes, replace=True).astype(np.float32))
        rows.append(np.full(n_genes, i, dtype=np.int64))
        src.append(r)
    x = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_cells, g),
        dtype=np.float32,
    )
    obs = pd.DataFrame({"source_cell": np.asarray(src)}, index=[f"L{length}_{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes))))
    adata.layers["counts"] = x.copy()
    adata.uns["resampled"] = {
        "from": "msfm.datasets.pbmc68k (700 real PBMCs)",
        "target_prompt_words": int(length),
        "jitter": float(jitter),
        "seed": int(seed),
        "rule": "uniform distinct vocabulary genes; counts drawn with replacement from one real cell's non-zero counts",
    }
    return adata


def _real_cells(n_cells: int):
    """The first ``n_cells`` real PBMCs (raw counts only)."""
    import anndata as ad

    import msfm.datasets as ds

    real = ds.pbmc68k()[:n_cells]
    x = sp.csr_matrix(real.layers["counts"], dtype=np.float32)
    adata = ad.AnnData(X=x, obs=real.obs[["cell_type"]].copy(), var=real.var.copy())
    adata.layers["counts"] = x.copy()
    return adata


# ----------------------------------------------------------------------------------------------------------
# the two annotation paths
# ----------------------------------------------------------------------------------------------------------
@dataclass
class AnnotationResult:
    """Per-cell output of one annotation path.

    Shape:
        - ids: ``[n, steps]`` generated ids (-1 after a stop)
        - embedding: ``[n, d]`` the official integration embedding (hidden state at the coarse-type word)
        - prompt_len: ``[n]`` prompt words (genes + ``<PCT>``)
        - n_forward: ``[n]`` forwards run per cell (loop) or decoding steps (batched)
    """

    ids: np.ndarray
    embedding: np.ndarray
    prompt_len: np.ndarray
    n_forward: np.ndarray


@torch.inference_mode()
def official_style_loop(
    model: nn.Module, vocab: Any, x_norm: sp.csr_matrix, *, device: torch.device, steps: int = 3
) -> AnnotationResult:
    """Annotate one cell at a time the way the release does (re-implemented for timing, not copied).

    Per cell: the dense 2,000-value row of an already log1p-normalised, gene-uniformised matrix; its genes
    with value > 0 reversed (reverse-alphabetical); ``bins = linspace(0, max, 11)`` in float64 and
    ``digitize(right=True)``; gene names -> ids through a name -> id dictionary; ``genes + <PCT>`` with levels
    ``+ [0]``; then up to ``steps`` greedy steps, each re-running the full sentence (no cache), banning every id
    of the sentence except the last one, appending ``(token, clamp(round(expression), 0, 10))`` and stopping
    after ``<E>``. The embedding is the last forward's hidden state at position -2 (the coarse-type word).

    Args:
        model: the scMulan network (eval mode, on ``device``).
        vocab: the :class:`~msfm.tokenizers.cell_sentence.CellSentenceVocab`.
        x_norm: ``[n, 2000]`` log1p-normalised expression, columns in ``vocab.genes`` order.
        device: where to run.
        steps: decoding steps (3 in the release: coarse, fine, ``<E>``).

    Returns:
        The generated ids, embeddings, prompt lengths and forwards per cell.
    """
    n_levels = model.config.n_levels
    gene_names = list(vocab.genes)
    token_to_id = {t: i for i, t in enumerate(vocab.tokens)}  # the release tokenises by a dictionary
    task = vocab.token(vocab.annotate_id)
    end = vocab.end_id
    n = x_norm.shape[0]
    ids_out = np.full((n, steps), -1, dtype=np.int64)
    emb_out = np.zeros((n, model.config.dim), dtype=np.float32)
    plen = np.zeros(n, dtype=np.int64)
    n_fwd = np.zeros(n, dtype=np.int64)
    for i in range(n):
        row = x_norm[i].toarray()[0]  # dense, like reading adata.X row by row
        expressed = np.nonzero(row > 0)[0][::-1]
        values = row[expressed].astype(np.float64)
        levels = (
            np.digitize(values, np.linspace(0.0, values.max(), n_levels + 1), right=True).tolist()
            if values.size
            else []
        )
        words = [gene_names[j] for j in expressed] + [task]
        idx = torch.tensor([[token_to_id[w] for w in words]], dtype=torch.long, device=device)
        lev = torch.tensor([[*levels, 0]], dtype=torch.long, device=device)
        plen[i] = idx.shape[1]
        hidden = None
        for step in range(steps):
            out = model(idx, lev, heads="last")
            n_fwd[i] += 1
            hidden = out.hidden
            logits = out.logits[0, -1].float().clone()
            logits[idx[0, :-1]] = float("-inf")
            token = int(torch.argmax(logits))
            level = int(torch.clamp(torch.round(out.expression[0, -1, token].float()), 0, n_levels))
            ids_out[i, step] = token
            idx = torch.cat([idx, torch.tensor([[token]], device=device)], dim=1)
            lev = torch.cat([lev, torch.tensor([[level]], device=device)], dim=1)
            if token == end:
                break
        if hidden is not None and hidden.shape[1] >= 2:
            emb_out[i] = hidden[0, -2].float().cpu().numpy()
    return AnnotationResult(ids_out, emb_out, plen, n_fwd)


@torch.inference_mode()
def msfm_annotate_batched(
    loaded: Any, source: Any, mapping: Any, *, batch_size: int, precision: str = "32"
) -> AnnotationResult:
    """Batched, cached, constrained annotation (the decode of ``msfm.models.scmulan.api.annotate``).

    Cells are read, normalised and tokenised chunk by chunk, sorted by prompt length into left-padded batches
    of ``batch_size`` and decoded with :func:`~msfm.models.scmulan.decoding.generate_tokens`: one prefill with
    a KV cache, the coarse type from the coarse set, one cached step, the fine type from the fine set. The
    embedding is the hidden state at the coarse-type word once fed back (``hidden[:, 0]``).

    Args:
        loaded: a :class:`~msfm.models.scmulan.inference.LoadedScMulan`.
        source: the :class:`~msfm.data.CellSource` of the cells.
        mapping: its genes mapped onto the vocabulary's.
        batch_size: cells per batch.
        precision: ``"32"``, ``"bf16"`` (autocast) or ``"int8"`` (the model already quantized; fp32 autocast).
    """
    from msfm.models.scmulan.decoding import DecodeOptions, generate_tokens, id_mask
    from msfm.models.scmulan.inference import iter_prompt_batches
    from msfm.runtime.devices import autocast_context
    from msfm.tokenizers.cell_sentence import ANNOTATE

    vocab, dev, model = loaded.vocab, loaded.device, loaded.model
    v = len(vocab)
    allowed = [
        id_mask(vocab.category_ids("coarse_cell_type"), v, device=dev),
        id_mask(vocab.category_ids("cell_type"), v, device=dev),
    ]
    options = DecodeOptions(max_new_tokens=2, greedy=True, repeat_mask="official", end_id=vocab.end_id)
    n = source.n_obs
    ids_out = np.full((n, 2), -1, dtype=np.int64)
    emb_out = np.zeros((n, loaded.config.dim), dtype=np.float32)
    plen = np.zeros(n, dtype=np.int64)
    steps = np.zeros(n, dtype=np.int64)
    with autocast_context(dev, "32" if precision == "int8" else precision):
        for batch in iter_prompt_batches(
            source, mapping, loaded.tokenizer(), task=ANNOTATE, batch_size=batch_size
        ):
            res = generate_tokens(
                model,
                batch.ids.to(dev),
                batch.levels.to(dev),
                batch.attention_mask.to(dev),
                options,
                allowed=allowed,
            )
            rows = batch.rows
            run = res.ids.shape[1]
            ids_out[rows, :run] = res.ids.cpu().numpy()
            emb_out[rows] = torch.nan_to_num(res.hidden[:, 0]).float().cpu().numpy()
            plen[rows] = batch.attention_mask.sum(1).numpy()
            steps[rows] = run
    return AnnotationResult(ids_out, emb_out, plen, steps)


# ----------------------------------------------------------------------------------------------------------
# workers (run in subprocesses)
# ----------------------------------------------------------------------------------------------------------
def _load(preset: str, weights: str, device: torch.device, precision: str) -> tuple[Any, float]:
    """The model with the saved random weights (built on the meta device: no second init)."""
    from safetensors.torch import load_file

    from msfm.models.scmulan.inference import LoadedScMulan, preprocessing_record
    from msfm.models.scmulan.model import ScMulan
    from msfm.registry import preset_config
    from msfm.tokenizers.cell_sentence import CellSentenceVocab

    cfg = preset_config(preset)
    with torch.device("meta"):
        model = ScMulan(cfg)
    model.load_state_dict(load_file(weights), assign=True)
    model = model.to(device).eval()
    quant_s = 0.0
    if precision == "int8":
        t0 = time.perf_counter()
        _quantize(model)
        quant_s = time.perf_counter() - t0
    loaded = LoadedScMulan(
        model=model,
        config=cfg,
        vocab=CellSentenceVocab.official(),
        meta={},
        path=None,
        device=device,
        preprocessing=preprocessing_record(),
    )
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
            _sync(device)
            t0 = time.perf_counter()
            res = official_style_loop(loaded.model, loaded.vocab, x_norm, device=device)
        else:
            _sync(device)
            t0 = time.perf_counter()
            res = msfm_annotate_batched(
                loaded, source, mapping, batch_size=job["batch_size"], precision=precision
            )
        _sync(device)
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
    from msfm.tokenizers.cell_sentence import GENERATE

    device = torch.device(job["device"])
    t_load = time.perf_counter()
    loaded, _ = _load(job["preset"], job["weights"], device, "32")
    load_s = time.perf_counter() - t_load
    vocab = loaded.vocab
    tok = loaded.tokenizer()
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
        _sync(device)
        t0 = time.perf_counter()
        res = run(job["max_new_tokens"], job["seed"])
        _sync(device)
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


def _worker(args: dict[str, Any]) -> dict[str, Any]:
    """Run a list of jobs in this process (one job per process except in quick mode)."""
    torch.set_num_threads(int(args.get("threads") or os.cpu_count() or 1))
    rows: list[dict[str, Any]] = []
    for job in args["jobs"]:
        fn = _worker_annotation if job["kind"] == "annotation" else _worker_generation
        rows.extend(fn(job)["rows"])
    return {"rows": rows}


def _run_worker(args: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(args, fh)
        arg_path = fh.name
    try:
        cmd = [sys.executable, "-m", "msfm.bench.scmulan", arg_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        os.unlink(arg_path)
    if proc.returncode != 0:
        msg = f"scMulan benchmark worker failed ({[j['kind'] for j in args['jobs']]}):\n{proc.stderr[-4000:]}"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])["rows"]


# ----------------------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------------------
def _plans(quick: bool) -> dict[str, Any]:
    """Cells, batch sizes and tokens per preset, chosen so that the full run stays under ~15 min on 2 cores."""
    if quick:
        return {
            "scmulan-tiny": {
                "inputs": {"real": 8, "L64": 8},
                "loop": {"real": 4, "L64": 4},
                "batched": {"32": [4], "bf16": [4], "int8": [4]},
                "batched_cells": {"real": 8, "L64": 8},
                "bf16_cells": {"real": 8, "L64": 8},
                "gen_tokens": 8,
                "gen_batches": [1, 4],
            }
        }
    return {
        "scmulan-tiny": {
            "inputs": {"real": 256, "L64": 256, "L256": 256, "L700": 128},
            "loop": {"real": 64, "L64": 64, "L256": 64, "L700": 32},
            "batched": {"32": [8, 16, 32], "bf16": [16], "int8": [16]},
            "batched_cells": {"real": 256, "L64": 256, "L256": 256, "L700": 128},
            "bf16_cells": {"real": 256, "L64": 256, "L256": 128, "L700": 64},
            "gen_tokens": 200,
            "gen_batches": [1, 16],
        },
        "scmulan-368m": {
            "inputs": {"real": 16, "L64": 32, "L256": 16, "L700": 8},
            "loop": {"real": 4, "L64": 4, "L256": 3, "L700": 2},
            "batched": {"32": [16], "bf16": [16], "int8": [16]},
            # bf16 has no native kernels on a CPU without AVX-512-BF16/AMX: few cells, short prompts only.
            "batched_cells": {"real": 16, "L64": 32, "L256": 16, "L700": 8},
            "bf16_cells": {"real": 8, "L64": 8, "L256": 4},
            "extra_batch_sizes": {"32": {"sizes": [8, 32], "inputs": {"L64": 32}}},
            "gen_tokens": 24,
            "gen_batches": [1, 16],
        },
    }


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    c = num / den
    return {"min": float(c.min()), "mean": float(c.mean())}


def _agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bf16 / int8 vs fp32 (batched, same batch size, same cells): identical greedy labels, embedding cosine."""
    out = []
    ref = {
        (r["preset"], r["input"], r["batch_size"]): r
        for r in rows
        if r["mode"] == "batched" and r["precision"] == "32"
    }
    for r in rows:
        if r["mode"] != "batched" or r["precision"] == "32":
            continue
        base = ref.get((r["preset"], r["input"], r["batch_size"]))
        if base is None:
            continue
        ids, emb = np.load(r["stem"] + "_ids.npy"), np.load(r["stem"] + "_emb.npy")
        n = ids.shape[0]
        ids0 = np.load(base["stem"] + "_ids.npy")[:n]
        emb0 = np.load(base["stem"] + "_emb.npy")[:n]
        out.append(
            {
                "preset": r["preset"],
                "input": r["input"],
                "precision": r["precision"],
                "n_cells": int(n),
                "coarse_identical": float((ids[:, 0] == ids0[:, 0]).mean()),
                "fine_identical": float((ids[:, 1] == ids0[:, 1]).mean()),
                "both_identical": float((ids == ids0).all(1).mean()),
                "embedding_cosine": _cos(emb, emb0),
            }
        )
    return out


def _summary(rows: list[dict[str, Any]], presets: list[str]) -> dict[str, Any]:
    """Speed-up of every batched configuration over the loop on the same input, and the 10x target at 368M."""
    summary: dict[str, Any] = {}
    for preset in presets:
        per_input: dict[str, Any] = {}
        for inp in sorted({r["input"] for r in rows if r["preset"] == preset}, key=_input_order):
            loop = next(
                (r for r in rows if r["preset"] == preset and r["input"] == inp and r["mode"] == "loop"), None
            )
            if loop is None:
                continue
            entry: dict[str, Any] = {"loop_cells_per_s": loop["cells_per_s"]}
            for r in rows:
                if r["preset"] == preset and r["input"] == inp and r["mode"] == "batched":
                    key = f"{r['precision']}_b{r['batch_size']}"
                    r["speedup_vs_loop"] = r["cells_per_s"] / loop["cells_per_s"]
                    entry[f"speedup_{key}"] = r["speedup_vs_loop"]
            speedups = [v for k, v in entry.items() if k.startswith("speedup_")]
            entry["best_speedup"] = max(speedups) if speedups else None
            # What pure compute predicts: the loop spends ~3 prefills per cell, batched ~1 prefill + 1 step.
            best_fp32 = max(
                (
                    r
                    for r in rows
                    if r["preset"] == preset
                    and r["input"] == inp
                    and r["mode"] == "batched"
                    and r["precision"] == "32"
                ),
                key=lambda r: r["cells_per_s"],
                default=None,
            )
            if best_fp32 is not None:
                entry["flop_ratio_loop_over_batched"] = loop["gflop_per_cell"] / best_fp32["gflop_per_cell"]
                entry["rate_ratio_batched_over_loop_fp32"] = (
                    best_fp32["achieved_gflops"] / loop["achieved_gflops"]
                )
            per_input[inp] = entry
        summary[preset] = per_input
    if summary.get("scmulan-368m"):
        best = {k: v["best_speedup"] for k, v in summary["scmulan-368m"].items()}
        fp32 = {
            k: max((s for n, s in v.items() if n.startswith("speedup_32_")), default=None)
            for k, v in summary["scmulan-368m"].items()
        }
        summary["target_10x_at_368m"] = {
            "best_speedup_per_input": best,
            "fp32_speedup_per_input": fp32,
            "met_on_inputs": [k for k, v in best.items() if v is not None and v >= 10.0],
        }
    return summary


def _input_order(name: str) -> tuple[int, int]:
    return (0, 0) if name == "real" else (1, int(name[1:]))


def run_benchmarks(
    out: str | os.PathLike[str],
    *,
    quick: bool = False,
    device: str = "auto",
    sections: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the selected sections (``annotation``, ``generation``) and write ``out/scmulan_bench.json``.

    Returns the results, with the markdown table under ``"markdown"`` (also written to
    ``out/scmulan_bench.md``). ``quick=True``: tiny preset only, a few cells, one worker process (seconds).
    ``threads``: torch threads in every worker (default: all cores).
    """
    from msfm.errors import MsfmInputError
    from msfm.runtime.devices import resolve_device

    sections = list(sections or SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        msg = f"unknown benchmark sections {unknown}; expected a subset of {list(SECTIONS)}."
        raise MsfmInputError(msg)
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Inputs, weights (1.5 GB at 368M) and per-cell arrays live here and are removed at the end.
    with tempfile.TemporaryDirectory(prefix="msfm-bench-scmulan-") as tmp_name:
        return _run(Path(tmp_name), out, quick=quick, dev=dev, sections=sections, threads=threads)


def _run(
    tmp: Path, out: Path, *, quick: bool, dev: torch.device, sections: list[str], threads: int | None
) -> dict[str, Any]:
    """The body of :func:`run_benchmarks` (``tmp`` is a scratch folder)."""
    from safetensors.torch import save_file

    from msfm.models.scmulan.model import ScMulan
    from msfm.registry import preset_config
    from msfm.runtime.atomic import atomic_write_json, atomic_write_text
    from msfm.tokenizers.cell_sentence import CellSentenceVocab

    t_start = time.perf_counter()
    threads = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    plans = _plans(quick)
    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": threads,
            "device": str(dev),
        },
        "loadavg_start": loadavg(),
        "quick": quick,
        "sections": sections,
        "plans": plans,
        "notes": [
            "Random weights (the model's own GPT-2 init, seed 0), the same for every configuration of a preset.",
            "Official-style loop: one cell at a time, dense row -> expressed genes reverse-alphabetical -> "
            "levels -> genes + <PCT>, three greedy steps each re-running the whole sentence without a cache "
            "(the release's unconstrained decoding), embedding = last forward's hidden at position -2; fp32. "
            "Its input is already normalised (as the release expects); that preparation is not timed.",
            "msfm batched: counts -> normalise -> tokenise -> length-bucketed left-padded batches -> one "
            "prefill with a KV cache + one cached step (coarse then fine, constrained); all of it timed.",
            "Inputs 'real': the first N of the 700 real PBMCs (~63-word prompts: only ~200 of the 2,000 "
            "vocabulary genes occur in the data). Inputs 'L64/L256/L700': cells RESAMPLED from real PBMC count "
            "profiles onto the 2,000 vocabulary genes (uniform random genes, counts drawn from one real cell's "
            "non-zero counts, length jittered +-15 %); see msfm.bench.scmulan.resampled_cells.",
            "int8: torch.ao.quantization.quantize_dynamic on nn.Linear (MLP, attention output projection, "
            "both heads); the fused QKV projection is a bare parameter and stays fp32.",
            "Label agreement with random weights is a pessimistic proxy: untrained logits have small margins.",
        ],
    }
    if dev.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name(dev)

    # bf16 runs ~10x slower than fp32 on CPUs without native bf16 instructions: a smaller product suffices.
    mm_shape = {
        dt: {
            "m": 32 if quick else (256 if dt == "bf16" else 1024),
            "k": 1120,
            "n": 4480,
            "repeats": 2 if quick else 5,
        }
        for dt in ("fp32", "bf16", "int8")
    }
    if dev.type == "cpu":
        results["matmul_shape"] = mm_shape
        results["matmul_gflops"] = {dt: matmul_rate(dt, **mm_shape[dt]) / 1e9 for dt in mm_shape}

    # Weights: built once per preset with the model's own init, shared by every worker through a file.
    weights: dict[str, str] = {}
    results["models"] = {}
    for preset in plans:
        cfg = preset_config(preset)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = ScMulan(cfg)
        init_s = time.perf_counter() - t0
        path = tmp / f"{preset}.safetensors"
        save_file(model.state_dict(), str(path))
        results["models"][preset] = {
            "parameters": model.num_parameters(),
            "dim": cfg.dim,
            "depth": cfg.depth,
            "num_heads": cfg.num_heads,
            "init_s": init_s,
        }
        weights[preset] = str(path)
        del model

    rows: list[dict[str, Any]] = []
    save_dir = tmp / "arrays"
    save_dir.mkdir()
    jobs: list[dict[str, Any]] = []
    if "annotation" in sections:
        genes = list(CellSentenceVocab.official().genes)
        input_paths: dict[str, str] = {}
        need: dict[str, int] = {}
        for p in plans.values():
            for name, n in p["inputs"].items():
                need[name] = max(need.get(name, 0), n)
        for name, n in need.items():
            adata = _real_cells(n) if name == "real" else resampled_cells(n, int(name[1:]), genes, seed=0)
            path = tmp / f"input_{name}.h5ad"
            adata.write_h5ad(path)
            input_paths[name] = str(path)

        for preset, p in plans.items():

            def inputs(counts: dict[str, int]) -> list[dict[str, Any]]:
                return [
                    {"name": k, "path": input_paths[k], "n_cells": counts[k]}
                    for k in sorted(counts, key=_input_order)
                ]

            base = {"kind": "annotation", "preset": preset, "weights": weights[preset], "device": str(dev)}
            base["save_dir"] = str(save_dir)
            jobs.append(
                {**base, "mode": "loop", "precision": "32", "batch_size": 1, "inputs": inputs(p["loop"])}
            )
            for precision, sizes in p["batched"].items():
                counts = p["bf16_cells"] if precision == "bf16" else p["batched_cells"]
                for bs in sizes:
                    jobs.append(
                        {
                            **base,
                            "mode": "batched",
                            "precision": precision,
                            "batch_size": bs,
                            "inputs": inputs(counts),
                        }
                    )
            for precision, extra in p.get("extra_batch_sizes", {}).items():
                for bs in extra["sizes"]:
                    jobs.append(
                        {
                            **base,
                            "mode": "batched",
                            "precision": precision,
                            "batch_size": bs,
                            "inputs": inputs(extra["inputs"]),
                        }
                    )
    if "generation" in sections:
        for preset, p in plans.items():
            for use_cache in (True, False):
                jobs.append(
                    {
                        "kind": "generation",
                        "preset": preset,
                        "weights": weights[preset],
                        "device": str(dev),
                        "use_cache": use_cache,
                        "batch_sizes": p["gen_batches"],
                        "max_new_tokens": p["gen_tokens"],
                        "end_weight": 0.01,
                        "seed": 0,
                        "save_dir": str(save_dir),
                    }
                )

    # One process per configuration (its own peak RSS); quick mode runs everything in one process.
    for group in [jobs] if quick else [[j] for j in jobs]:
        got = _run_worker({"jobs": group, "threads": threads})
        for r in got:
            logger.info("%s", r)
        rows.extend(got)
    if "annotation" in sections:
        ann_rows = [r for r in rows if r["kind"] == "annotation"]
        results["annotation"] = ann_rows
        results["agreement"] = _agreement(ann_rows)
        results["summary"] = _summary(ann_rows, list(plans))
    if "generation" in sections:
        gen_rows = [r for r in rows if r["kind"] == "generation"]
        # Same seed, same prompts: the cached and uncached runs should sample the same tokens.
        for r in gen_rows:
            if r["use_cache"]:
                continue
            twin = next(
                (
                    c
                    for c in gen_rows
                    if c["use_cache"] and c["preset"] == r["preset"] and c["batch_size"] == r["batch_size"]
                ),
                None,
            )
            if twin is not None:
                a, b = np.load(r["stem"] + "_ids.npy"), np.load(twin["stem"] + "_ids.npy")
                k = min(a.shape[1], b.shape[1])
                r["identical_tokens_vs_cache"] = float((a[:, :k] == b[:, :k]).mean())
                r["cache_speedup"] = twin["tokens_per_s"] / r["tokens_per_s"]
        results["generation"] = gen_rows

    if dev.type == "cpu" and "matmul_gflops" in results and not quick:
        # Measure again after the runs and keep the best, so a slow first measurement cannot flatter anything.
        for dt in mm_shape:
            again = matmul_rate(dt, **mm_shape[dt]) / 1e9
            results["matmul_gflops"][dt] = max(results["matmul_gflops"][dt], again)
    if "summary" in results and "matmul_gflops" in results:
        # The physics: batched work is ~1/3 of the loop's FLOPs, so its speed-up is bounded by
        # flop_ratio x (rate it reaches / rate the loop reaches); these are the bounds at the measured matmul rates.
        mm = results["matmul_gflops"]
        for preset, per_input in results["summary"].items():
            if preset.startswith("target"):
                continue
            for inp, entry in per_input.items():
                if "flop_ratio_loop_over_batched" not in entry:
                    continue
                loop = next(
                    r
                    for r in results["annotation"]
                    if r["preset"] == preset and r["input"] == inp and r["mode"] == "loop"
                )
                for dt in ("fp32", "int8"):
                    entry[f"ceiling_speedup_at_{dt}_matmul_rate"] = (
                        entry["flop_ratio_loop_over_batched"] * mm[dt] / loop["achieved_gflops"]
                    )
    for r in [*results.get("annotation", []), *results.get("generation", [])]:
        r.pop("stem", None)
    results["loadavg_end"] = loadavg()
    results["total_s"] = time.perf_counter() - t_start
    results["markdown"] = format_markdown(results)
    atomic_write_json(out / "scmulan_bench.json", results)
    atomic_write_text(out / "scmulan_bench.md", results["markdown"])
    return results


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def _others(row: dict[str, Any]) -> str:
    """Share of the machine's CPU used by other processes while this row was timed."""
    share = row.get("others_cpu_share")
    return "-" if share is None else f"{100 * share:.0f} %"


def format_markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (machine line, annotation, agreement, generation, models)."""
    m = results.get("machine", {})
    lines = [
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('cpu_capability')}), torch {m.get('torch')}, "
        f"{m.get('threads')} threads, device {m.get('device')}; load average start {results.get('loadavg_start')}, "
        f"end {results.get('loadavg_end')}; total {results.get('total_s', 0):.0f} s.",
        "",
    ]
    if "matmul_gflops" in results:
        mm = results["matmul_gflops"]
        shape = results.get("matmul_shape", {})
        rates = ", ".join(f"{dt} {fmt(v)} GFLOP/s (m={shape.get(dt, {}).get('m')})" for dt, v in mm.items())
        lines += [
            f"Matmul rate, F.linear([m,1120], [4480,1120]) (int8 = dynamic quantized Linear), best of "
            f"{next(iter(shape.values()), {}).get('repeats')}: {rates}.",
            "",
        ]
    models = results.get("models", {})
    if models:
        lines += ["| preset | parameters | dim x depth (heads) |", "|---|---|---|"]
        for k, v in models.items():
            lines.append(f"| {k} | {v['parameters']:,} | {v['dim']} x {v['depth']} ({v['num_heads']}) |")
        lines.append("")
    ann = results.get("annotation", [])
    if ann:
        lines += [
            "| model | input | prompt words (mean) | mode | precision | batch | cells | cells/s | speed-up vs loop "
            "| GFLOP/cell | GFLOP/s | peak RSS (MB) | other processes' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            ann,
            key=lambda r: (
                r["preset"],
                _input_order(r["input"]),
                r["mode"] != "loop",
                r["precision"],
                r["batch_size"],
            ),
        ):
            mode = "official-style loop" if r["mode"] == "loop" else "msfm batched"
            prec = {"32": "fp32", "bf16": "bf16 autocast", "int8": "int8 dynamic"}[r["precision"]]
            lines.append(
                f"| {r['preset']} | {r['input']} | {r['mean_prompt_words']:.0f} | {mode} | {prec} | {r['batch_size']} "
                f"| {r['n_cells']} | {fmt(r['cells_per_s'])} | {fmt(r.get('speedup_vs_loop')) if r['mode'] != 'loop' else '1'} "
                f"| {fmt(r['gflop_per_cell'])} | {fmt(r['achieved_gflops'])} | {r['peak_rss_mb']:,.0f} "
                f"| {_others(r)} |"
            )
        lines.append("")
    agree = results.get("agreement", [])
    if agree:
        lines += [
            "| model | input | precision vs fp32 | cells | coarse identical | fine identical | embedding cosine min / mean |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in agree:
            lines.append(
                f"| {a['preset']} | {a['input']} | {a['precision']} | {a['n_cells']} | {a['coarse_identical']:.3f} "
                f"| {a['fine_identical']:.3f} | {a['embedding_cosine']['min']:.5f} / {a['embedding_cosine']['mean']:.5f} |"
            )
        lines.append("")
    summary = results.get("summary", {})
    phys = [
        (preset, inp, e)
        for preset, per_input in summary.items()
        if not preset.startswith("target")
        for inp, e in per_input.items()
        if "flop_ratio_loop_over_batched" in e
    ]
    if phys:
        lines += [
            "| model | input | loop FLOPs / batched FLOPs | batched fp32 rate / loop rate | best speed-up | "
            "bound at fp32 matmul rate | bound at int8 matmul rate |",
            "|---|---|---|---|---|---|---|",
        ]
        for preset, inp, e in phys:
            lines.append(
                f"| {preset} | {inp} | {fmt(e['flop_ratio_loop_over_batched'])} "
                f"| {fmt(e.get('rate_ratio_batched_over_loop_fp32'))} | {fmt(e.get('best_speedup'))} "
                f"| {fmt(e.get('ceiling_speedup_at_fp32_matmul_rate'))} "
                f"| {fmt(e.get('ceiling_speedup_at_int8_matmul_rate'))} |"
            )
        lines.append("")
    target = results.get("summary", {}).get("target_10x_at_368m")
    if target:
        best = ", ".join(f"{k}: {fmt(v)}x" for k, v in target["best_speedup_per_input"].items())
        fp32 = ", ".join(f"{k}: {fmt(v)}x" for k, v in target["fp32_speedup_per_input"].items())
        met = ", ".join(target["met_on_inputs"]) or "none"
        lines += [
            f"Target >= 10x the loop at 368M: best speed-up per input (any precision) {best}; fp32 only {fp32}; "
            f"met on: {met}.",
            "",
        ]
    gen = results.get("generation", [])
    if gen:
        lines += [
            "| model | KV cache | batch | new tokens (max) | tokens/s | ms/step | cache speed-up | identical tokens "
            "(uncached vs cached) | peak RSS (MB) | other processes' CPU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in sorted(gen, key=lambda g: (g["preset"], g["batch_size"], not g["use_cache"])):
            lines.append(
                f"| {g['preset']} | {'yes' if g['use_cache'] else 'no'} | {g['batch_size']} | {g['new_tokens']} "
                f"({g['max_new_tokens']}/cell) | {fmt(g['tokens_per_s'])} | {fmt(g['ms_per_step'])} "
                f"| {fmt(g.get('cache_speedup'))} | {fmt(g.get('identical_tokens_vs_cache'))} | {g['peak_rss_mb']:,.0f} "
                f"| {_others(g)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _main() -> None:
    args = json.loads(Path(sys.argv[1]).read_text())
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    print(json.dumps(_worker(args)))


if __name__ == "__main__":
    _main()
