"""Writing ``RUN_DIR/model`` as an msfm checkpoint directory while a run trains (:class:`ExportCallback`).

A run exports its model whenever Lightning saves ``last.ckpt`` and at the end of training, so a killed run still
leaves a loadable model beside its resumable Lightning state.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
from lightning.pytorch.callbacks import Callback

from msfm.engine.run_layout import MODEL_DIR
from msfm.errors import MsfmInputError
from msfm.runtime.checkpoint import save_checkpoint

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
PrecisionName = Literal[
    "auto", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
    "transformer-engine-float16",
]  # fmt: skip


__all__ = ["ExportCallback", "ExportSpec"]


@dataclass(frozen=True)
class ExportSpec:
    """What :class:`ExportCallback` needs to write ``RUN_DIR/model`` as an msfm checkpoint directory.

    Attributes:
        family: Model family name.
        config: The model config (pydantic model or JSON-serialisable dict).
        gene_panel: Gene symbols in panel order, if the family has a panel.
        gene_panel_name: Name of the panel.
        preprocessing: Preprocessing parameters that travel with the weights.
        get_state_dict: See :class:`ExportCallback`: ``fn()`` returning the model state dict, or
            ``fn(lightning_state_dict)``; None strips the ``model.`` prefix.
        extra_meta: Further provenance for ``meta.json``.
    """

    family: str
    config: Any
    gene_panel: Sequence[str] | None = None
    gene_panel_name: str | None = None
    preprocessing: Mapping[str, Any] | None = None
    get_state_dict: Callable[..., Mapping[str, torch.Tensor]] | None = None
    extra_meta: Mapping[str, Any] = field(default_factory=dict)


def _n_required_args(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the one-argument form
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def _strip_model_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class ExportCallback(Callback):
    """Write ``RUN_DIR/model`` (an msfm checkpoint directory) at every Lightning checkpoint save and at the end.

    A run killed mid-way therefore still leaves a model that ``load_checkpoint`` and the family APIs can use.
    Only global rank 0 writes. By default the weights are taken from the checkpoint being saved (already gathered
    by the strategy) and, at train end, from ``strategy.lightning_module_state_dict()``, which every rank calls
    because it is a collective under FSDP.

    Args:
        family: Model family name.
        config: The model config.
        gene_panel: Gene symbols in panel order, if any.
        preprocessing: Preprocessing parameters.
        get_state_dict: Where the exported weights come from. Either a function of no arguments returning the
            model state dict (e.g. ``lambda: model.state_dict()``; fine for single-device and DDP runs, not for
            FSDP, whose live modules hold shards), or a function mapping the gathered LightningModule state dict
            to the model's. None strips the ``model.`` prefix (right for :class:`MsfmLightningModule`).
        out_dir: Destination directory; None uses ``<trainer.default_root_dir>/model`` (the run directory's
            ``model/`` with :func:`build_trainer`).
        gene_panel_name: Name of the panel (defaults to ``gene_panel.name`` when the panel object has one).
        extra_meta: Further provenance for ``meta.json`` (the global step and epoch are added).
    """

    def __init__(
        self,
        family: str,
        config: Any,
        *,
        gene_panel: Sequence[str] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        get_state_dict: Callable[..., Mapping[str, torch.Tensor]] | None = None,
        out_dir: PathLike | None = None,
        gene_panel_name: str | None = None,
        extra_meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.family = family
        self.config = config
        self.gene_panel = list(gene_panel) if gene_panel is not None else None
        self.gene_panel_name = (
            gene_panel_name if gene_panel_name is not None else getattr(gene_panel, "name", None)
        )
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None
        self.get_state_dict = get_state_dict
        self._takes_state = get_state_dict is None or _n_required_args(get_state_dict) >= 1
        self.extra_meta = dict(extra_meta or {})
        self._last_step: int | None = None

    @classmethod
    def from_spec(cls, out_dir: PathLike | None, spec: ExportSpec) -> ExportCallback:
        """Build the callback from an :class:`ExportSpec`.

        Args:
            out_dir: Destination directory (None: ``<trainer.default_root_dir>/model``).
            spec: What to export.

        Returns:
            The callback.
        """
        return cls(
            spec.family,
            spec.config,
            gene_panel=spec.gene_panel,
            preprocessing=spec.preprocessing,
            get_state_dict=spec.get_state_dict,
            out_dir=out_dir,
            gene_panel_name=spec.gene_panel_name,
            extra_meta=spec.extra_meta,
        )

    def setup(self, trainer: lightning.Trainer, pl_module: Any, stage: str) -> None:
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir) / MODEL_DIR

    def on_save_checkpoint(
        self, trainer: lightning.Trainer, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.sanity_checking:
            return
        self._export(trainer, checkpoint["state_dict"])

    def on_train_end(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        # Decided identically on every rank (the step is the same everywhere), so the collective below matches.
        if self._last_step == trainer.global_step:
            return
        self._export(trainer, trainer.strategy.lightning_module_state_dict())

    def _export(self, trainer: lightning.Trainer, lightning_state: Mapping[str, torch.Tensor]) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if self.get_state_dict is None:
            state = _strip_model_prefix(lightning_state)
        elif self._takes_state:
            state = self.get_state_dict(lightning_state)
        else:
            state = self.get_state_dict()
        if not state:
            msg = (
                f"ExportCallback found no weights to export (state dict keys: {list(lightning_state)[:5]}...). "
                "Pass get_state_dict= mapping the LightningModule state dict to the model's."
            )
            raise MsfmInputError(msg)
        meta = {
            **self.extra_meta,
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
        }
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir) / MODEL_DIR
        save_checkpoint(
            self.out_dir,
            family=self.family,
            config=self.config,
            state_dict=state,
            gene_panel=self.gene_panel,
            gene_panel_name=self.gene_panel_name,
            preprocessing=self.preprocessing,
            extra_meta=meta,
        )
