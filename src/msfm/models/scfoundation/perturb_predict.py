"""``perturb``: post-perturbation profiles from a ``perturb_fit`` model and the control cells of the data.

For every requested ``(condition, group)`` the head predicts each control cell of the group (capped as in
training) and averages them (or keeps them with ``per_cell=True``); the result is a new AnnData over the model's
genes with the control profile beside the prediction.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from msfm.data import as_anndata, prepare_cells
from msfm.data.perturbation import (
    ALL_GROUP,
    parse_condition,
)
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.loading import CheckpointLike
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.perturb_config import (
    PerturbCheckpointConfig,
)
from msfm.models.scfoundation.perturb_model import PerturbationHead
from msfm.models.scfoundation.perturbation import (
    PERTURB_FAMILY,
    PerturbationModel,
    _contexts,
    _expression,
    _predict_cells,
    _token_rows,
)
from msfm.runtime.adata import check_key_added, store_uns
from msfm.runtime.atomic import check_output_free
from msfm.runtime.checkpoint import load_checkpoint
from msfm.runtime.config import checkpoint_config
from msfm.runtime.devices import autocast_context, resolve_device
from msfm.runtime.h5ad import write_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.precision import canonical_precision, resolve_precision

__all__ = ["load_perturb", "perturb"]


def load_perturb(checkpoint: CheckpointLike, *, device: str = "auto") -> Loaded:
    """Load a ``perturb_fit`` checkpoint: ``Loaded(family="scfoundation-perturb", model=PerturbationModel, ...)``.

    Raises:
        CheckpointError: not a perturbation checkpoint, or its tensors do not fit its config.
    """
    dev = resolve_device(device)
    if isinstance(checkpoint, Loaded):
        if checkpoint.family != PERTURB_FAMILY:
            msg = (
                f"Got a Loaded {checkpoint.family!r} model; perturb needs a {PERTURB_FAMILY!r} checkpoint from "
                "msfm.scfoundation.perturb_fit."
            )
            raise CheckpointError(msg)
        return checkpoint if checkpoint.device == dev else checkpoint.to(dev)
    path = Path(checkpoint)
    ckpt = load_checkpoint(path, weights=False)
    if ckpt.family != PERTURB_FAMILY:
        msg = (
            f"Checkpoint {path} is a {ckpt.family!r} checkpoint; perturb needs a {PERTURB_FAMILY!r} checkpoint. "
            "Train one with msfm.scfoundation.perturb_fit (msfm scfoundation perturb-fit) on this backbone."
        )
        raise CheckpointError(msg)
    ckpt = load_checkpoint(path, family=PERTURB_FAMILY)
    cfg = checkpoint_config(PerturbCheckpointConfig, ckpt.config, ckpt.config_file)
    sd = ckpt.state_dict
    try:
        head = PerturbationHead(
            cfg.head,
            sd["head.coexpression_edges"],
            sd["head.coexpression_weights"],
            sd["head.perturbation_edges"],
            sd["head.perturbation_weights"],
        )
        model = PerturbationModel(ScFoundation(cfg.backbone), head, sd["control_mean"])
        model.load_state_dict(sd, strict=True)
    except (KeyError, RuntimeError) as err:
        msg = f"Checkpoint {path} does not match its config ({err}); it is damaged. Re-run perturb_fit."
        raise CheckpointError(msg) from err
    from msfm.data import GenePanel

    vocab = GenePanel.from_symbols(
        ckpt.gene_panel, name=(ckpt.meta.get("gene_panel") or {}).get("name") or "checkpoint"
    )
    model.to(dev).eval()
    return Loaded(
        family=PERTURB_FAMILY, model=model, config=cfg, meta=ckpt.meta, path=path, device=dev, vocab=vocab
    )


def _requested_conditions(cfg: PerturbCheckpointConfig, conditions: Sequence[str] | None) -> list[str]:
    wanted = list(cfg.conditions) if conditions is None else [str(c) for c in conditions]
    genes, labels = set(cfg.genes), set(cfg.labels)
    for c in wanted:
        p = parse_condition(c, cfg.control)
        if p.kind == "control":
            msg = f"conditions= includes the control label {c!r}; ask for perturbed conditions only."
            raise MsfmInputError(msg)
        if p.kind == "gene":
            unknown = [g for g in p.tokens if g not in genes]
            if unknown:
                msg = (
                    f"Condition {c!r} names gene(s) {unknown} that are not among the model's {len(genes)} genes; "
                    "a perturbed gene must be in the backbone's gene panel and in the training data."
                )
                raise MsfmInputError(msg)
        elif c not in labels:
            msg = (
                f"Condition {c!r} is a non-gene perturbation the model never learned (known: {sorted(labels)}). "
                "Only labels seen in training can be predicted; GEARS gene labels ('GENE+ctrl') generalise."
            )
            raise MsfmInputError(msg)
    return wanted


def perturb(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    conditions: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    key_added: str = "scfoundation",
    per_cell: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Predict post-perturbation expression from the control cells of ``data``.

    Args:
        data: cells with raw counts and the condition column the model was fit with; its control cells
            (per group of ``match_key``) are the starting points.
        checkpoint: a ``perturb_fit`` checkpoint (directory, ``TrainResult`` or ``Loaded``).
        conditions: perturbations to predict (default: every condition of the training data).
        groups: groups to predict for (default: every group with control cells).
        key_added: key of ``uns[key]["perturb"]`` (the parameters).
        per_cell: one predicted profile per control cell instead of the mean per ``(condition, group)``.
        batch_size: cells per backbone batch.
        device, precision, progress: as in ``embed``.
        out, overwrite: also write the result to this ``.h5ad`` file.
        **read_options: :class:`msfm.data.CellReadOptions`.

    Returns:
        A new AnnData over the model's genes: ``obs`` = ``condition`` (and the group column, ``n_control_cells``;
        with ``per_cell`` the ``control_cell``), ``X`` = predicted log1p CP10k expression,
        ``layers["control"]`` = the control mean (or the control cell), ``uns[key]["perturb"]``.
    """
    check_key_added(key_added)
    canonical_precision(precision)
    options = parse_read_options(perturb, read_options)
    if options.pre_normalized:
        msg = "perturb needs raw counts (T = S uses each cell's raw total); pass the counts, not pre_normalized=True."
        raise MsfmInputError(msg)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
    loaded = load_perturb(checkpoint, device=device)
    choice = resolve_precision(precision, loaded.device)
    cfg: PerturbCheckpointConfig = loaded.config
    wanted = _requested_conditions(cfg, conditions)
    adata = as_anndata(data)
    cond = _obs_column(adata, cfg.condition_key, "condition column")
    if not (cond == cfg.control).any():
        msg = (
            f"obs[{cfg.condition_key!r}] has no control cells ({cfg.control!r}); perturb predicts from control "
            "cells. Add control cells or fix the label."
        )
        raise MsfmInputError(msg)
    group_col = (
        _obs_column(adata, cfg.match_key, "match_key column")
        if cfg.match_key
        else np.full(adata.n_obs, ALL_GROUP)
    )
    ctrl_groups = sorted(set(group_col[cond == cfg.control].tolist()))
    chosen = ctrl_groups if groups is None else [str(g) for g in groups]
    lacking = [g for g in chosen if g not in ctrl_groups]
    if lacking:
        msg = (
            f"Group(s) {lacking} have no control cells in the data (groups with controls: {ctrl_groups[:20]}); "
            "predictions start from a group's control cells."
        )
        raise MsfmInputError(msg)
    backbone = dataclasses.replace(
        loaded, family="scfoundation", model=loaded.model.backbone, config=cfg.backbone
    )
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    index = {s: i for i, s in enumerate(loaded.vocab.symbols)}
    gene_pos = np.array([index[g] for g in cfg.genes], dtype=np.int64)
    covered = set(mapping.input_to_panel[mapping.input_to_panel >= 0].tolist())
    absent = [g for g, p in zip(cfg.genes, gene_pos, strict=True) if int(p) not in covered]
    if absent:
        msg = (
            f"The data lacks {len(absent)} of the model's {len(cfg.genes)} genes, e.g. {absent[:5]}; perturb needs "
            "the genes it was trained on (same var_names)."
        )
        raise MsfmInputError(msg)
    rng = np.random.default_rng(0)
    pools = {}
    for g in chosen:
        rows = np.flatnonzero((cond == cfg.control) & (group_col == g))
        if len(rows) > cfg.max_control_cells:
            rows = np.sort(rng.choice(rows, size=cfg.max_control_cells, replace=False))
        pools[g] = rows
    head = loaded.model.head
    tokens = _token_rows(wanted, cfg.control, cfg.genes, cfg.labels)
    obs_rows, x_rows, ctrl_rows = [], [], []
    for g in chosen:
        rows = pools[g]
        ctx = _contexts(
            backbone,
            source,
            mapping,
            rows,
            gene_pos,
            batch_size=batch_size,
            precision=choice.precision,
            progress=progress,
        )
        expr = _expression(source, mapping, rows, gene_pos)
        with autocast_context(loaded.device, choice.precision):
            for ci, c in enumerate(wanted):
                pred = _predict_cells(head, ctx, expr, tokens[ci])
                base = {"condition": c, **({cfg.match_key: g} if cfg.match_key else {})}
                if per_cell:
                    for r, p_row, e_row in zip(rows, pred, expr, strict=True):
                        obs_rows.append({**base, "control_cell": str(adata.obs_names[r])})
                        x_rows.append(p_row)
                        ctrl_rows.append(e_row)
                else:
                    obs_rows.append({**base, "n_control_cells": len(rows)})
                    x_rows.append(pred.mean(0))
                    ctrl_rows.append(expr.mean(0))
    obs = pd.DataFrame(obs_rows)
    obs.index = [str(i) for i in range(len(obs))]
    result = AnnData(
        X=np.stack(x_rows).astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=list(cfg.genes)),
        layers={"control": np.stack(ctrl_rows).astype(np.float32)},
    )
    store_uns(
        result,
        key_added,
        "perturb",
        {
            "checkpoint": str(loaded.path),
            "conditions": wanted,
            "groups": chosen,
            "match_key": cfg.match_key,
            "per_cell": per_cell,
            "target_depth": cfg.target_depth,
            "max_control_cells": cfg.max_control_cells,
            "values": "log1p CP10k over the panel total",
            "precision": choice.record(),
        },
    )
    write_output(result, out, data, replace=overwrite)
    return result


def _obs_column(adata: AnnData, key: str, what: str) -> np.ndarray:
    if key not in adata.obs:
        msg = (
            f"The {what} {key!r} the model was fit with is not in obs (columns: {list(adata.obs.columns)[:20]}). "
            "Add it (control cells labelled as in training)."
        )
        raise MsfmInputError(msg)
    return adata.obs[key].astype(str).to_numpy()
