"""GeST tasks on AnnData: generate expression at positions, niche embeddings and niche clustering.

Checkpoints come from :func:`msfm.models.gest.train.train` (``RUN_DIR/model``). Every function validates the
coordinates and expression the same way training did, quantises known cells with the checkpoint's meta-cell
vocabulary and builds windows of the trained side.

Example:
    >>> import msfm
    >>> adata = msfm.datasets.scc_st()                                     # doctest: +SKIP
    >>> gen = msfm.gest.generate(adata, "run/model", query=adata.obs["held_out"].values,
    ...                          pre_normalized=True)                      # doctest: +SKIP
    >>> msfm.gest.embed(adata, "run/model", pre_normalized=True)           # obsm['X_gest']  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from msfm.errors import MsfmInputError
from msfm.models.gest.checkpoint import LoadedGest, load_model
from msfm.models.gest.data import SpatialCells, spatial_cells
from msfm.models.gest.generation import generate_cells
from msfm.tokenizers.spatial import normalize_positions, serialize

logger = logging.getLogger(__name__)

__all__ = [
    "GenerationPlan",
    "cell_selection",
    "cluster_niches",
    "embed",
    "generate",
    "generate_arrays",
    "niche_tensors",
    "niche_sequences",
]

Checkpoint = str | os.PathLike[str] | LoadedGest
Mode = Literal["pick", "weighted", "sample"]
UNS_KEY = "gest"


def cell_selection(adata: AnnData, cells: Any, what: str) -> np.ndarray:
    """A boolean mask over ``adata.obs`` from a mask, an obs column, obs names or integer positions.

    Raises:
        MsfmInputError: unknown names/column, wrong length, or positions out of range.
    """
    n = adata.n_obs
    if isinstance(cells, str):
        if cells not in adata.obs:
            msg = f"{what}={cells!r} is not an obs column; columns are {list(adata.obs.columns)[:20]}."
            raise MsfmInputError(msg)
        cells = adata.obs[cells].to_numpy()
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n,):
            msg = f"{what} as a boolean mask must have length n_obs={n}; got shape {arr.shape}."
            raise MsfmInputError(msg)
        return arr.copy()
    mask = np.zeros(n, dtype=bool)
    if arr.size == 0:
        return mask
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() >= n:
            msg = f"{what} positions must lie in [0, {n}); got {arr.min()}..{arr.max()}."
            raise MsfmInputError(msg)
        mask[arr] = True
        return mask
    names = pd.Index(adata.obs_names)
    pos = names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        missing = arr[pos < 0][:5].tolist()
        msg = f"{what} names {missing} are not in adata.obs_names ({(pos < 0).sum()} unknown)."
        raise MsfmInputError(msg)
    mask[pos] = True
    return mask


def prepare_cells(loaded: LoadedGest, adata: AnnData, read: dict[str, Any]) -> SpatialCells:
    """Validate ``adata`` and express it over the checkpoint's genes (``read``: see :func:`read_options`)."""
    return spatial_cells(adata, loaded.vocab.genes, **read)


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


