"""Cell-type annotation: ``fit_classifier`` fine-tunes a classifier on a backbone, ``predict`` applies it.

Training runs through the shared Lightning engine (any accelerator, DDP, mixed precision); the classifier is
saved as an msfm checkpoint directory (family ``scfoundation-classifier``: backbone, head, classes, target
depth, labels key) that ``predict`` and ``load`` read.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from msfm.data import CellSource, GeneMapping, as_anndata, prepare_cells
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.trainer import TrainerOptions, build_trainer, fit
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scfoundation._io import parse_read_options
from msfm.models.scfoundation.finetune import (
    CellClassifierConfig,
    ClassifierCheckpointConfig,
    ScFoundationCellClassifier,
    classification_loss,
)
from msfm.models.scfoundation.inference import Precision, iter_batches
from msfm.models.scfoundation.loading import (
    CLASSIFIER_FAMILY,
    CheckpointLike,
    backbone_of,
    is_classifier,
    load,
    tokenizer_for,
)
from msfm.models.scfoundation.provenance import preprocessing_record, uns_record
from msfm.runtime.adata import check_key_added, field_key, store_uns
from msfm.runtime.atomic import check_output_free
from msfm.runtime.checkpoint import save_checkpoint
from msfm.runtime.devices import autocast_context
from msfm.runtime.h5ad import write_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.precision import canonical_precision, resolve_precision
from msfm.runtime.progress import progress_bar
from msfm.runtime.results import TrainResult
from msfm.tokenizers.gene_panel import ScFoundationTokenizer, TargetDepth

__all__ = ["fit_classifier", "predict"]


class _LabelledCells(torch.utils.data.Dataset):
    """Tokenised cells (in memory) with integer labels."""

    def __init__(self, encoded: Any, labels: np.ndarray, tokenizer: ScFoundationTokenizer):
        self.encoded = encoded
        self.labels = labels
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        idx_arr = np.asarray(idx)
        batch = self.tokenizer.collate(self.encoded, idx_arr)
        batch["labels"] = torch.as_tensor(self.labels[idx_arr], dtype=torch.long)
        return batch


def _labels(adata: AnnData, labels_key: str) -> tuple[list[str], np.ndarray]:
    """Sorted class names and each cell's class index."""
    if labels_key not in adata.obs:
        msg = f"labels_key={labels_key!r} is not an obs column; available: {list(adata.obs.columns)[:20]}."
        raise MsfmInputError(msg)
    raw = adata.obs[labels_key]
    if raw.isna().any():
        msg = (
            f"obs[{labels_key!r}] has {int(raw.isna().sum())} missing labels; drop or fill those cells first."
        )
        raise MsfmInputError(msg)
    classes = sorted(raw.astype(str).unique().tolist())
    if len(classes) < 2:
        msg = f"obs[{labels_key!r}] has {len(classes)} distinct label(s); a classifier needs at least 2."
        raise MsfmInputError(msg)
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[c] for c in raw.astype(str)], dtype=np.int64)


def fit_classifier(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    labels_key: str,
    out: str | os.PathLike[str],
    mode: Literal["linear", "partial", "full"] = "linear",
    max_epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    target_depth: str = "t4",
    pool: Literal["max", "all"] = "max",
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
    """Fine-tune a cell-type classifier on a pretrained backbone and save it to ``out``.

    ``mode="linear"`` trains only the head on a frozen backbone, ``"partial"`` also unfreezes the
    second-to-last encoder layer (the upstream recipe), ``"full"`` trains the whole encoder path.

    Args:
        data: labelled cells with raw counts, or a path to read.
        checkpoint: the backbone: an scFoundation checkpoint, a ``TrainResult`` or a ``Loaded``.
        labels_key: ``obs`` column with the labels.
        out: classifier checkpoint directory to write; the Lightning run lives beside it in ``.<name>.run``
            (a killed run resumes from there).
        mode, pool: see :class:`~msfm.models.scfoundation.finetune.CellClassifierConfig`.
        max_epochs, batch_size, lr, seed: training loop (AdamW, constant learning rate).
        target_depth: target depth of the inputs (prediction uses the same).
        accelerator, devices, strategy, precision: Lightning hardware settings.
        progress: show a progress bar.
        overwrite: replace an existing ``out``.
        allow_config_change: resume a killed run although the settings differ from the ones it started with
            (recorded in its ``config.json``); without it that raises :class:`~msfm.errors.ConfigChangedError`.
        **read_options: :class:`msfm.data.CellReadOptions`.

    Returns:
        ``TrainResult(run_dir, checkpoint=out, metrics)``; pass it to :func:`predict`.
    """
    options = parse_read_options(fit_classifier, read_options)
    TargetDepth.parse(target_depth)
    target = check_output_free(out, overwrite=overwrite)
    adata = as_anndata(data)
    classes, labels = _labels(adata, labels_key)
    loaded = backbone_of(load(checkpoint, device="cpu"))
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    tokenizer = tokenizer_for(loaded)
    panel_counts = mapping.apply(source.rows(np.arange(source.n_obs)))
    encoded = tokenizer.encode(panel_counts, target_depth, pre_normalized=options.pre_normalized)
    dataset = _LabelledCells(encoded, labels, tokenizer)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=dataset.collate,
        generator=torch.Generator().manual_seed(seed),
    )
    head = CellClassifierConfig(num_classes=len(classes), mode=mode, pool=pool)
    # A Loaded passed in keeps its own model: fine-tuning works on a copy of the backbone.
    backbone = copy.deepcopy(loaded.model) if isinstance(checkpoint, Loaded) else loaded.model
    classifier = ScFoundationCellClassifier(backbone, head)
    module = MsfmLightningModule(
        classifier,
        classification_loss,
        OptimConfig(lr=lr, weight_decay=0.01, warmup_steps=0, schedule="constant"),
    )
    run_dir = target.with_name(f".{target.name}.run")
    trainer_options = TrainerOptions(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_epochs=max_epochs,
        seed=seed,
        progress_bar=progress,
        allow_config_change=allow_config_change,
    )
    trainer = build_trainer(trainer_options, run_dir)
    run_config = {
        "labels_key": labels_key,
        "classes": classes,
        "n_cells": len(labels),
        "mode": mode,
        "pool": pool,
        "batch_size": batch_size,
        "target_depth": target_depth,
        "read": options.model_dump(mode="json"),
        "backbone": str(Path(loaded.path).resolve()) if loaded.path is not None else None,
    }
    fit(trainer, module, loader, run_dir, run_config=run_config)
    classifier.eval()
    spec = ClassifierCheckpointConfig(
        backbone=loaded.config,
        classifier=head,
        classes=tuple(classes),
        target_depth=target_depth,
        labels_key=labels_key,
    )
    save_checkpoint(
        target,
        family=CLASSIFIER_FAMILY,
        config=spec,
        state_dict=classifier.state_dict(),
        gene_panel=list(loaded.vocab.symbols),
        gene_panel_name=loaded.vocab.name,
        preprocessing=preprocessing_record(options.pre_normalized),
        extra_meta={
            "backbone_checkpoint": str(loaded.path),
            "gene_mapping": mapping.to_uns(),
            "n_train_cells": len(labels),
        },
    )
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["n_train_cells"] = len(labels)
    return TrainResult(run_dir=run_dir, checkpoint=target, metrics=metrics)


