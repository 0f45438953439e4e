"""Multi-GPU / multi-node inference that returns predictions in dataset order.

Each rank predicts its shard (Lightning injects a ``DistributedSampler``, which pads the last shard by repeating
samples), writes ``part-rank{r}.npy`` and ``index-rank{r}.npy`` atomically, and rank 0 scatters every part into one
array by dataset index, so padding duplicates collapse onto their original row. The merged array is written to
``out_dir/predictions.npy``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader

from msfm.engine.trainer import TrainerOptions, _coerce_options, lightning_precision
from msfm.errors import MsfmInputError
from msfm.runtime.atomic import atomic_write

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
PREDICTIONS_FILE = "predictions.npy"

__all__ = ["PREDICTIONS_FILE", "distributed_predict"]


class _FnModule(lightning.LightningModule):
    """Wrap ``fn(batch)`` (or ``fn(model, batch)`` with ``model``) as a LightningModule for ``trainer.predict``."""

    def __init__(self, fn: Callable[..., Any], model: nn.Module | None) -> None:
        super().__init__()
        self.fn = fn
        # Registered as a submodule so Lightning moves it to the rank's device.
        self.model = model

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.fn(batch) if self.model is None else self.fn(self.model, batch)


def _call_model(model: nn.Module, batch: Any) -> Any:
    # Module-level (not a lambda) so the wrapper pickles under strategy="ddp_spawn".
    return model(batch)


def _to_numpy(pred: Any) -> np.ndarray:
    if isinstance(pred, torch.Tensor):
        pred = pred.detach()
        # numpy has no bfloat16; float32 keeps every bf16 value exactly.
        if pred.dtype == torch.bfloat16:
            pred = pred.float()
        return pred.cpu().numpy()
    if isinstance(pred, np.ndarray):
        return pred
    msg = (
        f"Prediction functions must return a Tensor or ndarray with the batch on the first axis; got "
        f"{type(pred).__name__}. Return e.g. the embedding tensor of shape [b, d]."
    )
    raise MsfmInputError(msg)


class _ShardWriter(BasePredictionWriter):
    """Collect this rank's predictions with their dataset indices, write them, and merge on rank 0."""

    def __init__(self, out_dir: Path, n_total: int | None) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self.n_total = n_total
        self._preds: list[np.ndarray] = []
        self._index: list[np.ndarray] = []

    def write_on_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if batch_indices is None:
            msg = "Lightning did not report dataset indices for the batch; use a map-style dataset with a DataLoader."
            raise MsfmInputError(msg)
        arr = _to_numpy(prediction)
        idx = np.asarray(list(batch_indices), dtype=np.int64)
        if arr.shape[0] != idx.shape[0]:
            msg = f"Prediction for batch {batch_idx} has {arr.shape[0]} rows but the batch has {idx.shape[0]} samples."
            raise MsfmInputError(msg)
        self._preds.append(arr)
        self._index.append(idx)

    def on_predict_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        preds = np.concatenate(self._preds) if self._preds else None
        index = np.concatenate(self._index) if self._index else np.zeros(0, dtype=np.int64)
        self._preds, self._index = [], []
        if preds is not None:
            _save_npy(self.out_dir / f"part-rank{rank}.npy", preds)
        _save_npy(self.out_dir / f"index-rank{rank}.npy", index)
        trainer.strategy.barrier("msfm_predict_parts")
        if trainer.is_global_zero:
            _merge(self.out_dir, world, self.n_total)
        trainer.strategy.barrier("msfm_predict_merged")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def _merge(out_dir: Path, world: int, n_total: int | None) -> None:
    parts, indices = [], []
    for r in range(world):
        idx = np.load(out_dir / f"index-rank{r}.npy", allow_pickle=False)
        part_path = out_dir / f"part-rank{r}.npy"
        if idx.size:
            parts.append(np.load(part_path, allow_pickle=False))
            indices.append(idx)
    if not parts:
        msg = "No rank produced predictions: the dataloader is empty."
        raise MsfmInputError(msg)
    n = n_total if n_total is not None else int(max(i.max() for i in indices)) + 1
    merged = np.empty((n, *parts[0].shape[1:]), dtype=np.result_type(*parts))
    seen = np.zeros(n, dtype=bool)
    for part, idx in zip(parts, indices):
        # Padding duplicates write the same row twice with identical values; last write wins harmlessly.
        merged[idx] = part
        seen[idx] = True
    if not seen.all():
        missing = np.flatnonzero(~seen)
        msg = f"Predictions are missing for {missing.size} of {n} samples (e.g. indices {missing[:5].tolist()})."
        raise MsfmInputError(msg)
    _save_npy(out_dir / PREDICTIONS_FILE, merged)
    for r in range(world):
        (out_dir / f"part-rank{r}.npy").unlink(missing_ok=True)
        (out_dir / f"index-rank{r}.npy").unlink(missing_ok=True)
    logger.info(
        "merged predictions of %d rank(s) into %s %s", world, out_dir / PREDICTIONS_FILE, merged.shape
    )