@torch.no_grad()
def generate_arrays(
    loaded: LoadedGest,
    known_xy: np.ndarray,
    known_tokens: np.ndarray,
    query_xy: np.ndarray,
    *,
    known_section: np.ndarray | None = None,
    query_section: np.ndarray | None = None,
    known_expr: np.ndarray | None = None,
    mode: Mode = "pick",
    temperature: float = 1.0,
    seed: int = 0,
    side_um: float | None = None,
    tile_um: float | None = None,
    max_context: int | None = None,
    batch_size: int = 16,
    use_cache: bool = True,
) -> tuple[dict[str, np.ndarray], GenerationPlan]:
    """Generate expression at ``query_xy`` from known cells, window by window (numpy in, numpy out).

    Query positions are grouped into square tiles (side ``tile_um``, default half the window). Each tile's window
    (side ``side_um``, centred on the tile) takes the known cells inside it as context (the ``max_context`` nearest
    to the centre), serialised by the model's order; the tile's queries follow, nearest to the context first, each
    predicted from everything before it. Tiles with no known cell in their window wait for a later round, when
    cells generated next to them count as known (the paper's iteration for regions larger than a window).

    Args:
        loaded: the model.
        known_xy, known_tokens: positions (µm) and meta-cell tokens of the known cells.
        query_xy: positions (µm) to generate.
        known_section, query_section: section codes (None: one section).
        known_expr: model-space expression fed for the known cells instead of their meta-cell profiles (the
            continuous perturbation mode; ``[n_known, T]``).
        mode: ``pick``, ``weighted`` or ``sample``.
        temperature: sampling temperature.
        seed: seed of the serialisation jitter and sampling.
        side_um: window side (default: the trained side).
        tile_um: query tile side (default: half the window side).
        max_context: context cells per window (default: half the trained ``max_cells``).
        batch_size: windows per forward pass.
        use_cache: KV-cached decoding (False: recompute everything at each step; same result, slower).

    Returns:
        ``({"expr": [m, T], "tokens": [m], "prob": [m], "round": [m]}, plan)``.

    Raises:
        MsfmInputError: no known cell at all, or queries whose section has no known cell.
    """
    model, vocab = loaded.model, loaded.vocab
    side = float(side_um or loaded.side_um)
    tile = float(tile_um or side / 2.0)
    max_ctx = int(max_context or max(1, int(loaded.window.get("max_cells", 1024)) // 2))
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
    gen = torch.Generator(device=device.type if device.type != "mps" else "cpu").manual_seed(int(seed))
    max_q = max(1, int(loaded.window.get("max_cells", 1024)) - max_ctx)
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
            ctx = inside[
                serialize(
                    xy[inside], order=loaded.window.get("order", "corner_sweep"), bounds=bounds, rng=rng
                )
            ]
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
                mode,
                temperature,
                gen,
                use_cache,
                device,
                out=(out_expr, out_tok, out_prob),
                n_known=n_known,
            )
            for bounds, q, ctx in chunk:
                plan.tiles.append((bounds, q, ctx))
                plan.rounds.append(round_no)
                out_round[q - n_known] = round_no
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
    mode: Mode,
    temperature: float,
    gen: torch.Generator,
    use_cache: bool,
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
        mode=mode,
        temperature=temperature,
        generator=gen,
        use_cache=use_cache,
    )
    expr_o, tok_o, prob_o = out
    r_expr, r_tok, r_prob = res.expr.cpu().numpy(), res.tokens.cpu().numpy(), res.prob.cpu().numpy()
    for i, (_, q, _) in enumerate(jobs):
        rows = q - n_known
        expr_o[rows] = r_expr[i, : len(q)]
        tok_o[rows] = r_tok[i, : len(q)]
        prob_o[rows] = r_prob[i, : len(q)]


def read_options(
    layer: str | None,
    pre_normalized: bool,
    spatial_key: str,
    scale: float | None,
    section_key: str | None,
    duplicates: str,
) -> dict[str, Any]:
    """The keyword arguments of :func:`msfm.models.gest.data.spatial_cells` every task passes through."""
    return {
        "layer": layer,
        "pre_normalized": pre_normalized,
        "spatial_key": spatial_key,
        "scale": scale,
        "section_key": section_key,
        "duplicates": duplicates,
    }


