"""Fine-tuned niche annotation (paper §4.4, Fig. 2d): niche sequence -> mean-pooled hidden states -> linear layer.

``fit_classifier(data, checkpoint, labels_key="region", out=RUN)`` fine-tunes the whole GeST backbone plus a
linear head through the shared engine (resumable run directory, DDP/FSDP, precision) and exports ``RUN/model``;
``predict(data, RUN/model)`` writes ``obs['gest_<labels_key>']``, ``obs['gest_confidence']`` and
``obsm['gest_probs']``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from pydantic import BaseModel, ConfigDict, Field, model_validator

from msfm.data.options import SpatialReadOptions
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.objective import LossOutput
from msfm.engine.resume import check_resume
from msfm.engine.sampler import ResumableDataLoader
from msfm.engine.trainer import ExportCallback, TrainerOptions, build_trainer, fit
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.gest.checkpoint import (
    NICHE_FAMILY,
    VOCAB_PREFIX,
    CheckpointLike,
    generative_model,
    is_classifier,
    load,
    window_settings,
)
from msfm.models.gest.data import cell_selection, spatial_cells
from msfm.models.gest.files import DataLike, read_data
from msfm.models.gest.model import GestBlock, GestNicheClassifier
from msfm.models.gest.niches import niche_sequences, niche_tensors
from msfm.models.gest.options import nest_read_options
from msfm.models.gest.pretrain import final_metrics
from msfm.runtime.adata import check_key_added, field_key, store_uns
from msfm.runtime.config import build_settings
from msfm.runtime.h5ad import check_output, write_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.progress import progress_bar
from msfm.runtime.results import TrainResult

logger = logging.getLogger(__name__)

__all__ = ["NicheClassifierConfig", "fit_classifier", "predict"]

PathLike = str | os.PathLike[str]


class NicheClassifierConfig(BaseModel):
    """Settings of a niche-annotation fine-tuning run (stored in ``RUN/config.json``).

    Attributes:
        labels_key: ``obs`` column with the niche labels (``fit_classifier(labels_key=...)`` sets it).
        side_um: niche window side (None: the backbone's trained side).
        max_cells: cells per niche sequence (centre included).
        val_fraction: share of labelled cells held out for validation (random; stratified by label).
        batch_size: niches per batch.
        dropout: dropout before the linear layer.
        optim: optimiser (the backbone gets ``backbone_lr_multiplier`` times the head's lr).
        backbone_lr_multiplier: lr of the backbone relative to the head.
        trainer: hardware, steps, precision.
        seed: seed of the split, the initialisation and the batch order.
        read: how to read the data (:class:`msfm.data.SpatialReadOptions`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels_key: str | None = None
    side_um: float | None = Field(None, gt=0)
    max_cells: int = Field(64, ge=1)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    batch_size: int = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=20, min_lr_ratio=0.1)
    backbone_lr_multiplier: float = Field(0.1, gt=0.0)
    trainer: TrainerOptions = TrainerOptions(max_steps=300, checkpoint_every_n_steps=100)
    seed: int = 0
    read: SpatialReadOptions = SpatialReadOptions()

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        # Older settings files: label_key, and reading options at the top level.
        if isinstance(data, Mapping) and "label_key" in data:
            data = {k: v for k, v in data.items() if k != "label_key"} | {
                "labels_key": data.get("labels_key") or data["label_key"]
            }
        return nest_read_options(data)


class _NicheData(torch.utils.data.Dataset):
    def __init__(
        self, xy: np.ndarray, tokens: np.ndarray, seqs: list[np.ndarray], labels: np.ndarray, side_um: float
    ) -> None:
        self.xy, self.tokens, self.seqs, self.labels, self.side = xy, tokens, seqs, labels, side_um

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = niche_tensors(self.xy, self.tokens, [self.seqs[i] for i in idx], self.side)
        batch["labels"] = torch.as_tensor(self.labels[idx], dtype=torch.long)
        return batch


def _objective(model: GestNicheClassifier, batch: dict[str, torch.Tensor]) -> LossOutput:
    logits = model(batch["query_pos"], batch["content_pos"], batch["tokens"], mask=batch["mask"])
    loss = F.cross_entropy(logits, batch["labels"])
    acc = (logits.argmax(-1) == batch["labels"]).float().mean()
    return LossOutput(loss=loss, components={"acc": acc.detach()}, n=int(batch["labels"].numel()))


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 11])
    val: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = round(val_fraction * idx.size) if idx.size > 1 else 0
        val.extend(idx[:n_val].tolist())
    val_arr = np.sort(np.asarray(val, dtype=np.int64))
    train_arr = np.setdiff1d(np.arange(labels.size), val_arr)
    return train_arr, val_arr


