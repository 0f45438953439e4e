"""The one LightningModule every family trains through.

``MsfmLightningModule`` wraps a plain ``nn.Module`` and an objective function; it owns the optimiser, the
learning-rate schedule (warm-up then cosine/linear/constant, stepped every optimiser step), per-prefix learning-rate
multipliers and frozen prefixes, logging of every loss component, and the RNG state that makes resume exact.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from msfm.engine.objective import LossOutput, Objective
from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["LossOutput", "MsfmLightningModule", "OptimConfig", "build_param_groups", "lr_factor"]

_RNG_KEY = "msfm_rng_state"


class OptimConfig(BaseModel):
    """AdamW + warm-up/decay schedule settings.

    Attributes:
        lr: Peak learning rate (reached after warm-up).
        weight_decay: Decoupled weight decay, applied to weights with 2+ dims only (not biases, norms, embeddings'
            1-D scales), the usual transformer recipe.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warm-up length in optimiser steps.
        schedule: Shape after warm-up.
        min_lr_ratio: Final lr as a fraction of ``lr`` for cosine/linear.
        total_steps: Schedule length; None uses the trainer's estimated number of optimiser steps.
        lr_multipliers: Parameter-name prefix to lr multiplier (e.g. ``{"backbone": 0.1}``). The longest matching
            prefix wins.
        frozen_prefixes: Parameter-name prefixes that are not trained (``requires_grad=False``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    total_steps: int | None = Field(None, gt=0)
    lr_multipliers: dict[str, float] = Field(default_factory=dict)
    frozen_prefixes: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            msg = f"betas must lie in [0, 1); got {self.betas}."
            raise ValueError(msg)
        bad = {k: v for k, v in self.lr_multipliers.items() if not v > 0}
        if bad:
            msg = f"lr_multipliers must be > 0 (freeze with frozen_prefixes instead); got {bad}."
            raise ValueError(msg)
        return self


def _matches(name: str, prefix: str) -> bool:
    # "enc" must not catch "encoder.x": match whole dotted components only.
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup_steps`` (the first step already gets ``1 / warmup_steps``, so no
    step is wasted at lr 0); then cosine or linear decay to ``min_lr_ratio`` at ``total_steps``, or constant.

    Args:
        step: Number of optimiser steps taken so far.
        warmup_steps: Warm-up length.
        total_steps: Schedule length.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
        min_lr_ratio: Floor of the decay.

    Returns:
        The factor multiplying each group's base lr.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def build_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Split trainable parameters into AdamW groups by lr multiplier and weight-decay eligibility.

    Args:
        model: The model; parameters with ``requires_grad=False`` are skipped.
        optim: Optimiser settings.

    Returns:
        Parameter groups with ``params``, ``lr``, ``weight_decay`` and a ``name`` (``"<prefix>|decay"``).

    Raises:
        MsfmInputError: If an ``lr_multipliers`` prefix matches no parameter (a typo would silently do nothing).
    """
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in optim.lr_multipliers if not any(_matches(n, p) for n in names)]
    if unknown:
        msg = (
            f"lr_multipliers prefixes {unknown} match no parameter of {type(model).__name__}. "
            f"Top-level parameter prefixes are {sorted({n.split('.')[0] for n in names})}."
        )
        raise MsfmInputError(msg)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    by_length = sorted(optim.lr_multipliers, key=len, reverse=True)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in by_length if _matches(name, p)), "")
        decay = param.ndim >= 2 and optim.weight_decay > 0
        key = (prefix, decay)
        if key not in groups:
            groups[key] = {
                "name": f"{prefix or 'default'}|{'decay' if decay else 'no_decay'}",
                "params": [],
                "lr": optim.lr * optim.lr_multipliers.get(prefix, 1.0),
                "weight_decay": optim.weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


class MsfmLightningModule(lightning.LightningModule):
    """Train a plain ``nn.Module`` with an objective function.

    Args:
        model: The network (tensors in, tensors out).
        objective: ``objective(model, batch) -> LossOutput``; used for training and validation steps.
        optim: Optimiser and schedule settings.
        predict_fn: ``predict_fn(model, batch) -> Tensor`` used by ``predict_step`` (embeddings, logits, ...).

    Raises:
        MsfmInputError: If a frozen prefix matches no parameter.

    Example:
        >>> module = MsfmLightningModule(net, objective=mse_objective, optim=OptimConfig(lr=1e-3))  # doctest: +SKIP
        >>> fit(build_trainer(TrainerOptions(max_steps=100), "runs/x"), module, loader, "runs/x")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optim: OptimConfig | None = None,
        *,
        predict_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.optim = optim if optim is not None else OptimConfig()
        self.predict_fn = predict_fn
        self._freeze(self.optim.frozen_prefixes)
        # Stored as plain JSON types so the Lightning checkpoint loads with weights_only=True.
        self.save_hyperparameters({"optim": self.optim.model_dump(mode="json")})

    def _freeze(self, prefixes: tuple[str, ...]) -> None:
        names = [n for n, _ in self.model.named_parameters()]
        unknown = [p for p in prefixes if not any(_matches(n, p) for n in names)]
        if unknown:
            msg = (
                f"frozen_prefixes {unknown} match no parameter of {type(self.model).__name__}. "
                f"Top-level parameter prefixes are {sorted({n.split('.')[0] for n in names})}."
            )
            raise MsfmInputError(msg)
        n_frozen = 0
        for name, param in self.model.named_parameters():
            if any(_matches(name, p) for p in prefixes):
                param.requires_grad_(False)
                n_frozen += param.numel()
        if prefixes:
            logger.info("froze %d parameters under %s", n_frozen, list(prefixes))

    def forward(self, batch: Any) -> Any:
        """Run the wrapped model on a batch.

        Args:
            batch: Model input.

        Returns:
            Whatever the wrapped model returns.
        """
        return self.model(batch)

    def _log_loss(self, out: LossOutput, stage: str) -> None:
        on_step = stage == "train"
        # sync_dist averages across DDP ranks; it is a no-op in a single process.
        kwargs = {"batch_size": int(out.n), "sync_dist": True, "on_step": on_step, "on_epoch": not on_step}
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, **kwargs)
        for name, value in out.components.items():
            if name == "loss":  # already logged above (objectives may repeat it among their components)
                continue
            value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self.log(f"{stage}/{name}", value.float(), **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Compute the objective on a training batch and log its components and the learning rate.

        Args:
            batch: A training batch.
            batch_idx: Index of the batch in the epoch.

        Returns:
            The loss to back-propagate.
        """
        out = self.objective(self.model, batch)
        self._log_loss(out, "train")
        for i, group in enumerate(self.optimizers().param_groups):
            name = "lr" if i == 0 else f"lr/{group.get('name', i)}"
            self.log(name, float(group["lr"]), on_step=True, on_epoch=False, batch_size=int(out.n))
        return out.loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Compute the objective on a validation batch and log epoch averages.

        Args:
            batch: A validation batch.
            batch_idx: Index of the batch.

        Returns:
            The validation loss.
        """
        out = self.objective(self.model, batch)
        self._log_loss(out, "val")
        return out.loss

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Delegate to ``predict_fn(model, batch)``.

        Args:
            batch: A batch.
            batch_idx: Index of the batch.
            dataloader_idx: Index of the dataloader.

        Returns:
            What ``predict_fn`` returns.

        Raises:
            MsfmInputError: If the module was built without ``predict_fn``.
        """
        if self.predict_fn is None:
            msg = "This MsfmLightningModule has no predict_fn; pass predict_fn=... to use trainer.predict()."
            raise MsfmInputError(msg)
        return self.predict_fn(self.model, batch)

    def configure_optimizers(self) -> dict[str, Any]:
        """Build AdamW with per-prefix groups and a per-step LambdaLR schedule.

        Returns:
            Lightning's optimiser/scheduler dict.
        """
        groups = build_param_groups(self.model, self.optim)
        if not groups:
            msg = "No trainable parameters: every parameter is frozen. Remove some frozen_prefixes."
            raise MsfmInputError(msg)
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps)
        total = self.optim.total_steps or int(self.trainer.estimated_stepping_batches)
        if self.optim.schedule != "constant" and (total <= 0 or total > 10**12):
            msg = (
                "Cannot size the lr schedule: set OptimConfig.total_steps, or TrainerOptions.max_steps / max_epochs "
                f"(trainer estimated {total} steps)."
            )
            raise MsfmInputError(msg)
        opt = self.optim

        # A closure, not a callable object: LambdaLR then stores nothing of it in the checkpoint (weights_only-safe)
        # and the schedule is rebuilt identically from the config on resume.
        def factor(step: int) -> float:
            return lr_factor(
                step,
                warmup_steps=opt.warmup_steps,
                total_steps=total,
                schedule=opt.schedule,
                min_lr_ratio=opt.min_lr_ratio,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # --- exact resume: carry the RNG state through Lightning checkpoints (tensors and ints only) -------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store torch (CPU and CUDA) and Python RNG states so stochastic objectives resume exactly.

        Args:
            checkpoint: The Lightning checkpoint being written.
        """
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[_RNG_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states saved with the checkpoint.

        This runs before the training data iterator is created, so a plain ``DataLoader`` resumed at an epoch
        boundary draws the same shuffle seed as the uninterrupted run would have. :func:`msfm.engine.fit` skips
        the validation sanity check on resume because it would draw from the generators in between.

        Args:
            checkpoint: The Lightning checkpoint being restored.
        """
        state = checkpoint.get(_RNG_KEY)
        if not state:
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "python" in state:
            _set_python_rng_state(state["python"])


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    # A tensor instead of a 625-int tuple: compact and allowed by weights_only loading.
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _set_python_rng_state(state: Mapping[str, Any]) -> None:
    internal = tuple(int(v) for v in state["internal"].tolist())
    random.setstate((state["version"], internal, state["gauss"]))
