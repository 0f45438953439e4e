"""Drug response (DeepCDR-style): ``drug_fit`` cross-validates an ln(IC50) regressor over (cell line, drug) pairs
on scFoundation embeddings of bulk expression plus Morgan fingerprints; ``drug_predict`` applies it.

Official settings (scFoundation's DeepCDR integration): bulk expression, T = S, max pooling -> encoder width (768
for the released model). ``drug_fit`` defaults to ``target_depth="f1"`` (T = S = log10 of the total) and
``pool="max"``; pass ``pre_normalized=True`` for log-normalised bulk input as the authors did (msfm then uses
S = T = log10(sum of the values); the official bulk ``T`` mode used the sum itself, without log10).

Run layout: ``out`` is the final model (an msfm checkpoint directory of family ``scfoundation-drug-response``)
plus ``cv_predictions.csv`` and ``metrics.csv``; the training runs live beside it in ``.<out>.run/fold-<k>`` and
``.<out>.run/final``. A killed run resumes: finished folds are skipped, the interrupted one resumes from its last
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from msfm.data import CellSource, as_anndata
from msfm.data.drugs import (
    DrugTable,
    check_response_ids,
    morgan_fingerprints,
    read_drugs,
    read_responses,
)
from msfm.data.folds import assign_folds
from msfm.data.normalize import log1p_cp10k
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.objective import LossOutput
from msfm.engine.sampler import ResumableDataLoader
from msfm.engine.trainer import TrainerOptions, build_trainer, fit
from msfm.errors import CheckpointError, ConfigChangedError, MsfmInputError
from msfm.eval.regression import regression_scores
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.drug_config import (
    DrugResponseCheckpointConfig,
    DrugResponseHeadConfig,
    EmbeddingSettings,
)
from msfm.models.scfoundation.drug_heads import DrugResponseNet
from msfm.runtime.adata import check_key_added, field_key, store_uns
from msfm.runtime.atomic import atomic_write_json, atomic_write_text, check_output_free
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.h5ad import write_output
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.runtime.results import TrainResult

__all__ = ["DRUG_FAMILY", "drug_fit", "drug_predict"]

DRUG_FAMILY = "scfoundation-drug-response"
METHODS = ("model", "per_drug_mean", "ridge_expression", "ridge_embedding")
Split = Literal["pairs", "cell_lines", "drugs"]
PathLike = str | os.PathLike[str]


# ---- shared with drug_sensitivity ------------------------------------------------------------------------------


def cell_embeddings(
    adata: AnnData,
    checkpoint: Any,
    *,
    use_rep: str | None,
    target_depth: str,
    pool: str,
    read_options: dict[str, Any],
    device: str,
    progress: bool,
    what: str = "data",
    precision: str = "32",
) -> tuple[np.ndarray, EmbeddingSettings]:
    """``[n, d]`` float32 cell embeddings from ``obsm[use_rep]``, or computed with the backbone ``checkpoint``.

    ``precision`` is that of the embedding pass; the training verbs keep fp32, ``drug_predict`` passes its own.
    """
    if use_rep is not None:
        if use_rep not in adata.obsm:
            msg = (
                f"use_rep={use_rep!r} is not in {what}.obsm (it has {sorted(adata.obsm.keys())}). Run "
                "msfm.scfoundation.embed first (its key is 'X_scfoundation'), or drop use_rep to compute the "
                "embeddings from a checkpoint."
            )
            raise MsfmInputError(msg)
        x = np.asarray(adata.obsm[use_rep], dtype=np.float32)
        if x.ndim != 2 or not np.isfinite(x).all():
            msg = f"{what}.obsm[{use_rep!r}] must be a finite 2-D array; got shape {x.shape} with non-finite values or wrong rank."
            raise MsfmInputError(msg)
        return x, EmbeddingSettings(use_rep=use_rep, target_depth=target_depth, pool=pool)  # type: ignore[arg-type]
    if checkpoint is None:
        msg = f"No embeddings for {what}: pass a scFoundation checkpoint, or use_rep='X_scfoundation' with embeddings in obsm."
        raise MsfmInputError(msg)
    from msfm.models.scfoundation.embedding import embed

    done = embed(
        adata,
        checkpoint,
        key_added="drug_input",
        target_depth=target_depth,
        pool=pool,  # type: ignore[arg-type]
        device=device,
        precision=precision,
        progress=progress,
        copy=True,
        **read_options,
    )
    backbone = done.uns["drug_input"]["embed"].get("checkpoint", {})
    path = backbone.get("path") if isinstance(backbone, dict) else None
    path = str(Path(path).resolve()) if path else None
    path = path or (
        str(Path(os.fspath(checkpoint)).resolve()) if isinstance(checkpoint, str | os.PathLike) else None
    )
    settings = EmbeddingSettings(
        backbone=path,
        target_depth=target_depth,
        pool=pool,  # type: ignore[arg-type]
        pre_normalized=bool(read_options.get("pre_normalized", False)),
    )
    return np.asarray(done.obsm["X_drug_input"], dtype=np.float32), settings


def check_settings(root: Path, settings: dict[str, Any], *, allow_change: bool) -> None:
    """Refuse to resume a cross-validation run folder whose settings (or folds) differ from ``settings``."""
    path = root / "cv.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old != settings and not allow_change:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            detail = "; ".join(f"{k}: {old.get(k)!r:.60} -> {settings.get(k)!r:.60}" for k in changed[:8])
            msg = (
                f"The run folder {root} was started with other settings ({detail}). Rerun with the original "
                "settings, pass allow_config_change=True (CLI --allow-config-change) to keep its finished folds "
                "anyway, or delete the folder to start over."
            )
            raise ConfigChangedError(msg)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def digest(*arrays: np.ndarray) -> str:
    """Short hash of arrays (detects changed inputs of a resumed run)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def train_head(
    net: torch.nn.Module,
    objective: Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput],
    dataset: torch.utils.data.Dataset,
    collate: Callable[[list[int]], dict[str, torch.Tensor]],
    run_dir: Path,
    *,
    run_config: dict[str, Any],
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    seed: int,
    accelerator: str,
    devices: int | str | list[int],
    strategy: str,
    precision: str,
    checkpoint_every_n_steps: int,
    progress: bool,
    allow_config_change: bool,
    callbacks: Sequence[Any],
) -> dict[str, float]:
    """Train ``net`` through the engine in ``run_dir`` (resuming from its last checkpoint); returns its metrics."""
    loader = ResumableDataLoader(dataset, batch_size=batch_size, shuffle=True, seed=seed, collate_fn=collate)
    module = MsfmLightningModule(
        net, objective, OptimConfig(lr=lr, weight_decay=weight_decay, warmup_steps=0, schedule="constant")
    )
    options = TrainerOptions(
        accelerator=accelerator,  # type: ignore[arg-type]
        devices=devices,
        strategy=strategy,
        precision=precision,  # type: ignore[arg-type]
        max_epochs=max_epochs,
        seed=seed,
        progress_bar=progress,
        model_summary=False,
        log_every_n_steps=max(1, min(50, len(loader))),
        checkpoint_every_n_steps=checkpoint_every_n_steps,
        allow_config_change=allow_config_change,
    )
    trainer = build_trainer(options, run_dir, callbacks=list(callbacks))
    fit(trainer, module, loader, run_dir, run_config=run_config)
    net.eval()
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