def generate(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    query: Any = None,
    positions: np.ndarray | None = None,
    positions_section: str | None = None,
    context: Any = None,
    mode: Mode = "pick",
    temperature: float = 1.0,
    seed: int = 0,
    side_um: float | None = None,
    max_context: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    use_cache: bool = True,
    layer: str | None = None,
    pre_normalized: bool = False,
    spatial_key: str = "spatial",
    scale: float | None = None,
    section_key: str | None = None,
    duplicates: str = "error",
) -> AnnData:
    """Generate expression at query positions from the known cells around them.

    Args:
        adata: cells with ``obsm['spatial']`` and expression; never modified.
        checkpoint: an msfm GeST checkpoint directory (or a loaded one).
        query: cells whose positions are generated (bool mask, obs column, names or positions); their own
            expression is not used. Give ``query`` or ``positions``.
        positions: new coordinates (``[m, 2]``, same units as ``obsm['spatial']``) to generate at.
        positions_section: section of ``positions`` (with ``section_key``).
        context: known cells (default: every cell that is not a query).
        mode: ``pick`` (meta-cell profile of the most likely token), ``weighted`` (probability-weighted profile) or
            ``sample``.
        temperature: softmax temperature of ``sample``.
        seed: seed of serialisation and sampling.
        side_um: window side (default: the trained side).
        max_context: known cells per window (default: half the trained ``max_cells``).
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        use_cache: KV-cached decoding.
        layer, pre_normalized, spatial_key, scale, section_key, duplicates: how to read ``adata``.

    Returns:
        A new AnnData (queries x the model's genes) with the generated model-space expression in ``X``;
        ``obs['gest_token']``, ``obs['gest_token_prob']``, ``obs['gest_round']`` (generation round),
        ``obsm['spatial']`` (µm) and ``uns['gest']`` (parameters). Query cells keep their obs names.

    Raises:
        MsfmInputError: neither or both of ``query``/``positions``, overlapping query and context, no context.
    """
    if (query is None) == (positions is None):
        msg = "Give exactly one of query= (cells of adata to generate) or positions= (new coordinates)."
        raise MsfmInputError(msg)
    loaded = load_model(checkpoint, device=device)
    read = read_options(layer, pre_normalized, spatial_key, scale, section_key, duplicates)
    cells = prepare_cells(loaded, adata, read)
    if query is not None:
        q_mask = cell_selection(adata, query, "query")
        if not q_mask.any():
            msg = "query selects no cell; pass a non-empty mask, column, names or positions."
            raise MsfmInputError(msg)
        q_xy, q_sec = cells.xy[q_mask], cells.section[q_mask]
        names = adata.obs_names[q_mask]
    else:
        q_xy = np.asarray(positions, dtype=np.float64)
        if q_xy.ndim != 2 or q_xy.shape[1] != 2 or not np.isfinite(q_xy).all():
            msg = f"positions must be a finite [m, 2] array of coordinates; got shape {q_xy.shape}."
            raise MsfmInputError(msg)
        q_xy = q_xy * cells.coords.scale
        if positions_section is not None:
            if positions_section not in cells.coords.section_names:
                msg = f"positions_section={positions_section!r} is not one of {cells.coords.section_names}."
                raise MsfmInputError(msg)
            code = cells.coords.section_names.index(positions_section)
        elif len(cells.coords.section_names) > 1:
            msg = f"adata has {len(cells.coords.section_names)} sections; say which one with positions_section=."
            raise MsfmInputError(msg)
        else:
            code = 0
        q_sec = np.full(len(q_xy), code, dtype=np.int64)
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
        mode=mode,
        temperature=temperature,
        seed=seed,
        side_um=side_um,
        max_context=max_context,
        batch_size=batch_size,
        use_cache=use_cache,
    )
    out = AnnData(
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
    out.obsm["spatial"] = q_xy.astype(np.float64)
    if section_key is not None:
        out.obs[section_key] = pd.Categorical([cells.coords.section_names[s] for s in q_sec])
    out.uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 1.0}
    out.uns[UNS_KEY] = {
        "task": "generate",
        "mode": mode,
        "temperature": temperature,
        "seed": seed,
        "side_um": float(side_um or loaded.side_um),
        "n_context": int(k_idx.size),
        "n_windows": len(plan.tiles),
        "n_rounds": int(max(plan.rounds) + 1) if plan.rounds else 0,
        "expression": "model space (log1p CP10k of the model's genes)",
        "checkpoint": str(loaded.path) if loaded.path else None,
    }
    return out


def niche_sequences(
    xy: np.ndarray,
    section: np.ndarray,
    centers: np.ndarray,
    *,
    side_um: float,
    max_cells: int,
) -> list[np.ndarray]:
    """Neighbourhood of every centre cell: itself first, then its neighbours by distance.

    The neighbours are the cells of the same section inside the square window of side ``side_um`` centred on the
    cell, the ``max_cells - 1`` nearest if there are more.

    Returns:
        One index array per centre (``[0]`` is the centre).
    """
    from scipy.spatial import cKDTree

    out: list[np.ndarray] = []
    half = side_um / 2.0
    for s in np.unique(section[centers]):
        in_s = np.flatnonzero(section == s)
        tree = cKDTree(xy[in_s])
        for c in centers[section[centers] == s]:
            # Chebyshev radius = half the side: exactly the square window.
            nb = in_s[tree.query_ball_point(xy[c], r=half, p=np.inf)]
            nb = nb[nb != c]
            d = np.linalg.norm(xy[nb] - xy[c], axis=1)
            order = np.lexsort((nb, d))[: max_cells - 1]
            out.append(np.concatenate([[c], nb[order]]).astype(np.int64))
    # Restore the order of ``centers``.
    firsts = np.array([o[0] for o in out])
    where = {int(c): i for i, c in enumerate(firsts)}
    return [out[where[int(c)]] for c in centers]


