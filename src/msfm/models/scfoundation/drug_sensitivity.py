"""Single-cell drug sensitivity (SCAD-style): ``sensitivity_fit`` trains on labelled bulk samples and adapts to
unlabelled single cells adversarially; ``sensitivity_predict`` labels cells sensitive/resistant.

Official settings (scFoundation's SCAD integration): bulk (GDSC) embeddings with bulk mode F and T = S
(``bulk_target_depth="f1"``), single-cell embeddings with ``t4``, both ``pool="all"`` (3,072-d for the released
model); shared feature extractor, a sensitivity predictor trained on labelled bulk, a domain discriminator through
gradient reversal; 5-fold cross-validation over the bulk samples. Baselines in the same run and folds: logistic
regression on the bulk embeddings applied to single cells without adaptation, and the same network without the
adversarial loss.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from msfm.data import as_anndata
from msfm.data.drugs import binary_labels
from msfm.data.folds import assign_folds, check_fold_classes
from msfm.engine.objective import LossOutput
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.drug_config import SensitivityCheckpointConfig, SensitivityHeadConfig
from msfm.models.scfoundation.drug_heads import ScadNet
from msfm.models.scfoundation.drug_response import (
    _Indices,
    cell_embeddings,
    check_settings,
    digest,
    train_head,
)
from msfm.runtime.adata import check_key_added, field_key, store_uns
from msfm.runtime.atomic import atomic_write_text, check_output_free
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.h5ad import write_output
from msfm.runtime.results import TrainResult

__all__ = ["SENSITIVITY_FAMILY", "sensitivity_fit", "sensitivity_predict"]

SENSITIVITY_FAMILY = "scfoundation-drug-sensitivity"
METHODS = ("scad", "no_adversarial", "logistic")
PathLike = str | os.PathLike[str]


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if np.unique(y).size == 2 else float("nan")


def _objective(adv_weight: float):
    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        net: ScadNet = model  # type: ignore[assignment]
        logits = net(batch["x"])
        pred = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["y"])
        if adv_weight <= 0:
            return LossOutput(loss=pred, components={"prediction": pred.detach()}, n=int(logits.shape[0]))
        x = torch.cat([batch["x"], batch["x_sc"]])
        domain = torch.cat([torch.zeros(len(batch["x"])), torch.ones(len(batch["x_sc"]))]).to(x.device)
        adv = torch.nn.functional.binary_cross_entropy_with_logits(net.domain_logits(x, 1.0), domain)
        return LossOutput(
            loss=pred + adv_weight * adv,
            components={"prediction": pred.detach(), "domain": adv.detach()},
            n=int(logits.shape[0]),
        )

    return objective


@torch.inference_mode()
def _proba(net: ScadNet, x: np.ndarray, batch_size: int = 4096, device: Any = "cpu") -> np.ndarray:
    net.eval().to(device)
    out = [
        torch.sigmoid(net(torch.as_tensor(x[s : s + batch_size], device=device))).double().cpu().numpy()
        for s in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0)


def sensitivity_fit(
    data: AnnData | PathLike,
    checkpoint: Any,
    *,
    single_cells: AnnData | PathLike,
    bulk_labels_key: str,
    out: PathLike,
    sc_labels_key: str | None = None,
    use_rep: str | None = None,
    folds: int = 5,
    bulk_target_depth: str = "f1",
    sc_target_depth: str = "t4",
    pool: Literal["max", "all"] = "all",
    adv_weight: float = 1.0,
    hidden: int = 256,
    feature_dim: int = 64,
    dropout: float = 0.3,
    max_epochs: int = 30,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    checkpoint_every_n_steps: int = 200,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    allow_config_change: bool = False,
    callbacks: Sequence[Any] = (),
    **read_options: Any,
) -> TrainResult:
    """Cross-validate and train a SCAD-style sensitivity classifier: labelled bulk -> unlabelled single cells.

    Args:
        data: labelled bulk samples (cell lines x genes) or a path.
        checkpoint: scFoundation backbone for the embeddings (None with ``use_rep``).
        single_cells: the target single cells (or a path); their labels, if any, are used only for evaluation.
        bulk_labels_key: ``obs`` column of ``bulk`` with sensitive/resistant (or 1/0) labels.
        out: model directory to write (with ``cv_predictions.csv``, ``sc_predictions.csv``, ``metrics.csv``).
        sc_labels_key: ``obs`` column of ``single_cells`` with labels, for AUROC on single cells only.
        use_rep: take both embeddings from ``obsm[use_rep]``.
        folds: cross-validation folds over the bulk samples (stratified).
        bulk_target_depth, sc_target_depth, pool: embedding settings (official: ``f1``, ``t4``, ``all``).
        adv_weight: weight of the domain-adversarial loss (0 = no adaptation).
        hidden, feature_dim, dropout: network size.
        max_epochs, batch_size, lr, weight_decay, seed: training loop; each step draws a bulk batch and a
            single-cell batch of the same size.
        accelerator, devices, strategy, precision, checkpoint_every_n_steps, device, progress, overwrite,
        allow_config_change, callbacks: as in :func:`~msfm.models.scfoundation.drug_response.drug_fit`.
        **read_options: :class:`msfm.data.CellReadOptions` for both inputs.

    Returns:
        ``TrainResult``; ``metrics[method]`` (``scad``, ``no_adversarial``, ``logistic``) holds ``bulk_auroc``
        (out-of-fold) and, with ``sc_labels_key``, ``sc_auroc`` (mean over the fold models).
    """
    parse_read_options(sensitivity_fit, read_options)
    target = check_output_free(out, overwrite=overwrite)
    bulk_a = as_anndata(data)
    sc_a = as_anndata(single_cells)
    if bulk_labels_key not in bulk_a.obs:
        msg = f"bulk_labels_key={bulk_labels_key!r} is not a bulk obs column; available: {list(bulk_a.obs.columns)[:20]}."
        raise MsfmInputError(msg)
    y = binary_labels(bulk_a.obs[bulk_labels_key].to_numpy(), f"bulk obs[{bulk_labels_key!r}]")
    y_sc = None
    if sc_labels_key is not None:
        if sc_labels_key not in sc_a.obs:
            msg = f"sc_labels_key={sc_labels_key!r} is not a single-cell obs column; available: {list(sc_a.obs.columns)[:20]}."
            raise MsfmInputError(msg)
        y_sc = binary_labels(sc_a.obs[sc_labels_key].to_numpy(), f"single-cell obs[{sc_labels_key!r}]")
    fold = assign_folds(len(y), folds=folds, seed=seed, labels=y, what="bulk samples")
    check_fold_classes(fold, y, what="bulk samples")
    read = dict(read_options)
    xb, bulk_cfg = cell_embeddings(
        bulk_a, checkpoint, use_rep=use_rep, target_depth=bulk_target_depth, pool=pool, read_options=read,
        device=device, progress=progress, what="bulk",
    )  # fmt: skip
    xs, sc_cfg = cell_embeddings(
        sc_a, checkpoint, use_rep=use_rep, target_depth=sc_target_depth, pool=pool, read_options=read,
        device=device, progress=progress, what="single_cells",
    )  # fmt: skip
    if xb.shape[1] != xs.shape[1]:
        msg = f"Bulk embeddings have {xb.shape[1]} dimensions and single-cell ones {xs.shape[1]}; they must match."
        raise MsfmInputError(msg)
    head = SensitivityHeadConfig(in_dim=xb.shape[1], hidden=hidden, feature_dim=feature_dim, dropout=dropout)
    root = target.with_name(f".{target.name}.run")
    check_settings(
        root,
        {
            "verb": "sensitivity_fit", "folds": folds, "head": head.model_dump(mode="json"),
            "bulk": bulk_cfg.model_dump(mode="json"), "single_cell": sc_cfg.model_dump(mode="json"),
            "inputs": digest(xb, xs, y), "adv_weight": adv_weight, "batch_size": batch_size,
            "max_epochs": max_epochs, "lr": lr, "weight_decay": weight_decay, "seed": seed,
        },
        allow_change=allow_config_change,
    )  # fmt: skip
    common = {
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "max_epochs": max_epochs, "seed": seed,
        "accelerator": accelerator, "devices": devices, "strategy": strategy, "precision": precision,
        "checkpoint_every_n_steps": checkpoint_every_n_steps, "progress": progress,
        "allow_config_change": allow_config_change, "callbacks": callbacks,
    }  # fmt: skip

    def run(rows: np.ndarray, run_dir: Path, weight: float, tag: str) -> ScadNet:
        torch.manual_seed(seed)
        net = ScadNet(head)
        net.norm.fit(torch.as_tensor(xb[rows]))

        def collate(idx: list[int]) -> dict[str, torch.Tensor]:
            r = rows[np.asarray(idx)]
            # The single-cell batch is a pure function of the bulk batch, so a resumed run draws the same one.
            rng = np.random.default_rng([seed, *r.tolist()])
            s = rng.choice(len(xs), size=len(r), replace=len(xs) < len(r))
            return {
                "x": torch.as_tensor(xb[r]),
                "y": torch.as_tensor(y[r], dtype=torch.float32),
                "x_sc": torch.as_tensor(xs[s]),
            }

        cfg = {"run": tag, "n_bulk": len(rows), "adv_weight": weight, "head": head.model_dump(mode="json")}
        train_head(net, _objective(weight), _Indices(len(rows)), collate, run_dir, run_config=cfg, **common)
        return net

    oof = pd.DataFrame({"sample": bulk_a.obs_names.astype(str), "label": y, "fold": fold})
    sc_pred = pd.DataFrame({"cell": sc_a.obs_names.astype(str)})
    per_fold = []
    for k in range(folds):
        test, train = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        done_b, done_s = (
            root / f"fold-{k}" / "bulk_predictions.csv",
            root / f"fold-{k}" / "sc_predictions.csv",
        )
        if not (done_b.exists() and done_s.exists()):
            from sklearn.linear_model import LogisticRegression
            from sklearn.preprocessing import StandardScaler

            pb, ps = {}, {}
            for method, weight in (("scad", adv_weight), ("no_adversarial", 0.0)):
                net = run(train, root / f"fold-{k}" / method, weight, f"fold-{k}/{method}")
                pb[method], ps[method] = _proba(net, xb[test]), _proba(net, xs)
            scaler = StandardScaler().fit(xb[train])
            lr_model = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(xb[train]), y[train])
            pb["logistic"] = lr_model.predict_proba(scaler.transform(xb[test]))[:, 1]
            ps["logistic"] = lr_model.predict_proba(scaler.transform(xs))[:, 1]
            atomic_write_text(done_s, pd.DataFrame(ps).to_csv(index=False))
            atomic_write_text(done_b, pd.DataFrame(pb).to_csv(index=False))
        pb_df, ps_df = pd.read_csv(done_b), pd.read_csv(done_s)
        if len(pb_df) != len(test) or len(ps_df) != len(xs):
            msg = f"{done_b.parent} holds predictions of other inputs; delete it and rerun."
            raise CheckpointError(msg)
        for m in METHODS:
            oof.loc[test, m] = pb_df[m].to_numpy()
            sc_pred[f"{m}_fold{k}"] = ps_df[m].to_numpy()
            row: dict[str, Any] = {"fold": k, "method": m, "bulk_auroc": _auroc(y[test], pb_df[m].to_numpy())}
            if y_sc is not None:
                row["sc_auroc"] = _auroc(y_sc, ps_df[m].to_numpy())
            per_fold.append(row)
    overall: dict[str, dict[str, float]] = {}
    for m in METHODS:
        overall[m] = {"bulk_auroc": _auroc(y, oof[m].to_numpy())}
        if y_sc is not None:
            overall[m]["sc_auroc"] = float(np.mean([r["sc_auroc"] for r in per_fold if r["method"] == m]))
    final = run(np.arange(len(y)), root / "final", adv_weight, "final")
    spec = SensitivityCheckpointConfig(
        head=head, bulk=bulk_cfg, single_cell=sc_cfg, bulk_labels_key=bulk_labels_key, adv_weight=adv_weight
    )
    save_checkpoint(
        target,
        family=SENSITIVITY_FAMILY,
        config=spec,
        state_dict=final.state_dict(),
        extra_meta={"n_bulk": len(y), "n_single_cells": len(xs), "folds": folds, "cv": overall},
    )
    rows = per_fold + [{"fold": "all", "method": m, **overall[m]} for m in METHODS]
    atomic_write_text(target / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_text(target / "cv_predictions.csv", oof.to_csv(index=False))
    if y_sc is not None:
        sc_pred.insert(1, "label", y_sc)
    atomic_write_text(target / "sc_predictions.csv", sc_pred.to_csv(index=False))
    metrics: dict[str, Any] = {**overall, "per_fold": per_fold, "n_bulk": len(y), "n_single_cells": len(xs)}
    return TrainResult(run_dir=root, checkpoint=target, metrics=metrics)


def load_sensitivity_model(checkpoint: Any) -> tuple[ScadNet, SensitivityCheckpointConfig, Path]:
    """The network of a ``sensitivity_fit`` checkpoint."""
    path = Path(os.fspath(checkpoint))
    ckpt = load_checkpoint(path)
    if ckpt.family != SENSITIVITY_FAMILY:
        msg = f"{path} is a {ckpt.family!r} checkpoint; sensitivity_predict needs one written by sensitivity_fit."
        raise CheckpointError(msg)
    spec = SensitivityCheckpointConfig(**ckpt.config)
    net = ScadNet(spec.head)
    try:
        net.load_state_dict(ckpt.state_dict)
    except RuntimeError as err:
        msg = f"The weights in {path} do not fit its config: {err}"
        raise CheckpointError(msg) from err
    return net.eval(), spec, path


def sensitivity_predict(
    data: AnnData | PathLike,
    checkpoint: Any,
    *,
    key_added: str = "scfoundation",
    use_rep: str | None = None,
    backbone: Any = None,
    target_depth: str | None = None,
    batch_size: int = 4096,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
    out: PathLike | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Label cells sensitive/resistant with a ``sensitivity_fit`` model.

    Writes ``obs["<key>_sensitive"]`` (``sensitive``/``resistant``), ``obs["<key>_sensitivity_confidence"]`` (the
    probability of the predicted label), ``obs["<key>_sensitivity_probability"]`` (probability of sensitive) and
    ``uns[<key>]["sensitivity_predict"]``.

    Args:
        data: single cells (or bulk samples with ``target_depth="f1"``), or a path.
        checkpoint: the model directory or its ``TrainResult``.
        key_added: prefix of what is added.
        use_rep: embeddings from ``obsm[use_rep]`` (default: the model's setting).
        backbone: scFoundation checkpoint for the embeddings (default: the one recorded at training).
        target_depth: embedding target depth (default: the single-cell setting of the model, ``t4``).
        batch_size, device, progress, copy, out, overwrite: as in ``embed``.
        **read_options: :class:`msfm.data.CellReadOptions`.
    """
    check_key_added(key_added)
    parse_read_options(sensitivity_predict, read_options)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
    net, spec, path = load_sensitivity_model(checkpoint)
    adata = as_anndata(data, copy=copy)
    cfg = spec.single_cell
    rep = use_rep if use_rep is not None else cfg.use_rep
    if rep is None and backbone is None:
        backbone = cfg.backbone
        if backbone is None or not Path(backbone).exists():
            msg = f"The model's backbone {cfg.backbone!r} is not available here; pass backbone=... or use_rep=..."
            raise CheckpointError(msg)
    x, _ = cell_embeddings(
        adata, backbone, use_rep=rep, target_depth=target_depth or cfg.target_depth, pool=cfg.pool,
        read_options=dict(read_options), device=device, progress=progress,
    )  # fmt: skip
    if x.shape[1] != spec.head.in_dim:
        msg = f"The embeddings have {x.shape[1]} dimensions but the model {path} expects {spec.head.in_dim}."
        raise MsfmInputError(msg)
    from msfm.runtime.devices import resolve_device

    p = _proba(net, x, batch_size=batch_size, device=resolve_device(device))
    sensitive = p >= 0.5
    adata.obs[field_key(key_added, "sensitive")] = pd.Categorical(
        np.where(sensitive, "sensitive", "resistant"), categories=["resistant", "sensitive"]
    )
    adata.obs[field_key(key_added, "sensitivity_confidence")] = np.where(sensitive, p, 1 - p)
    adata.obs[field_key(key_added, "sensitivity_probability")] = p
    record = {
        "checkpoint": str(path),
        "key_added": key_added,
        "embedding": cfg.model_dump(mode="json")
        | {"use_rep": rep, "target_depth": target_depth or cfg.target_depth},
        "bulk_labels_key": spec.bulk_labels_key,
    }
    store_uns(adata, key_added, "sensitivity_predict", record)
    write_output(adata, out, data, replace=overwrite)
    return adata
