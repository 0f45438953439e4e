"""Per-fold bookkeeping during training: the best validation-loss model, early stopping, resume checkpoints."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

logger = logging.getLogger(__name__)

__all__ = ["FoldMonitor"]


class FoldMonitor(Callback):
    """Keeps the best-validation-loss model, stops early, and writes ``last.ckpt`` at epoch ends.

    Its state (best loss and epoch, epochs without improvement, whether training stopped) travels in the
    Lightning checkpoint, so a resumed fold continues the same bookkeeping.
    """

    def __init__(
        self,
        *,
        export: Callable[[torch.nn.Module, int, float], None],
        ckpt_path: Path,
        best_from_epoch: int,
        early_stopping: bool,
        patience: int,
        stop_epoch: int,
        max_epochs: int,
        every_n_epochs: int,
    ) -> None:
        super().__init__()
        self.export = export
        self.ckpt_path = ckpt_path
        # A run shorter than best_from_epoch still gets a best model: its last epoch.
        self.best_from_epoch = min(best_from_epoch, max_epochs - 1)
        self.early_stopping = early_stopping
        self.patience = patience
        self.stop_epoch = stop_epoch
        self.every_n_epochs = every_n_epochs
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped = False
        self.epochs_done = 0
        self.val_losses: list[float] = []

    @property
    def state_key(self) -> str:
        return "msfm_roam_fold_monitor"

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": float(self.best_loss),
            "best_epoch": int(self.best_epoch),
            "bad_epochs": int(self.bad_epochs),
            "stopped": bool(self.stopped),
            "epochs_done": int(self.epochs_done),
            "val_losses": [float(v) for v in self.val_losses],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_loss = float(state_dict["best_loss"])
        self.best_epoch = int(state_dict["best_epoch"])
        self.bad_epochs = int(state_dict["bad_epochs"])
        self.stopped = bool(state_dict["stopped"])
        self.epochs_done = int(state_dict.get("epochs_done", 0))
        self.val_losses = [float(v) for v in state_dict.get("val_losses", [])]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Resuming a fold that had already stopped early: nothing more to train.
        if self.stopped:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch)
        value = trainer.callback_metrics.get("val/loss")
        loss = float(value) if value is not None else math.nan
        self.val_losses.append(loss)
        self.epochs_done = epoch + 1
        if epoch >= self.best_from_epoch:
            if loss < self.best_loss:  # NaN never improves
                self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
                if trainer.is_global_zero:
                    self.export(pl_module.model, epoch, loss)
            else:
                self.bad_epochs += 1
        if self.early_stopping and self.bad_epochs > self.patience and epoch >= self.stop_epoch:
            logger.info(
                "early stop at epoch %d (best %.4f at epoch %d)", epoch, self.best_loss, self.best_epoch
            )
            self.stopped = True
            trainer.should_stop = True
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs == 0 or self.stopped or last:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
