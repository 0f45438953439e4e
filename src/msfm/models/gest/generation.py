"""Generation of expression at positions (paper §4.3): the decoding loop on tensors, the tiling of queries into
windows on arrays, and the ``generate`` verb on AnnData.

Known cells of a window form the context; each query cell is predicted from the context, the queries before it and
its own position, and its predicted meta-cell token is fed back as context for the next query (the paper does not
say which token is fed back; we feed the picked or sampled meta-cell, the training distribution).

Output modes:

* ``pick``: ``C_expr[argmax p]`` (the paper's "picking");
* ``weighted``: ``sum_c p(c) C_expr[c]`` (the paper's "GeST-W"); the fed-back token is still the argmax;
* ``sample``: a token drawn from ``softmax(logits / temperature)``, returned and fed back.

Queries are grouped into square tiles; each tile's window takes the known cells inside it as context, serialised
by the model's order, and the queries follow, nearest to the context first. Tiles with no known cell in their
window wait for a later round, when cells generated next to them count as known (the paper's iteration for regions
larger than a window).

Example:
    >>> import msfm
    >>> adata = msfm.datasets.scc_st()                                     # doctest: +SKIP
    >>> gen = msfm.gest.generate(adata, "run/model", query="held_out", mode="weighted",
    ...                          pre_normalized=True)                      # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import Tensor

from msfm.data.spatial import read_positions
from msfm.errors import MsfmInputError
from msfm.models.gest.checkpoint import CheckpointLike, generative_model, load, window_settings
from msfm.models.gest.data import cell_selection, spatial_cells
from msfm.models.gest.files import DataLike, read_data
from msfm.models.gest.model import Gest
from msfm.models.gest.options import GenerationOptions, Mode, split_options
from msfm.runtime.adata import store_uns
from msfm.runtime.h5ad import check_output, write_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.progress import progress_bar
from msfm.tokenizers.spatial import normalize_positions, serialize

__all__ = [
    "GenerationPlan",
    "GenerationResult",
    "generate",
    "generate_arrays",
    "generate_cells",
    "square_bounds",
]


@dataclass
class GenerationResult:
    """What :func:`generate_cells` returns for ``q`` query cells per window.

    Shape:
        - tokens: ``[b, q]`` meta-cell token chosen for each query (fed back as context)
        - expr: ``[b, q, T]`` generated expression (model space) in the requested mode
        - prob: ``[b, q]`` probability of the chosen token
        - hidden: ``[b, q, d]`` hidden state that produced each prediction
    """

    tokens: Tensor
    expr: Tensor
    prob: Tensor
    hidden: Tensor


def _choose(logits: Tensor, mode: Mode, temperature: float, generator: torch.Generator | None) -> Tensor:
    if mode == "sample":
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate_cells(
    model: Gest,
    context_pos: Tensor,
    context_tokens: Tensor,
    query_pos: Tensor,
    *,
    context_mask: Tensor | None = None,
    context_expr: Tensor | None = None,
    mode: Mode = "pick",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """Generate the cells at ``query_pos`` one after another, each conditioned on all cells before it.

    Args:
        model: the GeST model (eval mode is the caller's choice).
        context_pos: positions of the known cells (window-normalised), in serialised order.
        context_tokens: their meta-cell tokens.
        query_pos: positions to generate, in generation order.
        context_mask: True at real context cells; padding must be on the left (None: all real).
        context_expr: expression fed for the context cells instead of their meta-cell profiles (the continuous
            perturbation mode).
        mode: ``pick``, ``weighted`` or ``sample``.
        temperature: softmax temperature for ``sample``.
        generator: random generator for ``sample``.
        use_cache: reuse keys/values of earlier cells (False recomputes the whole sequence every step; same result,
            used to test the cache and to measure its speed-up).

    Returns:
        The generated tokens, expression, token probabilities and hidden states.

    Raises:
        ValueError: without any context cell (the first query would have nothing to attend from) or with bad
            shapes.

    Shape:
        - context_pos: ``[b, m, 2]``; context_tokens, context_mask: ``[b, m]``; context_expr: ``[b, m, T]``
        - query_pos: ``[b, q, 2]``
    """
    b, m = context_tokens.shape
    q = query_pos.shape[1]
    if m < 1:
        msg = "generate_cells needs at least one known context cell per window; got m=0."
        raise ValueError(msg)
    if temperature <= 0:
        msg = f"temperature must be > 0; got {temperature}."
        raise ValueError(msg)
    if mode not in ("pick", "weighted", "sample"):
        msg = f"mode must be 'pick', 'weighted' or 'sample'; got {mode!r}."
        raise ValueError(msg)
    if context_mask is not None and bool((~context_mask[:, -1]).any()):
        msg = "context_mask must be left-padded: the last context cell of every window must be real."
        raise ValueError(msg)
    device = context_pos.device
    table = model.metacell_expr
    tokens_out = torch.empty(b, q, dtype=torch.long, device=device)
    prob_out = torch.empty(b, q, device=device)
    expr_out = torch.empty(b, q, table.shape[1], device=device)
    hidden_out = torch.empty(b, q, model.config.dim, device=device)
    if q == 0:
        return GenerationResult(tokens_out, expr_out, prob_out, hidden_out)

    def record(step: int, out_logits: Tensor, out_hidden: Tensor) -> Tensor:
        choice = _choose(out_logits, mode, temperature, generator)
        probs = torch.softmax(out_logits.float(), dim=-1)
        tokens_out[:, step] = choice
        prob_out[:, step] = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        expr_out[:, step] = probs @ table.float() if mode == "weighted" else table[choice].float()
        hidden_out[:, step] = out_hidden.float()
        return choice

    ones = torch.ones(b, 1, dtype=torch.bool, device=device)
    mask = context_mask if context_mask is not None else torch.ones(b, m, dtype=torch.bool, device=device)
    if use_cache:
        cache = model.new_cache()
        # Prefill: context row i is paired with the position of cell i + 1 (the next context cell, or query 0).
        pairs = torch.cat([context_pos[:, 1:], query_pos[:, :1]], dim=1)
        # Heads only on the rows that predict something new (the prefill's last row, each step's row).
        out = model(
            pairs, context_pos, context_tokens, content_expr=context_expr, mask=mask, cache=cache, heads=False
        )
        last = out.hidden[:, -1]
        choice = record(0, model.decode(last)[1], last)
        for step in range(1, q):
            mask = torch.cat([mask, ones], dim=1)
            out = model(
                query_pos[:, step : step + 1],
                query_pos[:, step - 1 : step],
                choice.unsqueeze(1),
                mask=mask,
                cache=cache,
            )
            choice = record(step, out.logits[:, -1], out.hidden[:, -1])
        return GenerationResult(tokens_out, expr_out, prob_out, hidden_out)

    all_pos, all_tokens = context_pos, context_tokens
    all_expr = context_expr
    for step in range(q):
        pairs = torch.cat([all_pos[:, 1:], query_pos[:, step : step + 1]], dim=1)
        out = model(pairs, all_pos, all_tokens, content_expr=all_expr, mask=mask, heads=False)
        last = out.hidden[:, -1]
        choice = record(step, model.decode(last)[1], last)
        all_pos = torch.cat([all_pos, query_pos[:, step : step + 1]], dim=1)
        all_tokens = torch.cat([all_tokens, choice.unsqueeze(1)], dim=1)
        if all_expr is not None:
            all_expr = torch.cat([all_expr, table[choice].unsqueeze(1).to(all_expr)], dim=1)
        mask = torch.cat([mask, ones], dim=1)
    return GenerationResult(tokens_out, expr_out, prob_out, hidden_out)


UNS_KEY = "gest"


@dataclass
class GenerationPlan:
    """How the query positions were grouped into windows (for reports and tests).

    Attributes:
        tiles: per window ``(bounds, query indices in generation order, context indices)``; indices point into
            the combined known + query arrays of :func:`generate_arrays`.
        rounds: generation round of each window (windows of a later round use cells generated earlier as context).
    """

    tiles: list[tuple[tuple[float, float, float, float], np.ndarray, np.ndarray]]
    rounds: list[int]


def square_bounds(center: np.ndarray, side: float) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of the square of side ``side`` centred on ``center``."""
    h = side / 2.0
    return (float(center[0] - h), float(center[1] - h), float(center[0] + h), float(center[1] + h))


def _inside(xy: np.ndarray, bounds: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = bounds
    return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)


def _generation(generation: GenerationOptions | None, options: dict[str, Any]) -> GenerationOptions:
    """Generation options from an object plus keyword arguments (no reading options here)."""
    unknown = sorted(set(options) - set(GenerationOptions.model_fields))
    if unknown:
        msg = f"Unknown generation option(s) {unknown}; known: {sorted(GenerationOptions.model_fields)}."
        raise MsfmInputError(msg)
    gen, _ = split_options(options, verb_parameters=(), generation=generation)
    return gen


@torch.no_grad()
def generate_arrays(
    loaded: Loaded,
    known_xy: np.ndarray,
    known_tokens: np.ndarray,
    query_xy: np.ndarray,
    *,
    known_section: np.ndarray | None = None,
    query_section: np.ndarray | None = None,
    known_expr: np.ndarray | None = None,
    generation: GenerationOptions | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    **options: Any,
) -> tuple[dict[str, np.ndarray], GenerationPlan]:
    """Generate expression at ``query_xy`` from known cells, window by window (numpy in, numpy out).

    Query positions are grouped into square tiles (side ``tile_um``, default half the window). Each tile's window
    (side ``side_um``, centred on the tile) takes the known cells inside it as context (the ``max_context`` nearest
    to the centre), serialised by the model's order; the tile's queries follow, nearest to the context first, each
    predicted from everything before it. Tiles with no known cell in their window wait for a later round, when
    cells generated next to them count as known (the paper's iteration for regions larger than a window).

    Args:
        loaded: the model (:func:`msfm.gest.load`).
        known_xy, known_tokens: positions (µm) and meta-cell tokens of the known cells.
        query_xy: positions (µm) to generate.
        known_section, query_section: section codes (None: one section).
        known_expr: model-space expression fed for the known cells instead of their meta-cell profiles (the
            continuous perturbation mode; ``[n_known, T]``).
        generation: :class:`~msfm.models.gest.options.GenerationOptions`; ``**options`` (``mode=``,
            ``temperature=``, ``side_um=``, ``tile_um=``, ``max_context=``, ``use_cache=``) go on top of it.
        seed: seed of the serialisation jitter and sampling.
        batch_size: windows per forward pass.
        progress: show a progress bar over the generated cells.

    Returns:
        ``({"expr": [m, T], "tokens": [m], "prob": [m], "round": [m]}, plan)``.

    Raises:
        MsfmInputError: no known cell at all, or queries whose section has no known cell.
    """
    gen = _generation(generation, options)
    model, vocab = generative_model(loaded, "generate"), loaded.vocab
    win = window_settings(loaded)
    side = float(gen.side_um or win.side_um)
    tile = float(gen.tile_um or side / 2.0)
    max_ctx = int(gen.max_context or max(1, win.max_cells // 2))
    n_known, m = len(known_xy), len(query_xy)
    known_section = np.zeros(n_known, dtype=np.int64) if known_section is None else np.asarray(known_section)
    query_section = np.zeros(m, dtype=np.int64) if query_section is None else np.asarray(query_section)
    if n_known == 0:
        msg = "generation needs known cells as context; none were given (all cells are queries?)."
        raise MsfmInputError(msg)
    lonely = sorted(set(query_section.tolist()) - set(known_section.tolist()))
    if lonely:
        msg = f"queries in sections {lonely} have no known cell in their section; GeST generates from neighbours."
        raise MsfmInputError(msg)
    t_genes = vocab.n_genes
    out_expr = np.zeros((m, t_genes), dtype=np.float32)
    out_tok = np.full(m, -1, dtype=np.int64)
    out_prob = np.zeros(m, dtype=np.float32)
    out_round = np.full(m, -1, dtype=np.int64)

    # Combined arrays: known cells first, then queries (their tokens filled in as they are generated).
    xy = np.concatenate([known_xy, query_xy]).astype(np.float64)
    section = np.concatenate([known_section, query_section])
    tokens = np.concatenate([np.asarray(known_tokens, dtype=np.int64), out_tok])
    is_known = np.concatenate([np.ones(n_known, bool), np.zeros(m, bool)])
    table = vocab.centroids_expr
    expr_in = None
    if known_expr is not None:
        expr_in = np.concatenate(
            [np.asarray(known_expr, dtype=np.float32), np.zeros((m, t_genes), np.float32)]
        )

    # Tiles of queries per section.
    pending: list[tuple[tuple[float, float, float, float], np.ndarray]] = []
    for s in np.unique(query_section):
        q_idx = np.flatnonzero(query_section == s)
        origin = query_xy[q_idx].min(axis=0)
        key = np.floor((query_xy[q_idx] - origin) / tile).astype(np.int64)
        for cell in np.unique(key, axis=0):
            members = q_idx[(key == cell).all(axis=1)]
            center = origin + (cell + 0.5) * tile
            pending.append((square_bounds(center, side), n_known + members))
    plan = GenerationPlan(tiles=[], rounds=[])
    device = next(model.parameters()).device
    rng = torch.Generator(device=device.type if device.type != "mps" else "cpu").manual_seed(int(seed))
    max_q = max(1, win.max_cells - max_ctx)
    with progress_bar(m, "gest generate", enabled=progress) as bar:
        round_no = 0
        while pending:
            ready, waiting = [], []
            for bounds, members in pending:
                inside = np.flatnonzero(is_known & (section == section[members[0]]) & _inside(xy, bounds))
                (ready if inside.size else waiting).append((bounds, members, inside))
            if not ready:
                msg = (
                    f"{sum(len(p[1]) for p in pending)} query positions are farther than half a window "
                    f"({side / 2:.0f} µm) from every known or generated cell; pass side_um= larger or add context."
                )
                raise MsfmInputError(msg)
            jobs = []
            for bounds, members, inside in ready:
                center = np.array([(bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2])
                if inside.size > max_ctx:
                    d = np.linalg.norm(xy[inside] - center, axis=1)
                    inside = inside[np.sort(np.argsort(d, kind="stable")[:max_ctx])]
                rng = np.random.default_rng([int(seed), round_no, len(plan.tiles) + len(jobs)])
                ctx = inside[serialize(xy[inside], order=win.order, bounds=bounds, rng=rng)]
                # Queries nearest to the context first: the generated front grows out of the known cells.
                dq = np.min(np.linalg.norm(xy[members][:, None, :] - xy[ctx][None, :, :], axis=2), axis=1)
                order = members[np.lexsort((members, dq))]
                for start in range(0, order.size, max_q):
                    jobs.append((bounds, order[start : start + max_q], ctx))
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                _run_jobs(
                    model,
                    chunk,
                    xy,
                    tokens,
                    expr_in,
                    table,
                    gen,
                    rng,
                    device,
                    out=(out_expr, out_tok, out_prob),
                    n_known=n_known,
                )
                for bounds, q, ctx in chunk:
                    plan.tiles.append((bounds, q, ctx))
                    plan.rounds.append(round_no)
                    out_round[q - n_known] = round_no
                    bar.update(len(q))
            for _, members, _ in ready:
                tokens[members] = out_tok[members - n_known]
                is_known[members] = True
                if expr_in is not None:
                    expr_in[members] = table[out_tok[members - n_known]]
            pending = [(b, mem) for b, mem, _ in waiting]
            round_no += 1
    return {"expr": out_expr, "tokens": out_tok, "prob": out_prob, "round": out_round}, plan


def _run_jobs(
    model: Any,
    jobs: list[tuple[tuple[float, float, float, float], np.ndarray, np.ndarray]],
    xy: np.ndarray,
    tokens: np.ndarray,
    expr_in: np.ndarray | None,
    table: np.ndarray,
    gen: GenerationOptions,
    rng: torch.Generator,
    device: torch.device,
    *,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_known: int,
) -> None:
    b = len(jobs)
    m_ctx = max(len(c) for _, _, c in jobs)
    m_q = max(len(q) for _, q, _ in jobs)
    cpos = torch.zeros(b, m_ctx, 2)
    ctok = torch.zeros(b, m_ctx, dtype=torch.long)
    cmask = torch.zeros(b, m_ctx, dtype=torch.bool)
    qpos = torch.zeros(b, m_q, 2)
    cexpr = None if expr_in is None else torch.zeros(b, m_ctx, table.shape[1])
    for i, (bounds, q, ctx) in enumerate(jobs):
        k = len(ctx)
        # Left padding for the context (the cache appends on the right), right padding for the queries.
        cpos[i, m_ctx - k :] = torch.from_numpy(normalize_positions(xy[ctx], bounds))
        ctok[i, m_ctx - k :] = torch.from_numpy(tokens[ctx])
        cmask[i, m_ctx - k :] = True
        qpos[i, : len(q)] = torch.from_numpy(normalize_positions(xy[q], bounds))
        if cexpr is not None and expr_in is not None:
            cexpr[i, m_ctx - k :] = torch.from_numpy(expr_in[ctx])
    res = generate_cells(
        model,
        cpos.to(device),
        ctok.to(device),
        qpos.to(device),
        context_mask=cmask.to(device),
        context_expr=None if cexpr is None else cexpr.to(device),
        mode=gen.mode,
        temperature=gen.temperature,
        generator=rng,
        use_cache=gen.use_cache,
    )
    expr_o, tok_o, prob_o = out
    r_expr, r_tok, r_prob = res.expr.cpu().numpy(), res.tokens.cpu().numpy(), res.prob.cpu().numpy()
    for i, (_, q, _) in enumerate(jobs):
        rows = q - n_known
        expr_o[rows] = r_expr[i, : len(q)]
        tok_o[rows] = r_tok[i, : len(q)]
        prob_o[rows] = r_prob[i, : len(q)]


def _query_positions(
    positions: Any, positions_section: str | None, cells: Any
) -> tuple[np.ndarray, np.ndarray]:
    """New query coordinates (µm) and their section codes."""
    if isinstance(positions, str | os.PathLike):
        positions = read_positions(positions, what="positions")
    q_xy = np.asarray(positions, dtype=np.float64)
    if q_xy.ndim != 2 or q_xy.shape[1] != 2 or not np.isfinite(q_xy).all():
        msg = f"positions must be a finite [m, 2] array of coordinates; got shape {q_xy.shape}."
        raise MsfmInputError(msg)
    q_xy = q_xy * cells.coords.scale
    names = cells.coords.section_names
    if positions_section is not None:
        if positions_section not in names:
            msg = f"positions_section={positions_section!r} is not one of {names}."
            raise MsfmInputError(msg)
        code = names.index(positions_section)
    elif len(names) > 1:
        msg = f"The data has {len(names)} sections; say which one with positions_section=."
        raise MsfmInputError(msg)
    else:
        code = 0
    return q_xy, np.full(len(q_xy), code, dtype=np.int64)


def generate(
    data: DataLike,
    checkpoint: CheckpointLike,
    *,
    query: Any = None,
    positions: Any = None,
    positions_section: str | None = None,
    context: Any = None,
    generation: GenerationOptions | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> AnnData:
    """Generate expression at query positions from the known cells around them.

    Args:
        data: cells with ``obsm['spatial']`` and expression (AnnData, file or Visium folder); never modified.
        checkpoint: a GeST checkpoint (``RUN/model``, a ``TrainResult`` or a ``Loaded``).
        query: cells whose positions are generated (bool mask, boolean obs column, names or positions); their own
            expression is not used. Give ``query`` or ``positions``.
        positions: new coordinates (``[m, 2]``, same units as ``obsm['spatial']``, or a CSV/TSV file with ``x``
            and ``y`` columns) to generate at.
        positions_section: section of ``positions`` (with ``section_key`` and several sections).
        context: known cells (default: every cell that is not a query).
        generation: :class:`~msfm.models.gest.options.GenerationOptions` (``mode``, ``temperature``,
            ``side_um``, ``tile_um``, ``max_context``, ``use_cache``); the same names as keyword arguments go on
            top of it.
        seed: seed of serialisation and sampling.
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show a progress bar.
        out: also write the result to this ``.h5ad`` (atomically; never over the input).
        overwrite: replace an existing ``out``.
        **options: generation options (above) and reading options (:class:`msfm.data.SpatialReadOptions`:
            ``layer``, ``pre_normalized``, ``spatial_key``, ``scale``, ``section_key``, ``duplicates``, gene
            mapping).

    Returns:
        A new AnnData (queries x the model's genes) with the generated model-space expression in ``X``;
        ``obs['gest_token']``, ``obs['gest_token_prob']``, ``obs['gest_round']`` (generation round),
        ``obsm['spatial']`` (µm) and ``uns['gest']['generate']`` (parameters). Query cells keep their obs names.

    Raises:
        MsfmInputError: neither or both of ``query``/``positions``, overlapping query and context, no context,
            an unknown keyword.
    """
    gen, read = split_options(
        options,
        verb_parameters=("query", "positions", "positions_section", "context", "generation", "seed"),
        generation=generation,
    )
    if (query is None) == (positions is None):
        msg = "Give exactly one of query= (cells of the data to generate) or positions= (new coordinates)."
        raise MsfmInputError(msg)
    if positions_section is not None and positions is None:
        msg = "positions_section= goes with positions= (the section of the new coordinates)."
        raise MsfmInputError(msg)
    target = check_output(out, overwrite=overwrite, data=data)
    adata = read_data(data)
    loaded = load(checkpoint, device=device)
    generative_model(loaded, "generate")
    cells = spatial_cells(adata, loaded.vocab.genes, read)
    if query is not None:
        q_mask = cell_selection(adata, query, "query")
        if not q_mask.any():
            msg = "query selects no cell; pass a non-empty mask, column, names or positions."
            raise MsfmInputError(msg)
        q_xy, q_sec = cells.xy[q_mask], cells.section[q_mask]
        names = adata.obs_names[q_mask]
    else:
        q_xy, q_sec = _query_positions(positions, positions_section, cells)
        q_mask = np.zeros(adata.n_obs, dtype=bool)
        names = pd.Index([f"gest_{i}" for i in range(len(q_xy))])
    known = ~q_mask if context is None else cell_selection(adata, context, "context")
    if (known & q_mask).any():
        msg = f"{int((known & q_mask).sum())} cells are both query and context; a query's expression must be unknown."
        raise MsfmInputError(msg)
    k_idx = np.flatnonzero(known)
    k_tokens = loaded.vocab.assign(cells.expr[k_idx])
    res, plan = generate_arrays(
        loaded,
        cells.xy[k_idx],
        k_tokens,
        q_xy,
        known_section=cells.section[k_idx],
        query_section=q_sec,
        generation=gen,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    result = AnnData(
        X=res["expr"],
        obs=pd.DataFrame(
            {
                "gest_token": res["tokens"],
                "gest_token_prob": res["prob"],
                "gest_round": res["round"],
            },
            index=pd.Index(names.astype(str)),
        ),
        var=pd.DataFrame(index=pd.Index(loaded.vocab.genes)),
    )
    result.obsm["spatial"] = q_xy.astype(np.float64)
    if read.section_key is not None:
        result.obs[read.section_key] = pd.Categorical([cells.coords.section_names[s] for s in q_sec])
    result.uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 1.0}
    store_uns(
        result,
        UNS_KEY,
        "generate",
        {
            **gen.model_dump(),
            "side_um": float(gen.side_um or window_settings(loaded).side_um),
            "seed": seed,
            "n_context": int(k_idx.size),
            "n_windows": len(plan.tiles),
            "n_rounds": int(max(plan.rounds) + 1) if plan.rounds else 0,
            "expression": "model space (log1p CP10k of the model's genes)",
            "checkpoint": str(loaded.path) if loaded.path else None,
            "gene_mapping": cells.mapping_report,
        },
    )
    write_output(result, target, data, replace=overwrite)
    return result
