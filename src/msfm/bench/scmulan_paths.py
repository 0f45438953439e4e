"""scMulan benchmark pieces: FLOP counts, matmul rates, the inputs, and the two annotation paths that are timed.

* :func:`resampled_cells`: cells resampled from real PBMC count profiles at a chosen prompt length;
* :func:`official_style_loop`: one cell at a time, as the release runs (re-implemented, not copied);
* :func:`msfm_annotate_batched`: the batched, cached, constrained decode of ``msfm.scmulan.predict``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

__all__ = [
    "AnnotationResult",
    "forward_flops",
    "matmul_rate",
    "msfm_annotate_batched",
    "official_style_loop",
    "resampled_cells",
]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
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
        lin = quantize(nn.Sequential(nn.Linear(k, n, bias=False)))[0]

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


def quantize(model: nn.Module) -> tuple[nn.Module, int]:
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


def real_cells(n_cells: int):
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
    """Batched, cached, constrained annotation (the decode of ``msfm.scmulan.predict``).

    Cells are read, normalised and tokenised chunk by chunk, sorted by prompt length into left-padded batches
    of ``batch_size`` and decoded with :func:`~msfm.models.scmulan.decoding.generate_tokens`: one prefill with
    a KV cache, the coarse type from the coarse set, one cached step, the fine type from the fine set. The
    embedding is the hidden state at the coarse-type word once fed back (``hidden[:, 0]``).

    Args:
        loaded: a scMulan :class:`~msfm.runtime.loaded.Loaded`.
        source: the :class:`~msfm.data.CellSource` of the cells.
        mapping: its genes mapped onto the vocabulary's.
        batch_size: cells per batch.
        precision: ``"32"``, ``"bf16"`` (autocast) or ``"int8"`` (the model already quantized; fp32 autocast).
    """
    from msfm.models.scmulan.batches import iter_prompt_batches
    from msfm.models.scmulan.decoding import DecodeOptions, generate_tokens, id_mask
    from msfm.models.scmulan.loading import tokenizer_for
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
            source, mapping, tokenizer_for(loaded), task=ANNOTATE, batch_size=batch_size
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
