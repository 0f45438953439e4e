"""Building and running Lightning trainers with msfm's run-directory contract.

A run directory (see ``docs/architecture.md``) holds::

    RUN_DIR/
      checkpoints/last.ckpt   # Lightning state for resume (loaded with weights_only=True)
      model/                  # msfm checkpoint directory, exported at every save and at the end
      config.json             # the resolved run config, with the history of its versions
      metrics.csv             # CSV logger

:func:`build_trainer` turns :class:`TrainerOptions` into a ``lightning.Trainer`` wired to that layout, and
:func:`fit` resumes from ``last.ckpt`` when it exists, so re-running the same command after a crash continues the
run instead of restarting it.

Resuming with other settings than the run was started with is refused (:func:`check_resume`,
:class:`~msfm.errors.ConfigChangedError` naming every changed setting as ``old -> new``), before anything is written
or trained: the weights would continue under settings they were not trained with and the data order would no
longer be the one of an uninterrupted run. The settings of :data:`RESUME_SAFE_SETTINGS` (run length, logging and
checkpoint intervals, progress display, accelerator) may change. ``TrainerOptions(allow_config_change=True)``
(CLI ``--allow-config-change``) accepts a deliberate change; ``config.json`` then keeps the original settings and
every change in its ``versions`` list (the settings, the step each version started at, the time).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    ModelSummary,
    RichModelSummary,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from msfm.engine.export import ExportCallback, ExportSpec
from msfm.engine.resume import ALLOW_KEY as _ALLOW_KEY
from msfm.engine.resume import (
    RESUME_SAFE_SETTINGS,
    changed_settings,
    check_resume,
    run_config_document,
    settings_record,
)
from msfm.engine.run_layout import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MODEL_DIR,
    RUN_CONFIG,
    last_checkpoint,
)
from msfm.errors import MsfmInputError
from msfm.runtime.atomic import atomic_write, atomic_write_json, probe_writable
from msfm.runtime.devices import parse_devices
from msfm.runtime.precision import resolve_precision
from msfm.runtime.safe_load import load_torch_file

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
PrecisionName = Literal[
    "auto", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
    "transformer-engine-float16",
]  # fmt: skip


__all__ = [
    "RESUME_SAFE_SETTINGS",
    "ExportCallback",
    "ExportSpec",
    "SafeCheckpointIO",
    "TrainerOptions",
    "build_trainer",
    "changed_settings",
    "check_resume",
    "fit",
    "last_checkpoint",
    "lightning_precision",
    "resume_step",
]


def lightning_precision(opts: TrainerOptions) -> str:
    """The Lightning precision for ``opts``: ``opts.precision`` itself, or for ``"auto"`` the choice of
    :func:`msfm.runtime.precision.resolve_precision` on the accelerator that will be used (``"bf16-mixed"`` or
    ``"32-true"``; ``"32-true"`` on accelerators msfm does not measure, such as TPUs)."""
    if opts.precision != "auto":
        return opts.precision
    if opts.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        return "32-true"
    return resolve_precision("auto", opts.accelerator).lightning


class TrainerOptions(BaseModel):
    """Hardware, precision and loop settings of a training run (JSON-serialisable; stored in ``config.json``).

    Attributes:
        accelerator: ``"auto"``, ``"cpu"``, ``"gpu"``/``"cuda"``, ``"mps"``.
        devices: ``"auto"``, a device count (``-1`` = all) or a list of device indices.
        strategy: Lightning strategy name: ``"auto"``, ``"ddp"``, ``"ddp_spawn"``, ``"fsdp"``,
            ``"fsdp_cpu_offload"``, ... (DeepSpeed is refused: its resume path unpickles arbitrary objects).
        num_nodes: Number of machines (multi-node needs a launcher such as SLURM or torchrun).
        precision: Lightning precision, e.g. ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, or ``"auto"``
            (``"bf16-mixed"`` where the accelerator computes bf16 fast, else ``"32-true"``; decided when the trainer
            is built, see :func:`lightning_precision`).
        max_steps: Optimiser steps to train for (``-1``: bounded by ``max_epochs``).
        max_epochs: Epochs to train for (None: bounded by ``max_steps``).
        accumulate: Batches per optimiser step (gradient accumulation).
        seed: Seed for ``lightning.seed_everything`` (torch, numpy, random, dataloader workers).
        gradient_clip: Global gradient-norm clip; None disables.
        log_every_n_steps: Logging interval.
        checkpoint_every_n_steps: ``last.ckpt`` and ``model/`` are written every this many optimiser steps (and at
            the end).
        val_check_interval: Validation interval (int: batches, float: fraction of an epoch); None: every epoch.
        progress_bar: Show a progress bar (``True`` picks rich, else tqdm) or disable it.
        model_summary: Log the parameter summary at the start.
        deterministic: Ask torch for deterministic kernels (slower; some ops raise).
        allow_config_change: Resume a run although its settings differ from the ones it was started with (other
            than :data:`RESUME_SAFE_SETTINGS`); the change is recorded as a new version in ``config.json``. Without
            it such a resume raises :class:`~msfm.errors.ConfigChangedError`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: Literal["auto"] | int | list[int] = "auto"
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: PrecisionName = "32-true"
    max_steps: int = Field(-1, ge=-1)
    max_epochs: int | None = Field(None, ge=1)
    accumulate: int = Field(1, ge=1)
    seed: int = 0
    gradient_clip: float | None = Field(1.0, gt=0)
    log_every_n_steps: int = Field(10, ge=1)
    checkpoint_every_n_steps: int = Field(500, ge=1)
    val_check_interval: int | float | None = None
    progress_bar: bool | Literal["rich", "tqdm"] = True
    model_summary: bool = True
    deterministic: bool = False
    allow_config_change: bool = False

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value.startswith("deepspeed"):
            msg = (
                f"strategy={value!r} is not supported: DeepSpeed resumes through its own torch.load calls, which "
                "can unpickle arbitrary objects. Use strategy='fsdp' (sharded training) or 'ddp'."
            )
            raise ValueError(msg)
        known = {"auto", *StrategyRegistry.available_strategies()}
        if value not in known:
            msg = f"Unknown strategy {value!r}; expected one of {sorted(known)}."
            raise ValueError(msg)
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: Any) -> Any:
        # "2", "-1", "0,1" from a command line or a YAML file mean the same as 2, -1, [0, 1].
        try:
            return parse_devices(value)
        except MsfmInputError as err:
            raise ValueError(str(err)) from None

    @field_validator("devices")
    @classmethod
    def _valid_devices(cls, value: Any) -> Any:
        if (isinstance(value, int) and value in (0,)) or (isinstance(value, int) and value < -1):
            msg = f"devices={value} is not a device count; use a positive count, -1 (all) or 'auto'."
            raise ValueError(msg)
        if isinstance(value, list) and not value:
            msg = "devices=[] selects no device; list device indices (e.g. [0, 1]) or use 'auto'."
            raise ValueError(msg)
        return value

    @field_validator("max_steps")
    @classmethod
    def _valid_steps(cls, value: int) -> int:
        if value == 0:
            msg = "max_steps=0 trains nothing; use a positive number, or -1 to bound training by max_epochs."
            raise ValueError(msg)
        return value


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never unpickles arbitrary objects and writes atomically.

    Loading always uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so a
    tampered ``last.ckpt`` cannot run code. Saving goes through a temporary sibling and ``os.replace``, so a kill
    during the save leaves the previous ``last.ckpt`` intact.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: The Lightning checkpoint dict.
            path: Destination file.
            storage_options: Unsupported; must be None.

        Raises:
            TypeError: If ``storage_options`` is given.
        """
        if storage_options is not None:
            msg = f"SafeCheckpointIO does not take storage_options; got {storage_options!r}."
            raise TypeError(msg)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(
        self, path: PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a Lightning checkpoint with ``weights_only=True`` whatever the caller asked.

        Args:
            path: Checkpoint file.
            map_location: Passed to ``torch.load``.
            weights_only: Ignored (always True).

        Returns:
            The checkpoint dict.

        Raises:
            CheckpointError: If the file is missing or holds objects other than tensors and plain containers.
        """
        return _safe_torch_load(path, map_location=map_location)