def predict(
    data: AnnData | str | os.PathLike[str],
    checkpoint: CheckpointLike,
    *,
    key_added: str = "scfoundation",
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    copy: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **read_options: Any,
) -> AnnData:
    """Predict cell types with a classifier from :func:`fit_classifier`.

    Under ``key_added`` it writes ``obs["<key>_<labels_key>"]`` (the predicted class; ``labels_key`` is the column
    the classifier learned), ``obs["<key>_confidence"]`` (its probability), ``obsm["<key>_probs"]`` (every
    class's probability, columns in ``uns[<key>]["predict"]["classes"]`` order) and ``uns[<key>]["predict"]``.

    Args:
        data: cells with raw counts, or a path to read.
        checkpoint: the classifier: its directory, the ``TrainResult`` of ``fit_classifier`` or a ``Loaded``.
        key_added: prefix of what is added.
        batch_size: cells per batch.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        precision: ``auto`` (bf16 where the device computes it fast, else fp32; the choice is recorded in
            ``uns[key_added]["predict"]["precision"]``), ``32``, ``bf16`` or ``16`` (autocast).
        progress: show a progress bar.
        copy: add the results to a copy of an AnnData ``data``.
        out: also write the result to this ``.h5ad`` file (atomically).
        overwrite: replace an existing ``out``.
        **read_options: :class:`msfm.data.CellReadOptions`.

    Returns:
        The AnnData with the predictions.
    """
    check_key_added(key_added)
    canonical_precision(precision)
    options = parse_read_options(predict, read_options)
    if out is not None:
        check_output_free(out, overwrite=overwrite)
    loaded = load(checkpoint, device=device)
    if not is_classifier(loaded):
        msg = (
            f"predict needs a classifier checkpoint (from msfm.scfoundation.fit_classifier); {loaded.path} is an "
            "scFoundation model. Fit a classifier on it first, or use embed for embeddings."
        )
        raise CheckpointError(msg)
    choice = resolve_precision(precision, loaded.device)
    spec: ClassifierCheckpointConfig = loaded.config
    adata = as_anndata(data, copy=copy)
    source, mapping = prepare_cells(adata, loaded.vocab, options)
    proba = _probabilities(
        loaded,
        source,
        mapping,
        pre_normalized=options.pre_normalized,
        batch_size=batch_size,
        precision=choice.precision,
        progress=progress,
    )
    classes = np.asarray(spec.classes)
    adata.obs[field_key(key_added, spec.labels_key)] = pd.Categorical(
        classes[proba.argmax(1)], categories=classes
    )
    adata.obs[field_key(key_added, "confidence")] = proba.max(1)
    adata.obsm[field_key(key_added, "probs")] = proba
    record = uns_record(
        loaded,
        mapping,
        source.kind,
        {"key_added": key_added, "labels_key": spec.labels_key, "target_depth": spec.target_depth},
        choice,
    )
    store_uns(adata, key_added, "predict", {**record, "classes": list(spec.classes)})
    write_output(adata, out, data, replace=overwrite)
    return adata


@torch.inference_mode()
def _probabilities(
    loaded: Loaded,
    source: CellSource,
    mapping: GeneMapping,
    *,
    pre_normalized: bool,
    batch_size: int,
    precision: Precision,
    progress: bool,
) -> np.ndarray:
    """``[n, k]`` class probabilities of the classifier in ``loaded``, over length-bucketed batches."""
    spec: ClassifierCheckpointConfig = loaded.config
    proba = np.zeros((source.n_obs, len(spec.classes)), dtype=np.float32)
    tokenizer = tokenizer_for(loaded)
    with progress_bar(source.n_obs, "scFoundation predict", enabled=progress) as bar:
        for batch in iter_batches(
            source,
            mapping,
            tokenizer,
            spec.target_depth,
            batch_size=batch_size,
            pre_normalized=pre_normalized,
        ):
            t = {k: v.to(loaded.device) for k, v in batch.tensors.items()}
            with autocast_context(loaded.device, precision):
                logits = loaded.model(t).logits
            proba[batch.rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            bar.update(len(batch.rows))
    return proba