def _settings(
    config: NicheClassifierConfig | Mapping[str, Any] | PathLike | None,
    labels_key: str,
    overrides: dict[str, Any],
) -> NicheClassifierConfig:
    overrides = {**overrides, "labels_key": labels_key}
    if overrides.get("seed") is not None:
        overrides.setdefault("trainer.seed", overrides["seed"])
    what = "NicheClassifierConfig"
    if isinstance(config, str | os.PathLike):
        return build_settings(
            NicheClassifierConfig, base=NicheClassifierConfig(), file=config, overrides=overrides, what=what
        )
    base = NicheClassifierConfig() if config is None else config
    return build_settings(NicheClassifierConfig, base=base, overrides=overrides, what=what)


def fit_classifier(
    data: DataLike,
    checkpoint: CheckpointLike,
    *,
    labels_key: str,
    out: PathLike,
    config: NicheClassifierConfig | Mapping[str, Any] | PathLike | None = None,
    cells: Any = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune GeST plus a linear head to predict niche labels; resumes a killed run in ``out``.

    Args:
        data: cells with coordinates, expression and ``obs[labels_key]`` (AnnData, file or Visium folder); never
            modified.
        checkpoint: a pretrained GeST checkpoint (the backbone).
        labels_key: ``obs`` column with the niche labels.
        out: run directory (``out/model`` is the classifier checkpoint); a killed run there resumes, with other
            settings than it started with only when ``allow_config_change=True`` (recorded in ``config.json``).
        config: run settings: a :class:`NicheClassifierConfig`, a mapping of its fields, or a YAML/JSON file.
        cells: labelled cells to train and validate on (default: every cell with a label; all cells serve as
            neighbours).
        **overrides: flat settings on top of ``config`` (``max_steps=``, ``lr=``, ``max_cells=``, ``devices=``,
            reading options such as ``pre_normalized=``).

    Returns:
        ``TrainResult(run_dir=out, checkpoint=out/model, metrics)``; pass it to :func:`predict`.

    Raises:
        MsfmInputError: unknown settings, missing label column, fewer than two classes.
        ConfigChangedError: ``out`` holds a run started with other settings (named as ``old -> new``).
    """
    settings = _settings(config, labels_key, overrides)
    run = check_output(out, overwrite=True, data=data, create_parents=True)
    # Before the data is read: a resumed run keeps the settings it was started with.
    check_resume(run, trainer=settings.trainer, run_config=settings.model_dump(mode="json"))
    adata = read_data(data)
    if labels_key not in adata.obs:
        msg = f"labels_key={labels_key!r} is not an obs column; columns are {list(adata.obs.columns)[:20]}."
        raise MsfmInputError(msg)
    loaded = load(checkpoint, device="cpu")
    backbone = generative_model(loaded, "fit_classifier")
    if isinstance(checkpoint, Loaded):  # fine-tuning must not change the caller's model
        backbone = copy.deepcopy(backbone)
    prep = spatial_cells(adata, loaded.vocab.genes, settings.read)
    raw = adata.obs[labels_key]
    has = raw.notna().to_numpy()
    if cells is not None:
        has &= cell_selection(adata, cells, "cells")
    classes = sorted({str(v) for v in raw[has]})
    if len(classes) < 2:
        msg = f"obs[{labels_key!r}] has {len(classes)} class(es) among the selected cells; need at least 2."
        raise MsfmInputError(msg)
    centers = np.flatnonzero(has)
    labels = np.asarray([classes.index(str(v)) for v in raw.to_numpy()[centers]], dtype=np.int64)
    win = window_settings(loaded)
    side = float(settings.side_um or win.side_um)
    tokens = loaded.vocab.assign(prep.expr)
    seqs = niche_sequences(prep.xy, prep.section, centers, side_um=side, max_cells=settings.max_cells)
    tr, va = _split(labels, settings.val_fraction, settings.seed)
    train_ds = _NicheData(prep.xy, tokens, [seqs[i] for i in tr], labels[tr], side)
    val_ds = _NicheData(prep.xy, tokens, [seqs[i] for i in va], labels[va], side)
    torch.manual_seed(settings.seed)
    clf = GestNicheClassifier(backbone.train(), len(classes), dropout=settings.dropout)
    optim = settings.optim.model_copy(
        update={"lr_multipliers": {"backbone": settings.backbone_lr_multiplier}}
    )
    module = MsfmLightningModule(clf, _objective, optim)
    # Resumable: a plain shuffled DataLoader restarts its epoch at the first batch after a resume, so a killed and
    # resumed fit would see other batches than an uninterrupted one.
    loader = ResumableDataLoader(
        train_ds,
        batch_size=settings.batch_size,
        shuffle=True,
        seed=settings.seed,
        collate_fn=train_ds.collate,
        drop_last=len(train_ds) > settings.batch_size,
    )
    val_loader = (
        torch.utils.data.DataLoader(
            val_ds, batch_size=settings.batch_size, shuffle=False, collate_fn=val_ds.collate
        )
        if len(val_ds)
        else None
    )
    vocab_tensors = {VOCAB_PREFIX + k: v for k, v in loaded.vocab.to_tensors().items()}

    def export_state(lightning_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {k[len("model.") :]: v for k, v in lightning_state.items() if k.startswith("model.")}
        return {**state, **vocab_tensors}

    export = ExportCallback(
        NICHE_FAMILY,
        loaded.config,
        gene_panel=list(loaded.vocab.genes),
        gene_panel_name="gest",
        preprocessing=loaded.preprocessing,
        get_state_dict=export_state,
        extra_meta={
            "classes": classes,
            "labels_key": labels_key,
            "window": {**win.as_dict(), "niche_side_um": side, "niche_max_cells": settings.max_cells},
            "vocab": loaded.vocab.meta_dict(),
            "backbone": str(loaded.path) if loaded.path else None,
            "n_train": int(tr.size),
            "n_val": int(va.size),
        },
    )
    wrap = [GestBlock] if settings.trainer.strategy.startswith("fsdp") else None
    kwargs: dict[str, Any] = {} if val_loader is not None else {"limit_val_batches": 0}
    trainer = build_trainer(
        settings.trainer, run, callbacks=[export], fsdp_wrap_layers=wrap, trainer_kwargs=kwargs
    )
    fit(trainer, module, loader, run, val_dataloaders=val_loader, run_config=settings.model_dump(mode="json"))
    return TrainResult(run_dir=run, checkpoint=run / "model", metrics=final_metrics(trainer))


@torch.no_grad()
def predict(
    data: DataLike,
    checkpoint: CheckpointLike,
    *,
    key_added: str = "gest",
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
    out: PathLike | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Predict niche labels with a fine-tuned classifier (:func:`fit_classifier`).

    Args:
        data: cells with coordinates and expression (AnnData, file or Visium folder).
        checkpoint: the niche classifier (``RUN/model`` of :func:`fit_classifier`, its ``TrainResult``, or a
            ``Loaded``).
        key_added: prefix of what is added (below).
        batch_size: niches per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show a progress bar.
        copy: work on a copy of ``data``.
        out: also write the result to this ``.h5ad`` (atomically; never over the input).
        overwrite: replace an existing ``out``.
        **read_options: how to read ``data`` (:class:`msfm.data.SpatialReadOptions`).

    Returns:
        The AnnData with ``obs['<key>_<labels_key>']`` (categorical label), ``obs['<key>_confidence']`` (softmax
        probability of the label), ``obsm['<key>_probs']`` (``[n_obs, n_classes]``) and ``uns[<key>]['predict']``
        (classes, checkpoint).

    Raises:
        CheckpointError: the checkpoint is not a niche classifier.
        MsfmInputError: bad ``key_added``, bad data, an unknown keyword.
    """
    read = SpatialReadOptions.parse(
        read_options, verb_parameters=("key_added", "batch_size", "device", "copy", "out", "overwrite")
    )
    key = check_key_added(key_added)
    target = check_output(out, overwrite=overwrite, data=data)
    adata = read_data(data, copy=copy)
    loaded = load(checkpoint, device=device)
    if not is_classifier(loaded):
        msg = (
            f"{loaded.path or 'this checkpoint'} is a pretrained GeST model, not a niche classifier; "
            "train one with msfm.gest.fit_classifier and pass its RUN/model."
        )
        raise CheckpointError(msg)
    extra = loaded.extra
    classes = list(extra["classes"])
    labels_key = str(extra.get("labels_key") or extra.get("label_key") or "niche")
    prep = spatial_cells(adata, loaded.vocab.genes, read)
    tokens = loaded.vocab.assign(prep.expr)
    win = window_settings(loaded)
    side = float(win.niche_side_um or win.side_um)
    max_cells = int(win.niche_max_cells or 64)
    seqs = niche_sequences(prep.xy, prep.section, np.arange(adata.n_obs), side_um=side, max_cells=max_cells)
    clf = loaded.model
    dev = loaded.device
    probs = np.zeros((adata.n_obs, len(classes)), dtype=np.float32)
    with progress_bar(len(seqs), "gest predict", enabled=progress) as bar:
        for start in range(0, len(seqs), batch_size):
            batch = niche_tensors(prep.xy, tokens, seqs[start : start + batch_size], side)
            logits = clf(
                *(batch[k].to(dev) for k in ("query_pos", "content_pos", "tokens")),
                mask=batch["mask"].to(dev),
            )
            probs[start : start + len(logits)] = torch.softmax(logits.float(), -1).cpu().numpy()
            bar.update(len(logits))
    pred = probs.argmax(1)
    adata.obs[field_key(key, labels_key)] = pd.Categorical([classes[i] for i in pred], categories=classes)
    adata.obs[field_key(key, "confidence")] = probs.max(1)
    adata.obsm[field_key(key, "probs")] = probs
    store_uns(
        adata,
        key,
        "predict",
        {
            "classes": classes,
            "labels_key": labels_key,
            "checkpoint": str(loaded.path) if loaded.path else None,
            "niche_side_um": side,
            "niche_max_cells": max_cells,
        },
    )
    write_output(adata, target, data, replace=overwrite)
    return adata