# ---- drug response -------------------------------------------------------------------------------------------


def _objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    net: DrugResponseNet = model  # type: ignore[assignment]
    target = (batch["y"] - net.y_mean) / net.y_std
    loss = torch.nn.functional.mse_loss(net.scaled(batch["cell"], batch["fingerprint"]), target)
    return LossOutput(loss=loss, n=int(target.shape[0]))


@torch.inference_mode()
def _predict_pairs(
    net: DrugResponseNet,
    emb: np.ndarray,
    fps: np.ndarray,
    ci: np.ndarray,
    di: np.ndarray,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """ln(IC50) of the pairs ``(ci[j], di[j])``."""
    net.eval().to(device)
    out = np.empty(len(ci), dtype=np.float64)
    for s in range(0, len(ci), batch_size):
        c = torch.as_tensor(emb[ci[s : s + batch_size]], device=device)
        f = torch.as_tensor(fps[di[s : s + batch_size]], device=device)
        out[s : s + batch_size] = net(c, f).double().cpu().numpy()
    return out


def _expression(adata: AnnData, read_options: dict[str, Any]) -> np.ndarray:
    """Log-normalised expression (log1p CP10k of counts, or the values as given with ``pre_normalized``)."""
    source = CellSource(
        adata, layer=read_options.get("layer"), pre_normalized=bool(read_options.get("pre_normalized", False))
    )
    rows = source.rows(np.arange(source.n_obs))
    if source.kind == "counts":
        rows = log1p_cp10k(rows)
    return np.asarray(rows.toarray(), dtype=np.float64)


def _baselines(
    expr: np.ndarray,
    emb: np.ndarray,
    fps: np.ndarray,
    ci: np.ndarray,
    di: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    seed: int,
) -> dict[str, np.ndarray]:
    """Per-drug mean and two ridge regressions, fitted on ``train`` pairs and predicted on ``test`` pairs."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    out: dict[str, np.ndarray] = {}
    global_mean = float(y[train].mean())
    means = pd.Series(y[train]).groupby(di[train]).mean()
    out["per_drug_mean"] = np.array([means.get(d, global_mean) for d in di[test]], dtype=np.float64)
    train_cells = np.unique(ci[train])
    n_comp = int(max(1, min(20, len(train_cells) - 1, expr.shape[1])))
    pca = PCA(n_components=n_comp, random_state=seed).fit(expr[train_cells])
    for name, cell_x in (
        ("ridge_expression", pca.transform(expr)),
        ("ridge_embedding", emb.astype(np.float64)),
    ):
        scaler = StandardScaler().fit(cell_x[train_cells])
        cx = scaler.transform(cell_x)
        x_train = np.hstack([cx[ci[train]], fps[di[train]]])
        x_test = np.hstack([cx[ci[test]], fps[di[test]]])
        out[name] = Ridge(alpha=10.0).fit(x_train, y[train]).predict(x_test)
    return out


def drug_fit(
    data: AnnData | PathLike,
    checkpoint: Any,
    *,
    responses: pd.DataFrame | PathLike,
    drugs: pd.DataFrame | PathLike | dict[str, str] | DrugTable,
    out: PathLike,
    use_rep: str | None = None,
    folds: int = 5,
    split: Split = "pairs",
    cell_column: str = "cell_line",
    drug_column: str = "drug_id",
    value_column: str = "ln_ic50",
    drug_id_column: str = "drug_id",
    smiles_column: str = "smiles",
    fingerprint_radius: int = 2,
    fingerprint_bits: int = 1024,
    target_depth: str = "f1",
    pool: Literal["max", "all"] = "max",
    hidden: int = 256,
    dropout: float = 0.1,
    max_epochs: int = 50,
    batch_size: int = 128,
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
    """Cross-validate and train an ln(IC50) regressor on (cell line, drug) pairs.

    Args:
        data: bulk expression, cell lines x genes (``obs_names`` = the cell-line ids of ``responses``), or a path.
        checkpoint: the scFoundation backbone for the embeddings (None with ``use_rep``).
        responses: response table (CSV/TSV path or DataFrame): ``cell_column``, ``drug_column``, ``value_column``
            (ln IC50).
        drugs: drug table: ``drug_id_column`` and ``smiles_column`` (path, DataFrame or ``{id: smiles}``).
        out: model directory to write (with ``cv_predictions.csv`` and ``metrics.csv``).
        use_rep: take the cell embeddings from ``obsm[use_rep]`` instead of computing them.
        folds: number of cross-validation folds.
        split: what a fold holds out: random ``pairs``, whole ``cell_lines`` or whole ``drugs``.
        fingerprint_radius, fingerprint_bits: Morgan fingerprint settings.
        target_depth, pool: embedding settings (official DeepCDR: T = S -> ``f1``, ``max``).
        hidden, dropout: head size.
        max_epochs, batch_size, lr, weight_decay, seed: training loop (AdamW, constant lr).
        accelerator, devices, strategy, precision, checkpoint_every_n_steps: Lightning settings.
        device: device of the embedding pass.
        progress: show progress bars.
        overwrite: replace an existing ``out``.
        allow_config_change: resume a run folder although its settings changed.
        callbacks: extra Lightning callbacks for every training run.
        **read_options: :class:`msfm.data.CellReadOptions` (``pre_normalized=True`` for log-normalised bulk).

    Returns:
        ``TrainResult(run_dir, checkpoint=out, metrics)``: ``metrics[method]`` = out-of-fold PCC/SCC/RMSE for
        ``model``, ``per_drug_mean``, ``ridge_expression`` and ``ridge_embedding``; ``metrics["per_fold"]`` rows.

    Raises:
        MsfmInputError: bad tables (unparsable SMILES, unknown ids, non-numeric ln IC50), ``folds`` larger than
            the units to hold out, ``use_rep`` missing, RDKit missing.
    """
    options = parse_read_options(drug_fit, read_options)
    read = {k: v for k, v in read_options.items()}
    if split not in ("pairs", "cell_lines", "drugs"):
        msg = f"split must be 'pairs', 'cell_lines' or 'drugs'; got {split!r}."
        raise MsfmInputError(msg)
    target = check_output_free(out, overwrite=overwrite)
    adata = as_anndata(data)
    table = read_drugs(drugs, id_column=drug_id_column, smiles_column=smiles_column)
    resp = read_responses(
        responses,
        kind="regression",
        cell_column=cell_column,
        drug_column=drug_column,
        value_column=value_column,
    )
    if len(resp) == 0:
        msg = "The response table has no rows."
        raise MsfmInputError(msg)
    check_response_ids(resp, adata.obs_names, table)
    fps = morgan_fingerprints(table, radius=fingerprint_radius, n_bits=fingerprint_bits)
    cell_index = {c: i for i, c in enumerate(map(str, adata.obs_names))}
    ci = resp["cell_line"].map(cell_index).to_numpy(dtype=np.int64)
    di = resp["drug_id"].map(table.index()).to_numpy(dtype=np.int64)
    y = resp["value"].to_numpy(dtype=np.float64)
    groups = {"pairs": None, "cell_lines": ci, "drugs": di}[split]
    what = {"pairs": "pairs", "cell_lines": "cell lines", "drugs": "drugs"}[split]
    fold = assign_folds(len(y), folds=folds, seed=seed, groups=groups, what=what)
    emb, emb_settings = cell_embeddings(
        adata,
        checkpoint,
        use_rep=use_rep,
        target_depth=target_depth,
        pool=pool,
        read_options=read,
        device=device,
        progress=progress,
    )
    expr = _expression(adata, options.model_dump())
    head = DrugResponseHeadConfig(
        cell_dim=emb.shape[1],
        fingerprint_bits=fingerprint_bits,
        fingerprint_radius=fingerprint_radius,
        hidden=hidden,
        dropout=dropout,
    )
    root = target.with_name(f".{target.name}.run")
    train_cfg = {
        "batch_size": batch_size,
        "max_epochs_per_fold": max_epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
    }
    check_settings(
        root,
        {
            "verb": "drug_fit",
            "folds": folds,
            "split": split,
            "head": head.model_dump(mode="json"),
            "embedding": emb_settings.model_dump(mode="json"),
            "inputs": digest(emb, fps, ci, di, y),
            **train_cfg,
        },
        allow_change=allow_config_change,
    )
    common = {
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "max_epochs": max_epochs,
        "seed": seed,
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "precision": precision,
        "checkpoint_every_n_steps": checkpoint_every_n_steps,
        "progress": progress,
        "allow_config_change": allow_config_change,
        "callbacks": callbacks,
    }

    def run(rows: np.ndarray, run_dir: Path, k: int | str) -> DrugResponseNet:
        torch.manual_seed(seed)
        net = DrugResponseNet(head)
        net.cell_norm.fit(torch.as_tensor(emb[np.unique(ci[rows])]))
        net.set_target_scale(torch.as_tensor(y[rows], dtype=torch.float32))

        def collate(idx: list[int]) -> dict[str, torch.Tensor]:
            r = rows[np.asarray(idx)]
            return {
                "cell": torch.as_tensor(emb[ci[r]]),
                "fingerprint": torch.as_tensor(fps[di[r]]),
                "y": torch.as_tensor(y[r], dtype=torch.float32),
            }

        run_config = {"fold": k, "n_pairs": len(rows), "head": head.model_dump(mode="json")}
        train_head(net, _objective, _Indices(len(rows)), collate, run_dir, run_config=run_config, **common)
        return net

    oof = pd.DataFrame(
        {"cell_line": resp["cell_line"], "drug_id": resp["drug_id"], "ln_ic50": y, "fold": fold}
    )
    for m in METHODS:
        oof[m] = np.nan
    per_fold = []
    for k in range(folds):
        test = np.flatnonzero(fold == k)
        train = np.flatnonzero(fold != k)
        fold_dir = root / f"fold-{k}"
        done = fold_dir / "predictions.csv"
        if done.exists():
            preds = pd.read_csv(done)
            if len(preds) != len(test):
                msg = f"{done} holds {len(preds)} predictions for {len(test)} held-out pairs; delete {fold_dir} and rerun."
                raise CheckpointError(msg)
        else:
            net = run(train, fold_dir, k)
            preds = pd.DataFrame({"model": _predict_pairs(net, emb, fps, ci[test], di[test])})
            for name, values in _baselines(expr, emb, fps, ci, di, y, train, test, seed).items():
                preds[name] = values
            atomic_write_text(done, preds.to_csv(index=False))
        for m in METHODS:
            oof.loc[test, m] = preds[m].to_numpy()
            per_fold.append({"fold": k, "method": m, **regression_scores(y[test], preds[m].to_numpy())})
    overall = {m: regression_scores(y, oof[m].to_numpy()) for m in METHODS}
    final = run(np.arange(len(y)), root / "final", "final")
    spec = DrugResponseCheckpointConfig(
        head=head, drug_ids=table.ids, smiles=table.smiles, embedding=emb_settings
    )
    save_checkpoint(
        target,
        family=DRUG_FAMILY,
        config=spec,
        state_dict=final.state_dict(),
        extra_meta={"n_pairs": len(y), "folds": folds, "split": split, "cv": overall},
    )
    rows = per_fold + [{"fold": "all", "method": m, **overall[m]} for m in METHODS]
    atomic_write_text(target / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_text(target / "cv_predictions.csv", oof.to_csv(index=False))
    metrics: dict[str, Any] = {
        **overall,
        "per_fold": per_fold,
        "n_pairs": len(y),
        "split": split,
        "folds": folds,
    }
    return TrainResult(run_dir=root, checkpoint=target, metrics=metrics)


def load_drug_model(checkpoint: Any) -> tuple[DrugResponseNet, DrugResponseCheckpointConfig, Path]:
    """The regressor of a ``drug_fit`` checkpoint (a directory or its ``TrainResult``)."""
    path = Path(os.fspath(checkpoint))
    ckpt = load_checkpoint(path)
    if ckpt.family != DRUG_FAMILY:
        msg = (
            f"{path} is a {ckpt.family!r} checkpoint; drug_predict needs one written by drug_fit "
            f"(family {DRUG_FAMILY!r})."
        )
        raise CheckpointError(msg)
    spec = DrugResponseCheckpointConfig(**ckpt.config)
    net = DrugResponseNet(spec.head)
    try:
        net.load_state_dict(ckpt.state_dict)
    except RuntimeError as err:
        msg = f"The weights in {path} do not fit its config: {err}"
        raise CheckpointError(msg) from err
    return net.eval(), spec, path


def drug_predict(
    data: AnnData | PathLike,
    checkpoint: Any,
    *,
    drugs: pd.DataFrame | PathLike | dict[str, str] | DrugTable | None = None,
    pairs: pd.DataFrame | PathLike | None = None,
    key_added: str = "scfoundation",
    use_rep: str | None = None,
    backbone: Any = None,
    drug_id_column: str = "drug_id",
    smiles_column: str = "smiles",
    cell_column: str = "cell_line",
    drug_column: str = "drug_id",
    batch_size: int = 1024,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    copy: bool = False,
    out: PathLike | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Predict ln(IC50) of every cell line x drug with a ``drug_fit`` model.

    Writes ``obsm["<key>_ic50"]``: a DataFrame (rows = ``obs_names``, one column per drug id; the column order is
    also in ``uns[<key>]["drug_predict"]["drugs"]``). With ``pairs`` (a table of ``cell_column, drug_column``)
    only those pairs are predicted; the other cells are NaN.

    Args:
        data: bulk expression of the cell lines (or a path).
        checkpoint: the ``drug_fit`` model directory or its ``TrainResult``.
        drugs: drug table (default: the drugs the model was trained with); new drugs only need SMILES.
        pairs: restrict to these (cell line, drug) pairs.
        key_added: prefix of what is added.
        use_rep: embeddings from ``obsm[use_rep]`` (default: the model's own setting; computed with its backbone).
        backbone: scFoundation checkpoint for the embeddings (default: the one recorded at training).
        batch_size: pairs per forward pass.
        device, precision: where the embedding pass and the head run (``precision`` applies to the embedding;
            ``auto`` picks bf16 where the device computes it fast, else fp32, recorded in
            ``uns[key_added]["drug_predict"]["precision"]``).
        progress, copy, out, overwrite: as in ``embed``.
        **read_options: :class:`msfm.data.CellReadOptions` (default: the ones used at training).

    Returns:
        The AnnData with the predictions.
    """
    check_key_added(key_added)
    canonical_precision(precision)
    parse_read_options(drug_predict, read_options)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
    net, spec, path = load_drug_model(checkpoint)
    table = (
        DrugTable(spec.drug_ids, spec.smiles)
        if drugs is None
        else read_drugs(drugs, id_column=drug_id_column, smiles_column=smiles_column)
    )
    fps = morgan_fingerprints(table, radius=spec.head.fingerprint_radius, n_bits=spec.head.fingerprint_bits)
    adata = as_anndata(data, copy=copy)
    emb_cfg = spec.embedding
    rep = use_rep if use_rep is not None else emb_cfg.use_rep
    read = dict(read_options)
    read.setdefault("pre_normalized", emb_cfg.pre_normalized)
    if rep is None and backbone is None:
        backbone = emb_cfg.backbone
        if backbone is None or not Path(backbone).exists():
            msg = f"The model's backbone {emb_cfg.backbone!r} is not available here; pass backbone=... (CLI --backbone) or use_rep=..."
            raise CheckpointError(msg)
    from msfm.runtime.devices import resolve_device

    dev = resolve_device(device)
    choice = resolve_precision(precision, dev)
    emb, _ = cell_embeddings(
        adata,
        backbone,
        use_rep=rep,
        target_depth=emb_cfg.target_depth,
        pool=emb_cfg.pool,
        read_options=read,
        device=device,
        progress=progress,
        precision=choice.precision,
    )
    if emb.shape[1] != spec.head.cell_dim:
        msg = (
            f"The embeddings have {emb.shape[1]} dimensions but the model {path} expects {spec.head.cell_dim}. "
            "Use the backbone and pooling it was trained with."
        )
        raise MsfmInputError(msg)
    n, m = adata.n_obs, len(table)
    ci = np.repeat(np.arange(n), m)
    di = np.tile(np.arange(m), n)
    keep = np.ones(n * m, dtype=bool)
    if pairs is not None:
        wanted = read_responses_pairs(pairs, cell_column=cell_column, drug_column=drug_column)
        check_response_ids(wanted, adata.obs_names, table)
        cidx = {c: i for i, c in enumerate(map(str, adata.obs_names))}
        flat = wanted["cell_line"].map(cidx).to_numpy() * m + wanted["drug_id"].map(table.index()).to_numpy()
        keep[:] = False
        keep[flat.astype(np.int64)] = True
    values = np.full(n * m, np.nan)
    values[keep] = _predict_pairs(net, emb, fps, ci[keep], di[keep], batch_size=batch_size, device=dev)
    frame = pd.DataFrame(values.reshape(n, m), index=adata.obs_names.copy(), columns=list(table.ids))
    adata.obsm[field_key(key_added, "ic50")] = frame
    record = {
        "checkpoint": str(path),
        "drugs": list(table.ids),
        "embedding": emb_cfg.model_dump(mode="json") | {"use_rep": rep},
        "n_pairs": int(keep.sum()),
        "key_added": key_added,
        "unit": "ln(IC50)",
        "precision": choice.record(),
    }
    store_uns(adata, key_added, "drug_predict", record)
    write_output(adata, out, data, replace=overwrite)
    return adata


def read_responses_pairs(
    source: pd.DataFrame | PathLike, *, cell_column: str, drug_column: str
) -> pd.DataFrame:
    """A pairs table (``cell_column, drug_column``) as ``cell_line, drug_id``."""
    df = (
        source
        if isinstance(source, pd.DataFrame)
        else pd.read_csv(source, sep=None, engine="python", dtype=str)
    )
    df = df.assign(_value="0")
    return read_responses(
        df, kind="regression", cell_column=cell_column, drug_column=drug_column, value_column="_value"
    )
