"""In-silico perturbation: ``perturb`` (genes forced to levels, scored) and ``perturb_screen`` (many genes, ranked).

For every ``(gene, level)`` the word ``(gene, level)`` is placed right after ``<SPToken1>`` (as if the model had
written it first) and cells are generated from the prompt; control cells come from the unperturbed prompt. The
scores compare centroids in the binned space and, with a reference of real cells, in its PCA
(:mod:`.reference`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.data import as_anndata
from msfm.errors import MsfmInputError
from msfm.models.scmulan.decoding import USER_OPTIONS, DecodeOptions
from msfm.models.scmulan.generation import DEFAULTS, decoding_params
from msfm.models.scmulan.loading import FAMILY, Checkpoint, load, tokenizer_for
from msfm.models.scmulan.prompts import Prompts, meta_obs, prompt_records
from msfm.models.scmulan.reference import Reference, reference_pca
from msfm.models.scmulan.sampling import cells_anndata, gene_end_mask, generate_sentences, resolve_length
from msfm.models.scmulan.verb_io import check_positive, record, split_options
from msfm.runtime.adata import store_uns
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import Result
from msfm.tokenizers.cell_sentence import GENERATE, CellSentenceVocab, Sentences

__all__ = ["ScMulanPerturbation", "ScMulanScreen", "perturb", "perturb_screen"]


@dataclass(frozen=True)
class ScMulanPerturbation(Result):
    """What :func:`perturb` returns; ``save(dir)`` writes ``cells.h5ad`` and ``scores.csv``.

    Attributes:
        cells: every generated cell (control first), as :func:`msfm.scmulan.generate` returns them, with
            ``obs["condition"]`` (``"control"`` or ``"GENE@LEVEL"``), ``obs["gene"]``, ``obs["level"]`` (-1 for the
            control) and, with a reference, ``obsm["X_reference_pca"]``; ``uns["scmulan"]["perturb"]`` records
            the run.
        scores: one row per condition (control first): ``gene``, ``level``, ``n_cells``, ``n_genes_mean``,
            ``delta_vs_control`` (L2 norm of the mean change in the binned gene space), ``top_changed``, and with a
            reference ``shift_norm``, ``shift_vs_control`` and per target ``score_<T>``, ``projection_<T>``,
            ``score_<T>_vs_control``.
    """

    cells: AnnData
    scores: pd.DataFrame


@dataclass(frozen=True)
class ScMulanScreen(Result):
    """What :func:`perturb_screen` returns; ``save(dir)`` writes ``scores.csv`` and ``result.json``.

    Attributes:
        scores: the :class:`ScMulanPerturbation` scores, perturbed genes sorted by ``sort_by`` (largest first),
            the control row last.
        sort_by: the score column the genes are ranked by.
    """

    scores: pd.DataFrame
    sort_by: str


def check_genes(vocab: CellSentenceVocab, genes: str | Sequence[str]) -> list[str]:
    genes = [g.strip() for g in genes.split(",")] if isinstance(genes, str) else [str(g) for g in genes]
    genes = [g for g in genes if g]
    if not genes:
        msg = "genes is empty; name at least one gene of the checkpoint's vocabulary, e.g. 'SPI1'."
        raise MsfmInputError(msg)
    known = set(vocab.genes)
    unknown = [g for g in genes if g not in known]
    if unknown:
        hints = {g: difflib.get_close_matches(g, vocab.genes, n=3, cutoff=0.7) for g in unknown[:5]}
        hint = "; ".join(f"{g}: did you mean {h}?" for g, h in hints.items() if h)
        msg = (
            f"{len(unknown)} gene(s) are not gene words of this checkpoint ({len(vocab.genes)} genes): {unknown[:10]}. "
            f"Only vocabulary genes can be perturbed.{' ' + hint if hint else ''}"
        )
        raise MsfmInputError(msg)
    if len(set(genes)) != len(genes):
        msg = f"genes lists some genes twice: {sorted({g for g in genes if genes.count(g) > 1})}."
        raise MsfmInputError(msg)
    return genes


def check_levels(levels: Iterable[int], n_levels: int) -> list[int]:
    out = []
    for lv in levels:
        if isinstance(lv, bool) or not isinstance(lv, int | np.integer) or not 0 <= int(lv) <= n_levels:
            msg = f"levels must be integers in 0..{n_levels} (0 = not expressed, {n_levels} = the cell's maximum); got {lv!r}."
            raise MsfmInputError(msg)
        out.append(int(lv))
    if not out:
        msg = "levels is empty; give at least one level, e.g. [0, 5, 10]."
        raise MsfmInputError(msg)
    return out


def top_changed(delta: np.ndarray, genes: Sequence[str], exclude: str | None, n_top: int) -> str:
    order = np.argsort(-np.abs(delta), kind="stable")
    parts = []
    for j in order:
        if len(parts) >= n_top or delta[j] == 0:
            break
        if genes[j] == exclude:
            continue
        parts.append(f"{genes[j]}:{delta[j]:+.3f}")
    return "; ".join(parts)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def perturb(
    data: Prompts,
    checkpoint: Checkpoint,
    *,
    genes: str | Sequence[str],
    levels: Iterable[int] = range(0, 11),
    n_cells: int = 50,
    reference: AnnData | str | os.PathLike[str] | None = None,
    group_key: str | None = None,
    source: str | None = None,
    targets: Sequence[str] | None = None,
    n_pcs: int = 10,
    n_top_genes: int = 5,
    decoding: DecodeOptions | None = None,
    device: str = "auto",
    batch_size: int = 64,
    max_tokens: int | None = 32768,
    progress: bool = True,
    **options: Any,
) -> ScMulanPerturbation:
    """In-silico perturbation: generate cells with one gene forced to a level, and score the shift.

    For every ``(gene, level)`` the word ``(gene, level)`` is placed right after ``<SPToken1>`` and ``n_cells``
    cells are generated; ``n_cells`` control cells come from the unperturbed prompt. Cell ``k`` of every
    condition uses the same random stream (common random numbers), so differences between conditions are not
    sampling noise of different streams. Level 0 means "not expressed" (a knock-out); the forced gene is part of
    the generated cell, as in the release's notebooks.

    Scores (the release's haematopoiesis case): with a ``reference`` of real cells, a PCA (``n_pcs``) is fitted
    on them in the binned space. Centroids are compared in PC space: ``s = centroid(generated) -
    centroid(reference source group)`` (all reference cells without ``source``), and for each target group ``T``
    with direction ``d_T = centroid(T) - centroid(source)``: ``score_T = cos(s, d_T)``, ``projection_T = s . d_T /
    |d_T|`` and ``score_T_vs_control`` = cos of the shift from the control centroid. Without a reference only the
    gene-space comparison with the control is reported. Cost: ``(len(genes) * len(levels) + 1) * n_cells``
    generated cells.

    Args:
        data: the start state, one prompt: ``{"organ": "Bone marrow", "cell_type": "Haematopoietic stem cell"}``
            or ``"organ=Bone marrow,cell_type=Haematopoietic stem cell"``.
        checkpoint: msfm checkpoint directory, a ``TrainResult`` or a ``Loaded``.
        genes: vocabulary genes to perturb (a list, or a comma-separated string).
        levels: levels to force, integers in ``0..n_levels``.
        n_cells: cells per condition (and for the control).
        reference: real cells (an AnnData or its file; raw counts, or ``pre_normalized=True``) defining the PCA
            space and the groups; read with the reading options in ``options``.
        group_key: ``reference.obs`` column with the groups; ``source``: start group (e.g. ``"HSC"``);
            ``targets``: direction groups (e.g. ``["MEP", "LMPP"]``).
        n_top_genes: genes listed in ``top_changed`` (largest mean change vs control, the forced gene left out).
        decoding: decoding options as in :func:`msfm.scmulan.generate` (also as keyword arguments).
        options: decoding options and reading options (:class:`~msfm.data.CellReadOptions`) of the reference.

    Returns:
        A :class:`ScMulanPerturbation` (``.cells``, ``.scores``; ``.save(dir)``).
    """
    opts, read = split_options(perturb, options, decode=USER_OPTIONS, defaults=DEFAULTS, base=decoding)
    prompt = _one_prompt(data)
    n_cells = check_positive(n_cells, "n_cells")
    batch_size = check_positive(batch_size, "batch_size")
    if reference is None and (group_key is not None or source is not None or targets):
        msg = "group_key=, source= and targets= need a reference= AnnData of real cells."
        raise MsfmInputError(msg)
    loaded = load(checkpoint, device=device)
    vocab = loaded.vocab
    gene_list = check_genes(vocab, genes)
    level_list = check_levels(levels, loaded.config.n_levels)
    base_ids, base_levels = tokenizer_for(loaded).prompts(None, meta=prompt, task=GENERATE).get(0)
    ref = None
    if reference is not None:
        ref = reference_pca(
            as_anndata(reference),
            loaded,
            group_key=group_key,
            source=source,
            targets=targets,
            n_pcs=n_pcs,
            read=read,
        )
    conditions: list[tuple[str | None, int]] = [(None, -1)] + [
        (g, lv) for g in gene_list for lv in level_list
    ]
    cells, opts = _generate_conditions(
        loaded, prompt, base_ids, base_levels, conditions, n_cells, opts, batch_size, max_tokens, progress
    )
    scores = _scores(cells, conditions, n_cells, ref, vocab.genes, int(n_top_genes))
    params = {
        "prompt": {str(k): v for k, v in prompt.items()},
        "genes": gene_list,
        "levels": level_list,
        "n_cells": n_cells,
        **decoding_params(opts, USER_OPTIONS),
        "reference_cells": 0 if ref is None else ref.n_cells,
        "group_key": group_key,
        "source": source,
        "targets": list(targets or []),
        "n_pcs": 0 if ref is None else int(ref.components.shape[0]),
    }
    store_uns(cells, FAMILY, "perturb", record(loaded, params, None if ref is None else ref.mapping))
    return ScMulanPerturbation(cells=cells, scores=scores)


def _one_prompt(data: Prompts) -> dict[str, Any]:
    records = prompt_records(data)
    if len(records) != 1:
        msg = f"perturb starts from one prompt (a dict of category -> value); got {len(records)} prompts."
        raise MsfmInputError(msg)
    return records[0]


def _generate_conditions(
    loaded: Loaded,
    prompt: Mapping[str, Any],
    base_ids: np.ndarray,
    base_levels: np.ndarray,
    conditions: list[tuple[str | None, int]],
    n_cells: int,
    opts: DecodeOptions,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
) -> tuple[AnnData, DecodeOptions]:
    """``n_cells`` generated cells per condition (control first); cell ``k`` of every condition uses stream ``k``."""
    vocab = loaded.vocab
    ids_list, lv_list, streams = [], [], []
    for gene, lv in conditions:
        prefix_ids = [] if gene is None else [vocab.id(gene)]
        prefix_lv = [] if gene is None else [lv]
        for k in range(n_cells):
            ids_list.append(np.concatenate([base_ids, prefix_ids]).astype(np.int64))
            lv_list.append(np.concatenate([base_levels, prefix_lv]).astype(np.int64))
            streams.append((k,))
    sentences = Sentences.from_lists(ids_list, lv_list)
    opts = resolve_length(loaded, opts, prompt_len=int(sentences.lengths().max()))
    gen = generate_sentences(
        loaded,
        sentences,
        streams,
        options=opts,
        allowed=gene_end_mask(loaded) if opts.constrained else None,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc="scMulan perturb",
    )
    # The forced word is part of the generated cell (the release reads everything after <SPToken1>).
    cell_ids, cell_levels = [], []
    for i, (gene, lv) in enumerate(c for c in conditions for _ in range(n_cells)):
        pre_i = np.array([] if gene is None else [vocab.id(gene)], dtype=np.int64)
        pre_l = np.array([] if gene is None else [lv], dtype=np.int64)
        cell_ids.append(np.concatenate([pre_i, gen.ids[i]]))
        cell_levels.append(np.concatenate([pre_l, gen.levels[i]]))
    labels = ["control" if g is None else f"{g}@{lv}" for g, lv in conditions]
    obs = meta_obs([dict(prompt)], len(conditions) * n_cells)
    obs["condition"] = pd.Categorical(np.repeat(labels, n_cells), categories=labels)
    obs["gene"] = pd.Categorical(np.repeat(["control" if g is None else g for g, _ in conditions], n_cells))
    obs["level"] = np.repeat([lv for _, lv in conditions], n_cells).astype(np.int64)
    obs.index = pd.Index([f"{lab}_{k}" for lab in labels for k in range(n_cells)])
    return cells_anndata(loaded, cell_ids, cell_levels, gen.stopped, obs), opts


def _scores(
    cells: AnnData,
    conditions: list[tuple[str | None, int]],
    n_cells: int,
    ref: Reference | None,
    genes: Sequence[str],
    n_top_genes: int,
) -> pd.DataFrame:
    """The scores table (see :class:`ScMulanPerturbation`); adds ``obsm["X_reference_pca"]`` with a reference."""
    x = cells.X
    n_cond = len(conditions)
    centroids = np.vstack(
        [np.asarray(x[c * n_cells : (c + 1) * n_cells].mean(axis=0)).ravel() for c in range(n_cond)]
    )
    n_genes_mean = cells.obs["n_genes"].to_numpy().reshape(n_cond, n_cells).mean(axis=1)
    rows: list[dict[str, Any]] = []
    control = centroids[0]
    pcs = ref.project(centroids) if ref is not None else None
    if ref is not None:
        # Sparse product: never densify the generated cells.
        proj = np.asarray(x @ ref.components.T) - ref.mean @ ref.components.T
        cells.obsm["X_reference_pca"] = proj.astype(np.float32)
        src_pc = ref.project(ref.source)
        dirs = {t: ref.project(c) - src_pc for t, c in ref.targets.items()}
    for c, (gene, lv) in enumerate(conditions):
        delta = centroids[c] - control
        row: dict[str, Any] = {
            "gene": "control" if gene is None else gene,
            "level": pd.NA if gene is None else lv,
            "n_cells": n_cells,
            "n_genes_mean": float(n_genes_mean[c]),
            "delta_vs_control": float(np.linalg.norm(delta)),
            "top_changed": top_changed(delta, genes, gene, n_top_genes),
        }
        if ref is not None and pcs is not None:
            s = pcs[c] - src_pc
            row["shift_norm"] = float(np.linalg.norm(s))
            row["shift_vs_control"] = float(np.linalg.norm(pcs[c] - pcs[0]))
            for t, d in dirs.items():
                nd = float(np.linalg.norm(d))
                row[f"score_{t}"] = cosine(s, d)
                row[f"projection_{t}"] = float(s @ d / nd) if nd > 0 else float("nan")
                row[f"score_{t}_vs_control"] = cosine(pcs[c] - pcs[0], d)
        rows.append(row)
    scores = pd.DataFrame(rows)
    scores["level"] = scores["level"].astype("Int64")
    return scores


def perturb_screen(
    data: Prompts,
    checkpoint: Checkpoint,
    *,
    genes: str | Sequence[str] | None = None,
    level: int | None = None,
    n_cells: int = 50,
    reference: AnnData | str | os.PathLike[str] | None = None,
    group_key: str | None = None,
    source: str | None = None,
    targets: Sequence[str] | None = None,
    n_pcs: int = 10,
    n_top_genes: int = 5,
    sort_by: str | None = None,
    decoding: DecodeOptions | None = None,
    device: str = "auto",
    batch_size: int = 64,
    max_tokens: int | None = 32768,
    progress: bool = True,
    **options: Any,
) -> ScMulanScreen:
    """Regulator screen: :func:`perturb` every gene at one level (default: the highest) and rank them.

    ``genes`` defaults to every gene of the vocabulary (2,000 for the official model: ``2,001 * n_cells``
    generated cells). Rows are sorted by ``sort_by`` (default ``score_<first target>``, else
    ``delta_vs_control``), largest first, with the control row last. The other arguments are those of
    :func:`perturb`.

    Returns:
        A :class:`ScMulanScreen` (``.scores``, ``.sort_by``; ``.save(dir)``).
    """
    loaded = load(checkpoint, device=device)
    level = loaded.config.n_levels if level is None else level
    column = sort_by or (f"score_{targets[0]}" if targets else "delta_vs_control")
    result = perturb(
        data,
        loaded,
        genes=list(loaded.vocab.genes) if genes is None else genes,
        levels=[level],
        n_cells=n_cells,
        reference=reference,
        group_key=group_key,
        source=source,
        targets=targets,
        n_pcs=n_pcs,
        n_top_genes=n_top_genes,
        decoding=decoding,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        **options,
    )
    scores = result.scores
    if column not in scores.columns:
        msg = f"sort_by={column!r} is not a score column; have {list(scores.columns)}."
        raise MsfmInputError(msg)
    is_control = scores["gene"] == "control"
    ranked = scores[~is_control].sort_values(column, ascending=False, kind="stable", na_position="last")
    return ScMulanScreen(
        scores=pd.concat([ranked, scores[is_control]]).reset_index(drop=True), sort_by=column
    )