def distributed_predict(
    predictor: lightning.LightningModule | nn.Module | Callable[[Any], Any],
    dataloader: DataLoader,
    out_dir: PathLike,
    *,
    options: TrainerOptions | Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """Predict over ``dataloader`` on every device/node and return the rows in dataset order.

    Args:
        predictor: A LightningModule (its ``predict_step`` is used), an ``nn.Module`` (called on each batch), or
            a function ``fn(batch)``; with ``model=...`` the function is called as ``fn(model, batch)`` and the model
            is moved to each rank's device. It must return a Tensor/ndarray with the batch on the first axis.
        dataloader: Loader over a map-style dataset; do not shuffle-sensitive-wrap it (Lightning adds the
            distributed sampler).
        out_dir: Folder for the per-rank parts and the merged ``predictions.npy`` (created if missing).
        options: Hardware settings (accelerator, devices, strategy, num_nodes, precision); None runs on one CPU/GPU
            with ``accelerator="auto"``. Step/epoch limits are ignored.
        model: Model passed to a function ``predictor``.
        overwrite: Replace an existing ``out_dir/predictions.npy``.

    Returns:
        The merged predictions, shape ``[len(dataset), ...]``. Global rank 0 gets an in-memory array; other ranks
        get a read-only memory map of the same file (no extra memory per rank).

    Raises:
        MsfmInputError: If ``predictions.npy`` exists and ``overwrite`` is False, the predictor returns something
            other than an array, or samples are missing after the merge.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / PREDICTIONS_FILE
    if target.exists() and not overwrite:
        msg = f"{target} already exists. Pass overwrite=True or choose another out_dir."
        raise MsfmInputError(msg)
    if isinstance(predictor, lightning.LightningModule):
        module = predictor
    elif isinstance(predictor, nn.Module):
        module = _FnModule(_call_model, predictor)
    elif callable(predictor):
        module = _FnModule(predictor, model)
    else:
        msg = f"predictor must be a LightningModule, nn.Module or callable; got {type(predictor).__name__}."
        raise MsfmInputError(msg)

    opts = _coerce_options(options) if options is not None else TrainerOptions(progress_bar=False)
    try:
        n_total: int | None = len(dataloader.dataset)  # type: ignore[arg-type]
    except TypeError:
        n_total = None
    trainer = lightning.Trainer(
        accelerator=opts.accelerator,
        devices=opts.devices,
        strategy=opts.strategy,
        num_nodes=opts.num_nodes,
        precision=lightning_precision(opts),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=opts.progress_bar is not False,
        enable_model_summary=False,
        callbacks=[_ShardWriter(out, n_total)],
        default_root_dir=out,
    )
    trainer.predict(module, dataloaders=dataloader, return_predictions=False)
    if trainer.is_global_zero:
        return np.load(target, allow_pickle=False)
    return np.load(target, mmap_mode="r", allow_pickle=False)