def niche_tensors(
    xy: np.ndarray, tokens: np.ndarray, seqs: list[np.ndarray], side_um: float
) -> dict[str, torch.Tensor]:
    """Left-padded niche sequences for :class:`~msfm.models.gest.model.Gest`.

    Content rows are ``[centre, n1..n_{N-1}]`` and queries ``[n1..n_{N-1}, centre]``: the last row predicts the centre
    from every cell of the niche, and its hidden state is the niche embedding (paper §4.4). Positions are
    normalised to the window of side ``side_um`` centred on the cell.

    Returns:
        ``query_pos``, ``content_pos`` ``[b, N, 2]``, ``tokens`` ``[b, N]`` and ``mask`` ``[b, N]`` (True = real).
    """
    n_max = max(len(s) for s in seqs)
    b = len(seqs)
    qpos = torch.zeros(b, n_max, 2)
    cpos = torch.zeros(b, n_max, 2)
    tok = torch.zeros(b, n_max, dtype=torch.long)
    mask = torch.zeros(b, n_max, dtype=torch.bool)
    for i, seq in enumerate(seqs):
        n = len(seq)
        p = torch.from_numpy(normalize_positions(xy[seq], square_bounds(xy[seq[0]], side_um)))
        cpos[i, n_max - n :] = p
        qpos[i, n_max - n :] = torch.cat([p[1:], p[:1]])
        tok[i, n_max - n :] = torch.from_numpy(tokens[seq])
        mask[i, n_max - n :] = True
    return {"query_pos": qpos, "content_pos": cpos, "tokens": tok, "mask": mask}


@torch.no_grad()
def _niche_hidden(
    loaded: LoadedGest,
    xy: np.ndarray,
    tokens: np.ndarray,
    seqs: list[np.ndarray],
    *,
    side_um: float,
    batch_size: int,
) -> np.ndarray:
    model = loaded.model
    device = next(model.parameters()).device
    out = np.zeros((len(seqs), model.config.dim), dtype=np.float32)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        b = len(chunk)
        batch = niche_tensors(xy, tokens, chunk, side_um)
        res = model(
            batch["query_pos"].to(device),
            batch["content_pos"].to(device),
            batch["tokens"].to(device),
            mask=batch["mask"].to(device),
            heads=False,
        )
        out[start : start + b] = res.hidden[:, -1].float().cpu().numpy()
    return out


