"""GeST pretraining from spatial AnnData through the shared Lightning engine.

``train(data, out, config=None, checkpoint=None, **overrides)``:

1. validates coordinates (µm) and expression, picks the genes (top-variance genes in model space, or a given list),
2. fits the meta-cell vocabulary (PCA + k-means + nested levels) on the training cells, or reuses the run's
   vocabulary when resuming, and quantises every cell,
3. streams serialised square windows (:class:`msfm.tokenizers.spatial.WindowSampler`) from all sections,
4. trains the decoder with the hierarchical cross-entropy, writing the engine's run directory::

    RUN_DIR/
      checkpoints/last.ckpt   # resume state: repeating the same call continues a killed run exactly
      model/                  # msfm GeST checkpoint (weights + vocabulary + window settings)
      vocab.safetensors       # the run's meta-cell vocabulary (reused on resume)
      config.json, metrics.csv

Window ``k`` of the stream is a pure function of ``(seed, k)``, so a resumed run sees the windows an uninterrupted
run would have seen. DDP/FSDP, precision and accumulation come from :class:`msfm.engine.TrainerOptions`.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from lightning.pytorch.utilities import rank_zero_only
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from msfm.data.options import SpatialReadOptions
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.sampler import BatchStream
from msfm.engine.trainer import (
    ExportCallback,
    TrainerOptions,
    build_trainer,
    check_resume,
    fit,
    resume_step,
)
from msfm.errors import MsfmInputError
from msfm.models.gest.checkpoint import FAMILY, VOCAB_PREFIX, CheckpointLike, generative_model, load
from msfm.models.gest.config import GestConfig
from msfm.models.gest.data import TARGET_SUM, cell_selection, collate_windows, select_genes, spatial_cells
from msfm.models.gest.files import DataLike, read_data
from msfm.models.gest.model import Gest, GestBlock
from msfm.models.gest.objective import GestLossConfig, gest_objective
from msfm.models.gest.options import nest_read_options
from msfm.registry import preset_config
from msfm.runtime.config import build_settings
from msfm.runtime.h5ad import check_output
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import TrainResult
from msfm.tokenizers.spatial import MetaCellVocab, WindowSampler

logger = logging.getLogger(__name__)

__all__ = ["GestTrainConfig", "WindowStream", "final_metrics", "preprocessing_record", "train"]

PathLike = str | os.PathLike[str]
VOCAB_FILE = "vocab.safetensors"
#: Settings besides msfm.engine.resume.RESUME_SAFE_SETTINGS that may change on resume: the window stream does not
#: depend on the number of DataLoader workers.
RESUME_SAFE = ("num_workers",)


class GestTrainConfig(BaseModel):
    """Everything a GeST training run needs besides the data (stored in ``RUN_DIR/config.json``).

    Attributes:
        preset: model preset (``gest-l8h8``, ``gest-small``, ``gest-tiny``).
        model_overrides: config fields replacing the preset's (``dim``, ``depth``, ``dropout``, ...).
        init_from: an msfm GeST checkpoint to continue training from (its vocabulary and genes are kept).
        genes: the genes to model; None picks ``n_genes`` top-variance genes of the training cells.
        n_genes: number of genes picked when ``genes`` is None (the paper suggests 2,000 HVGs for Visium).
        n_metacells: K, the meta-cell vocabulary size (paper default unknown; 2048 is ours).
        n_pcs: PCA dimensions of the vocabulary.
        levels: nested coarser levels of the hierarchy (15/10/5 per a review of the paper).
        side_um: window side in µm (paper default 600).
        max_cells: cap on cells per window (denser windows are subsampled).
        min_cells: smallest window used (a window with one cell has nothing to predict).
        order: serialisation (``corner_sweep`` as in the paper, ``random`` or ``raster`` for ablations).
        jitter_um: Gumbel jitter of the corner sweep (None: 5 % of the side).
        batch_size: windows per micro-batch.
        level_weights: hierarchical loss weights (None: equal, 0.25 each for four levels).
        optim: optimiser and schedule.
        trainer: hardware, precision, steps, checkpointing.
        num_workers: DataLoader worker processes.
        read: how to read the data (:class:`msfm.data.SpatialReadOptions`; flat keys such as
            ``pre_normalized`` land here; older files with these keys at the top level still work).
        seed: seed of the vocabulary, the window stream and the model initialisation (``train(seed=...)`` also
            seeds the trainer).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "gest-small"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    genes: list[str] | None = None
    n_genes: int = Field(2000, gt=0)
    n_metacells: int = Field(2048, gt=1)
    n_pcs: int = Field(50, gt=0)
    levels: tuple[int, ...] = (15, 10, 5)
    side_um: float = Field(600.0, gt=0)
    max_cells: int = Field(1024, ge=2)
    min_cells: int = Field(2, ge=2)
    order: Literal["corner_sweep", "random", "raster"] = "corner_sweep"
    jitter_um: float | None = Field(None, ge=0)
    batch_size: int = Field(8, gt=0)
    level_weights: tuple[float, ...] | None = None
    optim: OptimConfig = OptimConfig(lr=3e-4, weight_decay=0.01, warmup_steps=100, min_lr_ratio=0.1)
    trainer: TrainerOptions = TrainerOptions(max_steps=2000, checkpoint_every_n_steps=200)
    num_workers: int = Field(0, ge=0)
    read: SpatialReadOptions = SpatialReadOptions()
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _nest_read(cls, data: Any) -> Any:
        return nest_read_options(data)

    @field_validator("model_overrides")
    @classmethod
    def _no_vocab_sizes(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = sorted({"n_genes", "level_sizes"} & set(value))
        if bad:
            msg = f"model_overrides {bad} are set from the vocabulary; use n_genes / n_metacells / levels instead."
            raise ValueError(msg)
        return value


def preprocessing_record(kind: str) -> dict[str, Any]:
    """How expression is brought into model space (stored with every checkpoint)."""
    if kind == "counts":
        return {"expression": "log1p_cp10k", "target_sum": TARGET_SUM, "total_over": "all genes of the data"}
    return {
        "expression": "as_given",
        "note": "pre-normalised input (expected log1p of depth-normalised values)",
    }


class WindowStream(BatchStream):
    """Endless, exactly reproducible stream of collated window batches.

    Micro-batch ``m`` of rank ``r`` out of ``W`` holds windows ``(m * W + r) * batch_size + i`` of the sampler;
    ``skip_batches`` starts at micro-batch ``skip_batches`` in O(1), so a resumed run continues where it stopped.

    Args:
        xy: ``[n, 2]`` positions (µm) of the cells the sampler indexes.
        tokens: ``[n]`` meta-cell token of every such cell.
        sampler: the window sampler over the training cells.
        batch_size: windows per micro-batch.
        skip_batches: micro-batches (per rank) already consumed.
    """

    def __init__(
        self,
        xy: np.ndarray,
        tokens: np.ndarray,
        sampler: WindowSampler,
        *,
        batch_size: int,
        skip_batches: int = 0,
    ) -> None:
        super().__init__(skip_batches=skip_batches)
        self.xy = xy
        self.tokens = tokens
        self.sampler = sampler
        self.batch_size = int(batch_size)

    def batch(self, m: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """Collated micro-batch ``m`` of ``rank``."""
        first = (int(m) * world + rank) * self.batch_size
        seqs = []
        for k in range(first, first + self.batch_size):
            w = self.sampler.window(k)
            seqs.append((self.xy[w.cells], self.tokens[w.cells], w.bounds))
        return collate_windows(seqs)


def _train_mask(adata: AnnData, train_mask: Any) -> np.ndarray:
    if train_mask is None:
        return np.ones(adata.n_obs, dtype=bool)
    mask = cell_selection(adata, train_mask, "train_mask")
    if mask.sum() < 2:
        msg = f"train_mask selects {int(mask.sum())} cells; at least 2 are needed to form a window."
        raise MsfmInputError(msg)
    return mask


def final_metrics(trainer: Any) -> dict[str, Any]:
    """Plain final metrics of a finished Lightning run (callback metrics, global step, epoch)."""
    out: dict[str, Any] = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
    for key, value in trainer.callback_metrics.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _settings(
    config: GestTrainConfig | Mapping[str, Any] | PathLike | None, overrides: dict[str, Any]
) -> GestTrainConfig:
    """``config`` plus flat overrides; ``seed=`` also seeds the trainer.

    A file's sections are merged over the defaults (``optim: {lr: 0.01}`` keeps the default warm-up); a mapping
    is validated as ``GestTrainConfig(**mapping)``.
    """
    overrides = dict(overrides)
    if overrides.get("seed") is not None:
        overrides.setdefault("trainer.seed", overrides["seed"])
    if isinstance(config, str | os.PathLike):
        return build_settings(
            GestTrainConfig, base=GestTrainConfig(), file=config, overrides=overrides, what="GestTrainConfig"
        )
    base = GestTrainConfig() if config is None else config
    return build_settings(GestTrainConfig, base=base, overrides=overrides, what="GestTrainConfig")


def train(
    data: DataLike,
    out: PathLike,
    *,
    config: GestTrainConfig | Mapping[str, Any] | PathLike | None = None,
    checkpoint: CheckpointLike | None = None,
    train_mask: Any = None,
    held_out: Any = None,
    callbacks: Sequence[Any] = (),
    **overrides: Any,
) -> TrainResult:
    """Pretrain (or continue training) a GeST model on one AnnData with spatial coordinates.

    Args:
        data: cells or spots with ``obsm['spatial']`` (µm or ``scale``), counts or log-normalised values and an
            optional section column (AnnData, file or Visium folder). Never modified.
        out: run directory; an existing run there is resumed exactly (same windows, same weights). Its settings
            must be the ones it was started with unless ``allow_config_change=True`` (recorded in ``config.json``).
        config: run settings: a :class:`GestTrainConfig`, a mapping of its fields, or a YAML/JSON file.
        checkpoint: a GeST checkpoint to start from (fine-tuning: its vocabulary and genes are kept); the same as
            ``init_from``.
        train_mask: bool array, boolean obs column, names or positions: only these cells are used (as window
            content and vocabulary fit); the rest stay unseen, e.g. for held-out evaluation.
        held_out: the complement of ``train_mask`` (same forms): these cells stay unseen. Give one of the two.
        callbacks: extra Lightning callbacks.
        **overrides: flat settings on top of ``config`` (``max_steps=``, ``lr=``, ``devices=``, ``n_metacells=``,
            reading options such as ``pre_normalized=``; dotted keys such as ``optim.warmup_steps`` too).

    Returns:
        ``TrainResult(run_dir=out, checkpoint=out/model, metrics)``; pass it wherever a checkpoint is expected.

    Raises:
        MsfmInputError: unknown or invalid settings, bad data, too few cells for the vocabulary, windows too
            sparse for ``side_um``.
        ConfigChangedError: ``out`` holds a run started with other settings (named as ``old -> new``).
    """
    settings = _settings(config, overrides)
    if checkpoint is not None:
        init_name = str(checkpoint.path) if isinstance(checkpoint, Loaded) else os.fspath(checkpoint)
        settings = settings.model_copy(update={"init_from": init_name})
    run = check_output(out, overwrite=True, data=data, create_parents=True)
    # Before the data is read and the vocabulary fitted: a resumed run keeps the settings it was started with.
    check_resume(
        run,
        trainer=settings.trainer,
        optim=settings.optim,
        run_config=settings.model_dump(mode="json"),
        resume_safe=RESUME_SAFE,
    )
    if run.exists() and not run.is_dir():
        msg = f"out={str(run)!r} is a file; the run directory must be a folder."
        raise MsfmInputError(msg)
    adata = read_data(data)
    run.mkdir(parents=True, exist_ok=True)
    if train_mask is not None and held_out is not None:
        msg = "Give train_mask= (cells to train on) or held_out= (cells to leave out), not both."
        raise MsfmInputError(msg)
    if held_out is not None:
        train_mask = ~cell_selection(adata, held_out, "held_out")
    mask = _train_mask(adata, train_mask)
    init_source = checkpoint if checkpoint is not None else settings.init_from
    init = load(init_source, device="cpu") if init_source is not None else None
    if init is not None:
        generative_model(init, "train(checkpoint=...)")
    return _fit(adata, run, settings, mask, init, callbacks)


def _fit(
    adata: AnnData,
    run: Path,
    config: GestTrainConfig,
    mask: np.ndarray,
    init: Loaded | None,
    callbacks: Sequence[Any],
) -> TrainResult:
    vocab_path = run / VOCAB_FILE
    vocab: MetaCellVocab | None = None
    if init is not None:
        vocab = init.vocab
    elif vocab_path.is_file():
        vocab = MetaCellVocab.load(vocab_path)
        logger.info("reusing the run's vocabulary %s (K=%d)", vocab_path, vocab.n_metacells)
    genes = vocab.genes if vocab is not None else config.genes
    cells = spatial_cells(adata, genes, config.read)
    if genes is None:
        # No gene list: the top-variance genes of the training cells (the data's genes, in var order).
        genes = select_genes(cells.expr[np.flatnonzero(mask)], cells.genes, config.n_genes)
        cells = cells.subset_genes(genes)
    if vocab is None:
        x_fit = cells.expr[np.flatnonzero(mask)]
        n_fit = x_fit.shape[0]
        if config.n_metacells > n_fit:
            msg = (
                f"n_metacells={config.n_metacells} meta-cells requested but only {n_fit} training cells; use at most "
                f"{max(2, n_fit // 4)} (about one meta-cell per 4+ cells)."
            )
            raise MsfmInputError(msg)
        vocab = MetaCellVocab.fit(
            x_fit,
            list(genes),
            n_metacells=config.n_metacells,
            n_pcs=config.n_pcs,
            levels=config.levels,
            seed=config.seed,
        )
    tokens = vocab.assign(cells.expr)

    # Only training cells exist for the sampler: held-out cells never appear in a window, even as context.
    train_idx = np.flatnonzero(mask)
    sampler = WindowSampler(
        cells.xy[train_idx],
        cells.section[train_idx],
        side_um=config.side_um,
        max_cells=config.max_cells,
        order=config.order,
        jitter_um=config.jitter_um,
        min_cells=config.min_cells,
        seed=config.seed,
    )
    if init is not None:
        # A copy: fine-tuning must not change a model the caller passed in.
        model, model_cfg = copy.deepcopy(init.model).train(), init.model.config
        if config.model_overrides:
            model_cfg = model_cfg.model_copy(update=config.model_overrides)
            fresh = Gest(GestConfig(**model_cfg.model_dump()))
            fresh.load_state_dict(model.state_dict(), strict=True)
            model = fresh.train()
    else:
        model_cfg = preset_config(
            config.preset,
            family="gest",
            **config.model_overrides,
            n_genes=vocab.n_genes,
            level_sizes=tuple(int(s) for s in vocab.level_sizes),
        )
        torch.manual_seed(config.seed)
        model = Gest(model_cfg)
        model.set_vocabulary(torch.from_numpy(vocab.centroids_expr), torch.from_numpy(vocab.hierarchy))

    opts = config.trainer
    skip = resume_step(run) * opts.accumulate
    stream = WindowStream(
        cells.xy[train_idx], tokens[train_idx], sampler, batch_size=config.batch_size, skip_batches=skip
    )
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    objective = functools.partial(gest_objective, config=GestLossConfig(level_weights=config.level_weights))
    module = MsfmLightningModule(model, objective, config.optim)
    vocab_tensors = {VOCAB_PREFIX + k: v for k, v in vocab.to_tensors().items()}

    def export_state(lightning_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {k[len("model.") :]: v for k, v in lightning_state.items() if k.startswith("model.")}
        return {**state, **vocab_tensors}

    window = {
        "side_um": config.side_um,
        "max_cells": config.max_cells,
        "order": config.order,
        "jitter_um": config.jitter_um,
    }
    export = ExportCallback(
        FAMILY,
        model_cfg,
        gene_panel=list(vocab.genes),
        gene_panel_name="gest",
        preprocessing=preprocessing_record(cells.kind),
        get_state_dict=export_state,
        extra_meta={
            "source": "msfm-gest-train",
            "window": window,
            "vocab": vocab.meta_dict(),
            "n_train_cells": int(mask.sum()),
            "n_cells": int(cells.n_obs),
            "init_from": config.init_from,
            "gene_mapping": cells.mapping_report,
        },
    )
    wrap = [GestBlock] if opts.strategy.startswith("fsdp") else None
    trainer = build_trainer(
        opts,
        run,
        callbacks=[export, *callbacks],
        fsdp_wrap_layers=wrap,
        trainer_kwargs={"limit_val_batches": 0},
    )
    if trainer.is_global_zero and rank_zero_only.rank == 0 and not vocab_path.is_file():
        vocab.save(vocab_path)
    fit(trainer, module, loader, run, run_config=config.model_dump(mode="json"), resume_safe=RESUME_SAFE)
    metrics = {**final_metrics(trainer), "n_train_cells": int(mask.sum()), "n_cells": int(cells.n_obs)}
    return TrainResult(run_dir=run, checkpoint=run / "model", metrics=metrics)
