"""Perturbation response prediction, GEARS-style: ``perturb_fit`` trains a head (``perturb``, in perturb_predict.py, predicts).

The frozen backbone (eval mode) turns each control cell into decoder context embeddings in the official ``A``
input mode (raw counts, T = S: target depth ``f1``); a capped pool of control cells per group is embedded once and
kept in memory. A GEARS-like head (:mod:`~msfm.models.scfoundation.perturb_model`) learns the per-gene response,
trained through the shared engine (resumes after a kill; refuses changed settings). ``perturb_fit`` then scores
the held-out perturbations for the model and for three baselines (no change, mean shift, additive linear) in the
same run and writes ``metrics.csv`` next to the checkpoint (family ``scfoundation-perturb``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from pydantic import ValidationError
from torch import nn

from msfm.data import CellSource, GeneMapping, as_anndata, prepare_cells
from msfm.data.gene_graph import coexpression_graph, read_gene_graph
from msfm.data.normalize import log1p_cp10k
from msfm.data.perturbation import (
    PerturbationDesign,
    PerturbationSplit,
    build_design,
    control_pools,
    make_split,
    parse_condition,
)
from msfm.engine.module import LossOutput, MsfmLightningModule, OptimConfig
from msfm.engine.sampler import ResumableDataLoader
from msfm.engine.trainer import TrainerOptions, build_trainer, fit
from msfm.errors import MsfmInputError
from msfm.eval.perturb_metrics import METRICS, additive_linear, mean_shift, no_change, perturbation_metrics
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.decoding import decode_batches
from msfm.models.scfoundation.inference import Precision
from msfm.models.scfoundation.loading import CheckpointLike, backbone_of, load
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.perturb_config import (
    PerturbCheckpointConfig,
    PerturbHeadConfig,
    PerturbSettings,
)
from msfm.models.scfoundation.perturb_model import PerturbationHead, perturbation_loss
from msfm.models.scfoundation.provenance import preprocessing_record
from msfm.runtime.atomic import atomic_write_text, check_output_free
from msfm.runtime.checkpoint import save_checkpoint
from msfm.runtime.config import settings_error
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import TrainResult

__all__ = ["PERTURB_FAMILY", "perturb_fit"]

#: ``config.json`` family of the checkpoints ``perturb_fit`` writes.
PERTURB_FAMILY = "scfoundation-perturb"
#: The official GEARS input mode: raw counts and T = S.
TARGET_DEPTH = "f1"
METHODS = ("model", "no_change", "mean_shift", "additive_linear")


class PerturbationModel(nn.Module):
    """The frozen backbone, the head and the training control means (``[groups, G]``), saved together."""

    def __init__(self, backbone: ScFoundation, head: PerturbationHead, control_mean: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("control_mean", control_mean.float().clone())


# --------------------------------------------------------------------------------------------------- data pieces


def _model_genes(
    panel: Any, mapping: GeneMapping, genes: Sequence[str] | None
) -> tuple[list[str], np.ndarray]:
    """The panel genes present in the data (optionally only ``genes``): symbols and panel positions."""
    pos = np.unique(mapping.input_to_panel[mapping.input_to_panel >= 0])
    symbols = [panel.symbols[i] for i in pos]
    if genes is None:
        return symbols, pos
    index = dict(zip(symbols, pos, strict=True))
    missing = [g for g in genes if g not in index]
    if missing:
        msg = (
            f"genes= names {len(missing)} gene(s) that are not in both the backbone's panel and the data, e.g. "
            f"{missing[:5]}. Pick genes from the data's var_names that the panel has."
        )
        raise MsfmInputError(msg)
    chosen = sorted(set(genes), key=lambda g: index[g])
    return chosen, np.array([index[g] for g in chosen], dtype=np.int64)


def _check_memory(n_cells: int, n_genes: int, dim: int, max_gb: float) -> None:
    need = n_cells * n_genes * (dim + 1) * 4 / 1e9
    if need > max_gb:
        msg = (
            f"The context embeddings of {n_cells} control cells x {n_genes} genes x {dim} dims need {need:.2f} GB, "
            f"above max_memory_gb={max_gb}. Lower max_control_cells, pass fewer genes=, or raise max_memory_gb."
        )
        raise MsfmInputError(msg)


def _expression(
    source: CellSource, mapping: GeneMapping, rows: np.ndarray, gene_pos: np.ndarray
) -> np.ndarray:
    """``[len(rows), G]`` log1p CP10k over the panel total (scFoundation's normalisation), model genes only."""
    out = np.zeros((len(rows), len(gene_pos)), dtype=np.float32)
    for i in range(0, len(rows), 2048):
        panel = mapping.apply(source.rows(rows[i : i + 2048]))
        totals = np.asarray(panel.sum(1)).ravel()
        out[i : i + 2048] = log1p_cp10k(panel, totals=totals)[:, gene_pos].toarray()
    return out


def _contexts(
    loaded: Loaded,
    source: CellSource,
    mapping: GeneMapping,
    rows: np.ndarray,
    gene_pos: np.ndarray,
    *,
    batch_size: int,
    precision: Precision,
    progress: bool,
) -> np.ndarray:
    """``[len(rows), G, D]`` decoder context embeddings of ``rows`` (sorted), float32, in ``rows`` order."""
    dim = loaded.config.decoder_dim
    out = np.zeros((len(rows), len(gene_pos), dim), dtype=np.float32)
    where = {int(r): i for i, r in enumerate(rows)}
    # The official A mode: raw counts (log-normalised inside) with the raw total, T = S.
    for src_rows, z in decode_batches(
        loaded,
        source,
        mapping,
        target_depth=TARGET_DEPTH,
        batch_size=batch_size,
        precision=precision,
        pre_normalized=False,
        head=False,
        progress=progress,
        desc="scFoundation context embeddings",
        rows=rows,
    ):
        out[[where[int(r)] for r in src_rows]] = z[:, gene_pos]
    return out


def _token_rows(
    conditions: Sequence[str], control: str, genes: Sequence[str], labels: Sequence[str]
) -> np.ndarray:
    """``[len(conditions), G + L]`` multi-hot perturbation tokens (genes first, then labels)."""
    gi = {g: i for i, g in enumerate(genes)}
    li = {lab: len(genes) + i for i, lab in enumerate(labels)}
    out = np.zeros((len(conditions), len(genes) + len(labels)), dtype=np.float32)
    for r, c in enumerate(conditions):
        p = parse_condition(c, control)
        for t in p.tokens:
            out[r, gi[t] if p.kind == "gene" else li[t]] = 1.0
    return out


class _PairedCells(torch.utils.data.Dataset):
    """Perturbed training cells, each paired with a control cell of its group drawn per batch."""

    def __init__(
        self,
        target: np.ndarray,
        token_index: np.ndarray,
        group_index: np.ndarray,
        pools: list[np.ndarray],
        contexts: np.ndarray,
        control_expr: np.ndarray,
        tokens: np.ndarray,
        seed: int,
    ) -> None:
        self.target, self.token_index, self.group_index = target, token_index, group_index
        self.pools, self.contexts, self.control_expr, self.tokens = pools, contexts, control_expr, tokens
        self.seed = seed

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        # The pairing is a pure function of the batch, so a resumed run draws what an uninterrupted one did.
        rng = np.random.default_rng([self.seed, *idx])
        ctrl = np.array(
            [self.pools[self.group_index[i]][rng.integers(len(self.pools[self.group_index[i]]))] for i in idx]
        )
        return {
            "context": torch.from_numpy(self.contexts[ctrl]),
            "control": torch.from_numpy(self.control_expr[ctrl]),
            "perturbation": torch.from_numpy(self.tokens[self.token_index[idx]]),
            "target": torch.from_numpy(self.target[idx]),
        }


@dataclasses.dataclass(frozen=True)
class _Objective:
    direction_lambda: float

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        pred = model(batch["context"], batch["control"], batch["perturbation"])
        loss, mse, direction = perturbation_loss(
            pred, batch["target"], batch["control"], direction_lambda=self.direction_lambda
        )
        return LossOutput(loss, {"mse": mse.detach(), "direction": direction.detach()}, n=len(pred))


@torch.inference_mode()
def _predict_cells(
    head: PerturbationHead,
    contexts: np.ndarray,
    control: np.ndarray,
    tokens: np.ndarray,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """``[n, G]`` predictions of one perturbation (``tokens [G + L]``) from each of ``n`` control cells."""
    head.eval()
    device = next(head.parameters()).device
    out = np.zeros(control.shape, dtype=np.float32)
    tok = torch.from_numpy(tokens).to(device)
    for i in range(0, len(control), batch_size):
        ctx = torch.from_numpy(contexts[i : i + batch_size]).to(device)
        ctrl = torch.from_numpy(control[i : i + batch_size]).to(device)
        pred = head(ctx, ctrl, tok.expand(len(ctrl), -1))
        out[i : i + batch_size] = pred.float().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------------- fitting


def _settings(**values: Any) -> PerturbSettings:
    try:
        return PerturbSettings(**values)
    except ValidationError as err:
        raise settings_error(err, "perturb_fit settings") from err


def perturb_fit(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    out: str | os.PathLike[str],
    condition_key: str = "condition",
    control: str = "ctrl",
    match_key: str | None = None,
    split: Literal["condition", "group"] = "condition",
    test_groups: Sequence[str] | None = None,
    test_conditions: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    gene_graph: str | os.PathLike[str] | None = None,
    genes: Sequence[str] | None = None,
    max_control_cells: int = 256,
    min_cells: int = 10,
    hidden_dim: int = 64,
    sgc_hops: int = 1,
    direction_lambda: float = 0.1,
    coexpression_k: int = 20,
    coexpression_threshold: float = 0.4,
    max_memory_gb: float = 4.0,
    max_epochs: int = 20,
    max_steps: int = -1,
    batch_size: int = 32,
    lr: float = 1e-3,
    context_batch_size: int = 8,
    checkpoint_every_n_steps: int = 50,
    callbacks: Sequence[Any] = (),
    device: str = "auto",
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    strategy: str = "auto",
    precision: str = "32-true",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    allow_config_change: bool = False,
    **read_options: Any,
) -> TrainResult:
    """Train a GEARS-style perturbation head on a frozen backbone, then score the held-out split.

    Args:
        data: cells with raw counts and ``obs[condition_key]`` (GEARS ``ctrl`` / ``GENE+ctrl`` / ``GENE1+GENE2``,
            or any labels with ``control`` naming the control), or a path to read.
        checkpoint: the backbone (an scFoundation checkpoint, a ``TrainResult`` or a ``Loaded``).
        out: checkpoint directory to write (family ``scfoundation-perturb``); the run lives in ``.<name>.run``.
        condition_key, control: the condition column and its control label.
        match_key: column grouping cells (e.g. ``cell_type``); controls pair within their group.
        split: ``condition`` holds out whole conditions (``test_conditions`` or a seeded ``test_fraction``),
            ``group`` holds out the perturbed cells of ``test_groups`` (e.g. stimulated CD14 monocytes).
        gene_graph: an edge list (CSV/TSV ``gene_a,gene_b[,weight]``, e.g. from GO) that propagates the
            gene-perturbation embeddings; default the co-expression graph of the training cells.
        genes: restrict the model to these genes (default: every panel gene in the data).
        max_control_cells: control cells per group embedded and kept in memory.
        min_cells: fewest cells per perturbed ``(condition, group)``.
        hidden_dim, sgc_hops, direction_lambda, coexpression_k, coexpression_threshold: the head and its loss,
            see :class:`~msfm.models.scfoundation.perturb_config.PerturbSettings`.
        max_memory_gb: refuse context embeddings larger than this.
        max_epochs, max_steps, batch_size, lr, seed: training loop.
        context_batch_size: cells per backbone batch when embedding the control cells.
        checkpoint_every_n_steps: how often the run saves ``last.ckpt`` (a killed run resumes from it).
        callbacks: extra Lightning callbacks.
        device: where the backbone embeds the control cells.
        accelerator, devices, strategy, precision: Lightning settings of the head's training.
        progress, overwrite, allow_config_change: as in ``fit_classifier``.
        **read_options: :class:`msfm.data.CellReadOptions` (raw counts are required).

    Returns:
        ``TrainResult``; ``metrics`` holds ``<method>/<metric>`` means over the held-out pairs for the model and
        the baselines; ``<out>/metrics.csv`` has one row per method x held-out ``(condition, group)``.
    """
    settings = _settings(
        hidden_dim=hidden_dim,
        sgc_hops=sgc_hops,
        direction_lambda=direction_lambda,
        max_control_cells=max_control_cells,
        min_cells=min_cells,
        coexpression_k=coexpression_k,
        coexpression_threshold=coexpression_threshold,
        max_memory_gb=max_memory_gb,
        test_fraction=test_fraction,
        batch_size=batch_size,
        lr=lr,
        max_epochs=max_epochs,
        max_steps=max_steps,
    )
    options = parse_read_options(perturb_fit, read_options)
    if options.pre_normalized:
        msg = (
            "perturb_fit needs raw counts: the official input mode uses each cell's raw total (T = S). Pass the "
            "counts (layer=...) instead of pre_normalized=True."
        )
        raise MsfmInputError(msg)
    target = check_output_free(out, overwrite=overwrite)
    adata = as_anndata(data)
    loaded = backbone_of(load(checkpoint, device=device))
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    gene_names, gene_pos = _model_genes(loaded.vocab, mapping, genes)
    design = build_design(
        adata.obs,
        condition_key=condition_key,
        control=control,
        match_key=match_key,
        genes=gene_names,
        min_cells=settings.min_cells,
    )
    sp = make_split(
        design,
        split=split,
        test_fraction=settings.test_fraction,
        test_conditions=test_conditions,
        test_groups=test_groups,
        seed=seed,
    )
    pools = control_pools(design, max_cells=settings.max_control_cells, seed=seed)
    groups = sorted(pools)
    pool_rows = np.sort(np.concatenate([pools[g] for g in groups]))
    dim = loaded.config.decoder_dim
    _check_memory(len(pool_rows), len(gene_names), dim, settings.max_memory_gb)
    pool_pos = {int(r): i for i, r in enumerate(pool_rows)}
    pool_index = [np.array([pool_pos[int(r)] for r in pools[g]]) for g in groups]
    contexts = _contexts(
        loaded,
        source,
        mapping,
        pool_rows,
        gene_pos,
        batch_size=context_batch_size,
        precision="32",
        progress=progress,
    )
    control_expr = _expression(source, mapping, pool_rows, gene_pos)
    control_mean = np.stack([control_expr[p].mean(0) for p in pool_index])
    pair_rows = {p: design.cells(*p) for p in (*sp.train, *sp.test)}
    means = {p: _expression(source, mapping, r, gene_pos).mean(0) for p, r in pair_rows.items()}

    train_rows = np.concatenate([pair_rows[p] for p in sp.train])
    train_expr = _expression(source, mapping, train_rows, gene_pos)
    graph_expr = np.concatenate([train_expr, control_expr])
    co_edges, co_w = coexpression_graph(
        graph_expr, k=settings.coexpression_k, threshold=settings.coexpression_threshold
    )
    if gene_graph is not None:
        pe_edges, pe_w = read_gene_graph(gene_graph, gene_names)
    else:
        pe_edges, pe_w = co_edges, co_w
    labels = sorted({c for c in design.conditions if design.parsed[c].kind == "label"})
    conditions = list(design.conditions)
    tokens = _token_rows(conditions, control, gene_names, labels)
    cond_index = {c: i for i, c in enumerate(conditions)}
    group_pos = {g: i for i, g in enumerate(groups)}
    train_cond = np.concatenate([[cond_index[p[0]]] * len(pair_rows[p]) for p in sp.train]).astype(np.int64)
    train_group = np.concatenate([[group_pos[p[1]]] * len(pair_rows[p]) for p in sp.train]).astype(np.int64)
    dataset = _PairedCells(
        train_expr, train_cond, train_group, pool_index, contexts, control_expr, tokens, seed
    )
    loader = ResumableDataLoader(
        dataset, batch_size=settings.batch_size, shuffle=True, seed=seed, collate_fn=dataset.collate
    )
    head_cfg = PerturbHeadConfig(
        n_genes=len(gene_names),
        context_dim=dim,
        n_labels=len(labels),
        hidden_dim=settings.hidden_dim,
        sgc_hops=settings.sgc_hops,
    )
    torch.manual_seed(seed)
    head = PerturbationHead(
        head_cfg,
        torch.from_numpy(co_edges),
        torch.from_numpy(co_w),
        torch.from_numpy(pe_edges),
        torch.from_numpy(pe_w),
    )
    module = MsfmLightningModule(
        head,
        _Objective(settings.direction_lambda),
        OptimConfig(lr=settings.lr, weight_decay=0.0, warmup_steps=0, schedule="constant"),
    )
    run_dir = target.with_name(f".{target.name}.run")
    trainer = build_trainer(
        TrainerOptions(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            max_epochs=settings.max_epochs if settings.max_steps == -1 else None,
            max_steps=settings.max_steps,
            seed=seed,
            progress_bar=progress,
            model_summary=False,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            log_every_n_steps=5,
            allow_config_change=allow_config_change,
        ),
        run_dir,
        callbacks=callbacks,
    )
    run_config = {
        "settings": settings.model_dump(mode="json"),
        "condition_key": condition_key,
        "control": control,
        "match_key": match_key,
        "split": split,
        "train": [list(p) for p in sp.train],
        "test": [list(p) for p in sp.test],
        "genes": len(gene_names),
        "gene_graph": str(gene_graph) if gene_graph is not None else None,
        "read": options.model_dump(mode="json"),
        "backbone": str(Path(loaded.path).resolve()) if loaded.path is not None else None,
    }
    fit(trainer, module, loader, run_dir, run_config=run_config)
    head.eval()

    controls = _Controls(groups, pool_index, contexts, control_expr, control_mean)
    n_cells = {p: len(pair_rows[p]) for p in sp.test}
    table = _evaluate(head, sp, design, means, controls, tokens, cond_index, n_cells)
    spec = PerturbCheckpointConfig(
        backbone=loaded.config,
        head=head_cfg,
        genes=tuple(gene_names),
        labels=tuple(labels),
        conditions=tuple(conditions),
        train_conditions=tuple(sorted({c for c, _ in sp.train})),
        groups=tuple(groups),
        condition_key=condition_key,
        control=control,
        match_key=match_key,
        target_depth=TARGET_DEPTH,
        max_control_cells=settings.max_control_cells,
    )
    bundle = PerturbationModel(loaded.model, head, torch.from_numpy(control_mean))
    state = {k: v.detach().cpu() for k, v in bundle.state_dict().items()}
    save_checkpoint(
        target,
        family=PERTURB_FAMILY,
        config=spec,
        state_dict=state,
        gene_panel=list(loaded.vocab.symbols),
        gene_panel_name=loaded.vocab.name,
        preprocessing=preprocessing_record(False),
        extra_meta={
            "backbone_checkpoint": str(loaded.path),
            "gene_mapping": mapping.to_uns(),
            "split": split,
            "test": [list(p) for p in sp.test],
            "gene_graph": str(gene_graph) if gene_graph is not None else "coexpression",
        },
    )
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    atomic_write_text(target / "metrics.csv", buf.getvalue())
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = table.groupby("method", sort=False)[list(METRICS)].mean()
    for method, row in summary.iterrows():
        for name, value in row.items():
            metrics[f"{method}/{name}"] = float(value)
    metrics["n_test_pairs"] = len(sp.test)
    metrics["n_train_cells"] = len(train_rows)
    return TrainResult(run_dir=run_dir, checkpoint=target, metrics=metrics)


@dataclasses.dataclass(frozen=True, eq=False)
class _Controls:
    """The control pools: group order, rows of each group in the pool, and the pool's embeddings and expression."""

    groups: list[str]
    pool_index: list[np.ndarray]
    contexts: np.ndarray
    expression: np.ndarray
    mean: np.ndarray


def _evaluate(
    head: PerturbationHead,
    sp: PerturbationSplit,
    design: PerturbationDesign,
    means: dict[tuple[str, str], np.ndarray],
    controls: _Controls,
    tokens: np.ndarray,
    cond_index: dict[str, int],
    n_cells: dict[tuple[str, str], int],
) -> pd.DataFrame:
    """One row per method x held-out ``(condition, group)`` with the five metrics and ``n_cells``."""
    gpos = {g: i for i, g in enumerate(controls.groups)}
    train_deltas = np.stack([means[p] - controls.mean[gpos[p[1]]] for p in sp.train])
    train_tokens = [design.parsed[c].tokens for c, _ in sp.train]
    rows = []
    for p in sp.test:
        c, g = p
        cm = controls.mean[gpos[g]]
        idx = controls.pool_index[gpos[g]]
        preds = {
            "model": _predict_cells(
                head, controls.contexts[idx], controls.expression[idx], tokens[cond_index[c]]
            ).mean(0),
            "no_change": no_change(cm),
            "mean_shift": mean_shift(cm, train_deltas),
            "additive_linear": additive_linear(cm, train_tokens, train_deltas, design.parsed[c].tokens),
        }
        for method, pred in preds.items():
            rows.append(
                {
                    "method": method,
                    "condition": c,
                    "group": g,
                    "subgroup": sp.subgroup[p],
                    **perturbation_metrics(pred, means[p], cm),
                    "n_cells": n_cells[p],
                    "n_control_cells": len(idx),
                }
            )
    return pd.DataFrame(rows)
