"""Fine-tuned niche annotation (paper §4.4, Fig. 2d): niche sequence -> mean-pooled hidden states -> linear layer.

``train_niche_classifier(adata, checkpoint, out, NicheClassifierConfig(label_key=...))`` fine-tunes the whole
GeST backbone plus a linear head through the shared engine (resumable run directory, DDP/FSDP, precision) and
exports ``out/model``; ``annotate_niches(adata, out / "model")`` writes ``obs['gest_niche_label']`` and
``obs['gest_niche_label_confidence']``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from pydantic import BaseModel, ConfigDict, Field

from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.objective import LossOutput
from msfm.engine.trainer import ExportCallback, TrainerOptions, build_trainer, fit
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.gest.api import (
    Checkpoint,
    cell_selection,
    niche_sequences,
    niche_tensors,
    prepare_cells,
    read_options,
)
from msfm.models.gest.checkpoint import VOCAB_PREFIX, LoadedGest, load_model
from msfm.models.gest.config import GestConfig
from msfm.models.gest.model import Gest, GestBlock, GestNicheClassifier
from msfm.runtime.checkpoint import load_checkpoint
from msfm.runtime.devices import resolve_device
from msfm.tokenizers.spatial import MetaCellVocab

logger = logging.getLogger(__name__)

__all__ = [
    "NICHE_FAMILY",
    "NicheClassifierConfig",
    "annotate_niches",
    "load_niche_classifier",
    "train_niche_classifier",
]

NICHE_FAMILY = "gest-niche"
PathLike = str | os.PathLike[str]


class NicheClassifierConfig(BaseModel):
    """Settings of a niche-annotation fine-tuning run.

    Attributes:
        label_key: ``obs`` column with the niche labels.
        side_um: niche window side (None: the backbone's trained side).
        max_cells: cells per niche sequence (centre included).
        val_fraction: share of labelled cells held out for validation (random; stratified by label).
        batch_size: niches per batch.
        dropout: dropout before the linear layer.
        optim: optimiser (the backbone gets ``backbone_lr_multiplier`` times the head's lr).
        backbone_lr_multiplier: lr of the backbone relative to the head.
        trainer: hardware, steps, precision.
        seed: seed of the split, the initialisation and the batch order.
        layer, pre_normalized, spatial_key, scale, section_key: how to read the data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label_key: str
    side_um: float | None = Field(None, gt=0)
    max_cells: int = Field(64, ge=1)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    batch_size: int = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=20, min_lr_ratio=0.1)
    backbone_lr_multiplier: float = Field(0.1, gt=0.0)
    trainer: TrainerOptions = TrainerOptions(max_steps=300, checkpoint_every_n_steps=100)
    seed: int = 0
    layer: str | None = None
    pre_normalized: bool = False
    spatial_key: str = "spatial"
    scale: float | None = Field(None, gt=0)
    section_key: str | None = None


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


def train_niche_classifier(
    adata: AnnData,
    checkpoint: Checkpoint,
    out: PathLike,
    config: NicheClassifierConfig,
    *,
    cells: Any = None,
) -> Path:
    """Fine-tune GeST plus a linear head to predict niche labels; resumes a killed run in ``out``.

    Args:
        adata: cells with coordinates, expression and ``obs[config.label_key]``; never modified.
        checkpoint: a pretrained GeST checkpoint (the backbone).
        out: run directory.
        config: run settings.
        cells: labelled cells to train and validate on (default: every cell with a label; all cells serve as
            neighbours).

    Returns:
        ``out/model``, the exported classifier checkpoint.

    Raises:
        MsfmInputError: missing label column, fewer than two classes.
    """
    if config.label_key not in adata.obs:
        msg = f"label_key={config.label_key!r} is not an obs column; columns are {list(adata.obs.columns)[:20]}."
        raise MsfmInputError(msg)
    loaded = load_model(checkpoint, device="cpu")
    read = read_options(
        config.layer, config.pre_normalized, config.spatial_key, config.scale, config.section_key, "error"
    )
    prep = prepare_cells(loaded, adata, read)
    raw = adata.obs[config.label_key]
    has = raw.notna().to_numpy()
    if cells is not None:
        has &= cell_selection(adata, cells, "cells")
    classes = sorted({str(v) for v in raw[has]})
    if len(classes) < 2:
        msg = f"obs[{config.label_key!r}] has {len(classes)} class(es) among the selected cells; need at least 2."
        raise MsfmInputError(msg)
    centers = np.flatnonzero(has)
    labels = np.asarray([classes.index(str(v)) for v in raw.to_numpy()[centers]], dtype=np.int64)
    side = float(config.side_um or loaded.side_um)
    tokens = loaded.vocab.assign(prep.expr)
    seqs = niche_sequences(prep.xy, prep.section, centers, side_um=side, max_cells=config.max_cells)
    tr, va = _split(labels, config.val_fraction, config.seed)
    train_ds = _NicheData(prep.xy, tokens, [seqs[i] for i in tr], labels[tr], side)
    val_ds = _NicheData(prep.xy, tokens, [seqs[i] for i in va], labels[va], side)
    torch.manual_seed(config.seed)
    clf = GestNicheClassifier(loaded.model.train(), len(classes), dropout=config.dropout)
    optim = config.optim.model_copy(update={"lr_multipliers": {"backbone": config.backbone_lr_multiplier}})
    module = MsfmLightningModule(clf, _objective, optim)
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=train_ds.collate,
        generator=torch.Generator().manual_seed(config.seed),
        drop_last=len(train_ds) > config.batch_size,
    )
    val_loader = (
        torch.utils.data.DataLoader(
            val_ds, batch_size=config.batch_size, shuffle=False, collate_fn=val_ds.collate
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
        loaded.model.config,
        gene_panel=list(loaded.vocab.genes),
        gene_panel_name="gest",
        preprocessing=loaded.preprocessing,
        get_state_dict=export_state,
        extra_meta={
            "classes": classes,
            "label_key": config.label_key,
            "window": {**loaded.window, "niche_side_um": side, "niche_max_cells": config.max_cells},
            "vocab": loaded.vocab.meta_dict(),
            "backbone": str(loaded.path) if loaded.path else None,
            "n_train": int(tr.size),
            "n_val": int(va.size),
        },
    )
    wrap = [GestBlock] if config.trainer.strategy.startswith("fsdp") else None
    kwargs: dict[str, Any] = {} if val_loader is not None else {"limit_val_batches": 0}
    trainer = build_trainer(
        config.trainer, out, callbacks=[export], fsdp_wrap_layers=wrap, trainer_kwargs=kwargs
    )
    fit(trainer, module, loader, out, val_dataloaders=val_loader, run_config=config.model_dump(mode="json"))
    return Path(out) / "model"


def load_niche_classifier(
    path: PathLike, *, device: str = "auto"
) -> tuple[GestNicheClassifier, LoadedGest, dict[str, Any]]:
    """Load a classifier exported by :func:`train_niche_classifier`.

    Returns:
        ``(classifier in eval mode, backbone bundle (vocabulary, window), meta extra)``.

    Raises:
        CheckpointError: not a niche-classifier checkpoint.
    """
    ckpt = load_checkpoint(path, family=NICHE_FAMILY, map_location="cpu")
    extra = ckpt.meta.get("extra", {})
    config = GestConfig(**ckpt.config)
    vocab_state = {
        k[len(VOCAB_PREFIX) :]: v for k, v in ckpt.state_dict.items() if k.startswith(VOCAB_PREFIX)
    }
    weights = {k: v for k, v in ckpt.state_dict.items() if not k.startswith(VOCAB_PREFIX)}
    if "classes" not in extra or not vocab_state:
        msg = f"{path} lacks the class list or the vocabulary of a GeST niche classifier."
        raise CheckpointError(msg)
    clf = GestNicheClassifier(Gest(config), len(extra["classes"]))
    try:
        clf.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        msg = f"{path}: weights do not match the classifier ({str(err).splitlines()[0]})."
        raise CheckpointError(msg) from err
    dev = resolve_device(device)
    clf.eval().to(dev)
    bundle = LoadedGest(
        model=clf.backbone,
        vocab=MetaCellVocab.from_tensors(vocab_state, extra["vocab"]),
        window=dict(extra.get("window", {})),
        preprocessing=dict(ckpt.meta.get("preprocessing") or {}),
        meta=ckpt.meta,
        path=Path(path),
        device=dev,
    )
    return clf, bundle, extra


@torch.no_grad()
def annotate_niches(
    adata: AnnData,
    checkpoint: PathLike,
    *,
    batch_size: int = 64,
    device: str = "auto",
    key_added: str = "gest_niche_label",
    layer: str | None = None,
    pre_normalized: bool = False,
    spatial_key: str = "spatial",
    scale: float | None = None,
    section_key: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Predict niche labels with a fine-tuned classifier.

    Writes ``obs[key_added]`` (categorical), ``obs[key_added + '_confidence']`` (softmax probability of the label),
    ``obsm[key_added + '_probs']`` and ``uns[key_added]`` (classes, checkpoint).

    Returns:
        The AnnData when ``copy=True``, else None.
    """
    adata = adata.copy() if copy else adata
    clf, bundle, extra = load_niche_classifier(checkpoint, device=device)
    prep = prepare_cells(
        bundle, adata, read_options(layer, pre_normalized, spatial_key, scale, section_key, "error")
    )
    tokens = bundle.vocab.assign(prep.expr)
    side = float(bundle.window.get("niche_side_um", bundle.side_um))
    max_cells = int(bundle.window.get("niche_max_cells", 64))
    seqs = niche_sequences(prep.xy, prep.section, np.arange(adata.n_obs), side_um=side, max_cells=max_cells)
    dev = next(clf.parameters()).device
    probs = np.zeros((adata.n_obs, len(extra["classes"])), dtype=np.float32)
    for start in range(0, len(seqs), batch_size):
        batch = niche_tensors(prep.xy, tokens, seqs[start : start + batch_size], side)
        logits = clf(
            *(batch[k].to(dev) for k in ("query_pos", "content_pos", "tokens")), mask=batch["mask"].to(dev)
        )
        probs[start : start + len(logits)] = torch.softmax(logits.float(), -1).cpu().numpy()
    classes = list(extra["classes"])
    pred = probs.argmax(1)
    adata.obs[key_added] = pd.Categorical([classes[i] for i in pred], categories=classes)
    adata.obs[f"{key_added}_confidence"] = probs.max(1)
    adata.obsm[f"{key_added}_probs"] = probs
    adata.uns[key_added] = {
        "classes": classes,
        "checkpoint": str(checkpoint),
        "label_key": extra.get("label_key"),
    }
    return adata if copy else None