def embed(
    adata: AnnData,
    checkpoint: Checkpoint,
    *,
    cells: Any = None,
    side_um: float | None = None,
    max_cells: int = 256,
    batch_size: int = 64,
    device: str = "auto",
    key_added: str = "X_gest",
    layer: str | None = None,
    pre_normalized: bool = False,
    spatial_key: str = "spatial",
    scale: float | None = None,
    section_key: str | None = None,
    duplicates: str = "error",
    copy: bool = False,
) -> AnnData | None:
    """Zero-shot niche embeddings: the hidden state that predicts each cell from its whole neighbourhood.

    Args:
        adata: cells with coordinates and expression.
        checkpoint: an msfm GeST checkpoint.
        cells: cells to embed (default all; the others still serve as neighbours, their rows are NaN).
        side_um: neighbourhood window side (default: the trained side).
        max_cells: cells per niche sequence, the centre included.
        batch_size: niches per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        key_added: ``obsm`` key (``uns[key_added]`` holds the parameters).
        layer, pre_normalized, spatial_key, scale, section_key, duplicates: how to read ``adata``.
        copy: return a modified copy instead of writing into ``adata``.

    Returns:
        The AnnData when ``copy=True``, else None. ``obsm[key_added]`` is ``[n_obs, d]`` float32 and
        ``obs['gest_n_neighbours']`` counts the neighbours each niche used (0: an isolated cell, embedded from
        itself alone).
    """
    if max_cells < 1:
        msg = f"max_cells must be >= 1 (the centre cell); got {max_cells}."
        raise MsfmInputError(msg)
    adata = adata.copy() if copy else adata
    loaded = load_model(checkpoint, device=device)
    prep = prepare_cells(
        loaded, adata, read_options(layer, pre_normalized, spatial_key, scale, section_key, duplicates)
    )
    tokens = loaded.vocab.assign(prep.expr)
    centers = (
        np.flatnonzero(cell_selection(adata, cells, "cells")) if cells is not None else np.arange(adata.n_obs)
    )
    side = float(side_um or loaded.side_um)
    seqs = niche_sequences(prep.xy, prep.section, centers, side_um=side, max_cells=max_cells)
    hidden = _niche_hidden(loaded, prep.xy, tokens, seqs, side_um=side, batch_size=batch_size)
    emb = np.full((adata.n_obs, hidden.shape[1]), np.nan, dtype=np.float32)
    emb[centers] = hidden
    n_nb = np.zeros(adata.n_obs, dtype=np.int64)
    n_nb[centers] = [len(s) - 1 for s in seqs]
    adata.obsm[key_added] = emb
    adata.obs["gest_n_neighbours"] = n_nb
    adata.obs["gest_token"] = tokens
    adata.uns[key_added] = {
        "task": "embed",
        "side_um": side,
        "max_cells": max_cells,
        "n_embedded": int(centers.size),
        "checkpoint": str(loaded.path) if loaded.path else None,
    }
    if (n_nb[centers] == 0).any():
        logger.warning(
            "%d cells have no neighbour within %.0f µm; their niche embedding comes from the cell alone.",
            int((n_nb[centers] == 0).sum()),
            side / 2,
        )
    return adata if copy else None


def cluster_niches(
    adata: AnnData,
    *,
    use_rep: str = "X_gest",
    method: Literal["kmeans", "leiden"] = "kmeans",
    n_clusters: int | None = None,
    resolution: float = 1.0,
    seed: int = 0,
    key_added: str = "gest_niche",
) -> None:
    """Cluster niche embeddings into ``obs[key_added]`` (categorical).

    Args:
        adata: with ``obsm[use_rep]``.
        use_rep: the embedding.
        method: ``kmeans`` (needs ``n_clusters``) or ``leiden`` (scanpy; ``resolution``).
        n_clusters: number of k-means clusters.
        resolution: Leiden resolution.
        seed: random state.
        key_added: obs column.

    Raises:
        MsfmInputError: missing embedding, NaN rows, or k-means without ``n_clusters``.
    """
    if use_rep not in adata.obsm:
        msg = f"obsm[{use_rep!r}] is missing; run msfm.gest.embed first (obsm keys: {list(adata.obsm)})."
        raise MsfmInputError(msg)
    x = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if not np.isfinite(x).all():
        msg = f"obsm[{use_rep!r}] has NaN rows (cells not embedded); embed all cells before clustering."
        raise MsfmInputError(msg)
    if method == "kmeans":
        if not n_clusters or n_clusters < 2:
            msg = f"method='kmeans' needs n_clusters >= 2; got {n_clusters}."
            raise MsfmInputError(msg)
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    elif method == "leiden":
        import scanpy as sc

        tmp = AnnData(X=np.zeros((adata.n_obs, 1), np.float32))
        tmp.obsm["rep"] = x
        sc.pp.neighbors(tmp, use_rep="rep", random_state=seed)
        sc.tl.leiden(
            tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False
        )
        labels = tmp.obs["leiden"].astype(int).to_numpy()
    else:
        msg = f"method must be 'kmeans' or 'leiden'; got {method!r}."
        raise MsfmInputError(msg)
    adata.obs[key_added] = pd.Categorical([str(v) for v in labels])
    adata.uns[key_added] = {
        "method": method,
        "use_rep": use_rep,
        "n_clusters": len(set(labels.tolist())),
    }