def _safe_torch_load(path: PathLike, *, map_location: Any = None, mmap: bool = False) -> dict[str, Any]:
    hint = "If the run was written by msfm, the file is damaged: delete it to restart from scratch."
    return load_torch_file(
        path, what="Lightning checkpoint", hint=hint, map_location=map_location or "cpu", mmap=mmap
    )


class _SafeFSDPStrategy(FSDPStrategy):
    """FSDP strategy whose full-state checkpoints are checked to be weights-only before Lightning loads them.

    Lightning loads full FSDP checkpoints with its own lazy unpickler (not ``weights_only``); a memory-mapped
    ``weights_only=True`` pass first refuses anything but tensors and plain values, without reading the tensors.
    """

    def load_checkpoint(self, checkpoint_path: PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Verify then load a checkpoint.

        Args:
            checkpoint_path: Checkpoint file (or sharded directory).
            weights_only: Ignored (always True).

        Returns:
            The checkpoint dict.
        """
        path = Path(self.broadcast(checkpoint_path))
        if path.is_file():
            _safe_torch_load(path, mmap=True)
        return super().load_checkpoint(path, weights_only=True)


class _RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing ``last.ckpt`` every N steps and also at the final step.

    Stock ``ModelCheckpoint`` with ``every_n_train_steps`` skips the final step when it is not a multiple of N, so
    a finished run would resume from an older state if its ``max_steps`` is raised later.
    """

    @property
    def state_key(self) -> str:
        """A fixed key, so a resumed run with another checkpoint interval still restores this callback's state."""
        return "msfm_run_checkpoint"

    def on_train_batch_end(
        self, trainer: lightning.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (
            0 < trainer.max_steps <= trainer.global_step
            and self._last_global_step_saved != trainer.global_step
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if (
            last_epoch
            and self._last_global_step_saved != trainer.global_step
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step


class _AppendingExperimentWriter(ExperimentWriter):
    """CSV writer that appends to an existing ``metrics.csv`` instead of deleting it (needed for resume)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                # Known columns: the writer then appends rows under the same header (or widens it).
                self.metrics_keys = sorted(next(csv.reader(fh), []))


class _RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``RUN_DIR/metrics.csv`` and keeping the rows of earlier, resumed segments."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def _reset_metrics(run: Path, resume_step: int | None) -> None:
    """Drop metric rows a resumed run will log again (steps >= the resume step); all rows for a fresh run."""
    path = run / METRICS_FILE
    if not path.is_file():
        return
    if resume_step is None:
        path.unlink(missing_ok=True)
        return
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = [r for r in reader if not r.get("step") or int(float(r["step"])) < resume_step]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())


class _StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar, labelled with the optimiser step when training is bounded by ``max_steps`` only.

    Lightning writes "Epoch 0/{max_epochs - 1}", which reads "Epoch 0/-2" when ``max_epochs`` is unset (-1):
    there the label becomes "step 120/900" and follows every batch.
    """

    def _steps_only(self) -> bool:
        max_epochs = self.trainer.max_epochs
        return max_epochs is None or max_epochs < 0

    def _step_description(self) -> str:
        max_steps = self.trainer.max_steps
        step = self.trainer.global_step
        return f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"

    def _get_train_description(self, current_epoch: int) -> str:
        if self._steps_only():
            return self._step_description()
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, *args: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self._steps_only() and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._step_description())


def _progress_bar(choice: bool | str) -> Callback | None:
    if choice is False:
        return None
    if choice in (True, "rich"):
        try:
            return _StepRichProgressBar()
        except (ImportError, ModuleNotFoundError):
            if choice == "rich":
                raise
    from lightning.pytorch.callbacks import TQDMProgressBar

    return TQDMProgressBar()


def _lightning_info_enabled() -> bool:
    return logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)


class _LevelAwareSummary(ModelSummary):
    """Lightning's parameter table, printed only while the ``lightning.pytorch`` logger lets INFO through."""

    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if _lightning_info_enabled():
            super().on_fit_start(trainer, pl_module)


class _LevelAwareRichSummary(RichModelSummary):
    """The rich table, which Lightning prints straight to the console; tied to the logger's level the same way, so
    one setting (the CLI's ``--verbose``) decides about it together with Lightning's other start-up messages."""

    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if _lightning_info_enabled():
            super().on_fit_start(trainer, pl_module)


def _model_summary(bar: Callback | None) -> Callback:
    return _LevelAwareRichSummary() if isinstance(bar, RichProgressBar) else _LevelAwareSummary()


def _build_strategy(
    options: TrainerOptions, fsdp_wrap_layers: Collection[type[nn.Module]] | None
) -> str | lightning.pytorch.strategies.Strategy:
    if not options.strategy.startswith("fsdp"):
        if fsdp_wrap_layers:
            logger.warning("fsdp_wrap_layers is ignored with strategy=%r", options.strategy)
        return options.strategy
    accel = options.accelerator
    if accel == "cpu" or (accel == "auto" and not torch.cuda.is_available()):
        msg = (
            f"strategy={options.strategy!r} needs CUDA GPUs, but accelerator={accel!r} resolves to CPU here. Use strategy='ddp' "
            "(or 'auto') on CPU, or run on a GPU machine."
        )
        raise MsfmInputError(msg)
    # Wrapping each transformer block separately is what makes FSDP shard memory; without a policy the whole
    # model is one unit. "full" state dicts keep last.ckpt a single file that our safe loader can check.
    policy = set(fsdp_wrap_layers) if fsdp_wrap_layers else None
    return _SafeFSDPStrategy(
        auto_wrap_policy=policy,
        state_dict_type="full",
        cpu_offload=options.strategy == "fsdp_cpu_offload",
        checkpoint_io=SafeCheckpointIO(),
    )


def build_trainer(
    options: TrainerOptions | Mapping[str, Any],
    run_dir: PathLike,
    *,
    callbacks: Iterable[Callback] = (),
    export: ExportSpec | None = None,
    fsdp_wrap_layers: Collection[type[nn.Module]] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> lightning.Trainer:
    """Build a ``lightning.Trainer`` that writes into ``run_dir`` following the run-directory contract.

    Seeds everything once (``options.seed``), logs to ``run_dir/metrics.csv``, writes ``run_dir/checkpoints/
    last.ckpt`` every ``checkpoint_every_n_steps`` and at the final step, loads checkpoints with
    ``weights_only=True``, and (with ``export``) keeps ``run_dir/model`` current.

    Args:
        options: Trainer settings.
        run_dir: Run directory (created if missing).
        callbacks: Extra Lightning callbacks.
        export: If given, export an msfm checkpoint directory to ``run_dir/model``.
        fsdp_wrap_layers: Layer classes FSDP wraps as separate shards (e.g. the transformer block class); only
            with ``strategy="fsdp"``.
        trainer_kwargs: Further ``lightning.Trainer`` arguments for cases the options do not cover (e.g.
            ``limit_val_batches``); they override the derived ones.

    Returns:
        The trainer. ``trainer.msfm_options`` holds the validated options (written to ``config.json`` by
        :func:`fit`).

    Raises:
        MsfmInputError: If the options are invalid or Lightning rejects the combination (e.g. FSDP on CPU,
            ``16-mixed`` on CPU).
    """
    opts = _coerce_options(options)
    if opts.max_steps == -1 and opts.max_epochs is None:
        msg = "TrainerOptions sets neither max_steps nor max_epochs; set one so the run (and lr schedule) has an end."
        raise MsfmInputError(msg)
    run = Path(run_dir)
    probe_writable(run)  # a read-only or full folder: OutputError before any training
    run.mkdir(parents=True, exist_ok=True)
    # Once, here: the model is usually built before this call, but the data order, dropout and masking draws all
    # happen afterwards, which is what must be reproducible.
    lightning.seed_everything(opts.seed, workers=True, verbose=False)

    ckpt_cb = _RunCheckpoint(
        dirpath=run / CHECKPOINTS_DIR,
        filename="step{step}",
        every_n_train_steps=opts.checkpoint_every_n_steps,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )
    all_callbacks: list[Callback] = [ckpt_cb]
    if export is not None:
        all_callbacks.append(ExportCallback.from_spec(run / MODEL_DIR, export))
    bar = _progress_bar(opts.progress_bar)
    if bar is not None:
        all_callbacks.append(bar)
    if opts.model_summary and not any(isinstance(cb, ModelSummary) for cb in callbacks):
        all_callbacks.append(_model_summary(bar))
    all_callbacks.extend(callbacks)

    strategy = _build_strategy(opts, fsdp_wrap_layers)
    kwargs: dict[str, Any] = {
        "accelerator": opts.accelerator,
        "devices": opts.devices,
        "strategy": strategy,
        "num_nodes": opts.num_nodes,
        "precision": lightning_precision(opts),
        "max_steps": opts.max_steps,
        "max_epochs": opts.max_epochs if opts.max_epochs is not None else -1,
        "accumulate_grad_batches": opts.accumulate,
        "gradient_clip_val": opts.gradient_clip,
        "gradient_clip_algorithm": "norm",
        "log_every_n_steps": opts.log_every_n_steps,
        "val_check_interval": opts.val_check_interval,
        "enable_progress_bar": bar is not None,
        "enable_model_summary": opts.model_summary,
        "deterministic": opts.deterministic,
        "default_root_dir": run,
        # name="" and version="" put metrics.csv directly into the run directory.
        "logger": _RunCSVLogger(save_dir=run, name="", version=""),
        "callbacks": all_callbacks,
    }
    if not isinstance(strategy, FSDPStrategy):
        kwargs["plugins"] = [SafeCheckpointIO()]
    kwargs.update(trainer_kwargs or {})
    try:
        trainer = lightning.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        msg = (
            f"Lightning rejected the trainer options (accelerator={opts.accelerator!r}, devices={opts.devices!r}, "
            f"strategy={opts.strategy!r}, precision={opts.precision!r}): {err}. Adjust these options for this machine."
        )
        raise MsfmInputError(msg) from err
    trainer.msfm_options = opts  # type: ignore[attr-defined]
    return trainer


def _coerce_options(options: TrainerOptions | Mapping[str, Any]) -> TrainerOptions:
    if isinstance(options, TrainerOptions):
        return options
    if isinstance(options, Mapping):
        from pydantic import ValidationError

        try:
            return TrainerOptions(**options)
        except ValidationError as err:
            msg = f"Invalid trainer options: {err}"
            raise MsfmInputError(msg) from err
    msg = f"options must be TrainerOptions or a dict; got {type(options).__name__}."
    raise MsfmInputError(msg)


def resume_step(run_dir: PathLike) -> int:
    """Optimiser step stored in ``run_dir/checkpoints/last.ckpt`` (0 for a new run).

    Streams that are a pure function of the batch index skip ``resume_step * accumulate`` micro-batches so a resumed
    run sees what an uninterrupted run would have seen.
    """
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        return 0
    # mmap: reads the pickle header, not the tensors, so peeking at the step is cheap for large models.
    return int(_safe_torch_load(ckpt, mmap=True).get("global_step", 0))


def _restore_loader_position(data: Any, ckpt: Path) -> None:
    """Give a resumable training loader its saved position inside the epoch before ``trainer.fit`` starts.

    Lightning restores loader states only when its fit loop is still "restarting" at data setup. With
    ``max_epochs`` (not ``max_steps``) the optimiser's schedule asks for ``estimated_stepping_batches`` during
    strategy setup, which sets up the training data before the checkpoint is restored, so the saved position was
    silently dropped and a run killed mid-epoch replayed the epoch's first batches. Loading the position here is
    idempotent (Lightning may load the same state again).
    """
    load = getattr(data, "load_state_dict", None)
    if not callable(load) or isinstance(data, lightning.LightningDataModule):
        return
    state = _safe_torch_load(ckpt, mmap=True)
    saved = state.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
    if len(saved) == 1 and isinstance(saved[0], dict) and saved[0]:
        load(saved[0])


def fit(
    trainer: lightning.Trainer,
    module: lightning.LightningModule,
    data: lightning.LightningDataModule | Any,
    run_dir: PathLike,
    *,
    val_dataloaders: Any = None,
    run_config: BaseModel | Mapping[str, Any] | None = None,
    resume: bool = True,
    resume_safe: Collection[str] = (),
    resume_guard: bool = True,
) -> Path:
    """Train ``module``, resuming from ``run_dir/checkpoints/last.ckpt`` when it exists.

    A resumed run must have the settings it was started with (:func:`check_resume`): the trainer options, the
    optimiser settings and ``run_config`` are compared with ``config.json`` before anything is written.

    Args:
        trainer: A trainer from :func:`build_trainer` for the same ``run_dir``.
        module: The LightningModule (usually :class:`msfm.engine.MsfmLightningModule`).
        data: A ``LightningDataModule`` or a training ``DataLoader``.
        run_dir: Run directory.
        val_dataloaders: Validation loader(s) when ``data`` is a loader.
        run_config: The caller's resolved config (model, data, ...), stored in ``config.json`` next to the
            trainer and optimiser settings.
        resume: Resume from ``last.ckpt`` if present; False starts from scratch (the old state is overwritten by
            the next save).
        resume_safe: Settings (last names) that may also change on resume, besides :data:`RESUME_SAFE_SETTINGS`.
        resume_guard: False when the caller has compared the settings of a resumed run itself (ROAM compares its
            ``run.json`` before any fold starts): changes are then only recorded in ``config.json``.

    Returns:
        The run directory.

    Raises:
        CheckpointError: If ``last.ckpt`` exists but cannot be loaded safely.
        ConfigChangedError: The run is resumed with other settings than it was started with (see
            :func:`check_resume`).
    """
    run = Path(run_dir)
    ckpt = last_checkpoint(run) if resume else None
    step = 0
    opts = getattr(trainer, "msfm_options", None)
    optim = getattr(module, "optim", None)
    record = settings_record(opts, optim, run_config)
    changes: dict[str, tuple[Any, Any]] = {}
    if ckpt is not None:
        changes = check_resume(
            run,
            trainer=opts,
            optim=optim,
            run_config=run_config,
            allow_change=bool(getattr(opts, _ALLOW_KEY, False)) or not resume_guard,
            resume_safe=resume_safe,
            warn=resume_guard,
        )
        step = resume_step(run)
        logger.info("resuming from step %d (%s)", step, ckpt)
        # The sanity check already ran when the run started; repeating it would also shift the random stream
        # (validation iterators draw seeds) relative to an uninterrupted run.
        trainer.num_sanity_val_steps = 0
        _restore_loader_position(data, ckpt)
    # Before trainer.fit the strategy may not know its rank yet (ranks launched by Lightning's subprocess
    # launcher); rank_zero_only.rank is read from the launcher's environment variables at import.
    if trainer.is_global_zero and rank_zero_only.rank == 0:
        _reset_metrics(run, step if ckpt is not None else None)
        atomic_write_json(
            run / RUN_CONFIG,
            run_config_document(
                run,
                record,
                step=step if ckpt is not None else None,
                changes=changes,
                resume_safe=resume_safe,
                accepted_by=_ALLOW_KEY if resume_guard else "the caller's own check (e.g. ROAM's run.json)",
            ),
        )
    fit_kwargs: dict[str, Any] = {"ckpt_path": ckpt, "weights_only": True}
    if isinstance(data, lightning.LightningDataModule):
        trainer.fit(module, datamodule=data, **fit_kwargs)
    else:
        trainer.fit(module, train_dataloaders=data, val_dataloaders=val_dataloaders, **fit_kwargs)
    return run
