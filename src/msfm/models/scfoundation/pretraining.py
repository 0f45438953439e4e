"""``train``: read-depth-aware masked pretraining of scFoundation (ours; upstream released no training code).

Runs through the shared Lightning engine (``msfm.engine``): any accelerator, DDP/FSDP across GPUs and nodes,
mixed precision, gradient accumulation, resume from ``RUN_DIR/checkpoints/last.ckpt`` after a kill, and an msfm
checkpoint directory exported to ``RUN_DIR/model`` at every save. A new model starts from a preset; with
``checkpoint=`` training continues from an msfm checkpoint's weights (same sizes, same gene panel).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from pydantic import BaseModel, ConfigDict, Field

from msfm.data import CellReadOptions, GenePanel
from msfm.data.stream import PanelRowStream
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.resume import check_resume
from msfm.engine.trainer import ExportCallback, TrainerOptions, build_trainer, fit, resume_step
from msfm.errors import MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.loading import CheckpointLike, backbone_of, load
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.objective import ObjectiveConfig, PretrainCollator, pretrain_loss
from msfm.models.scfoundation.provenance import preprocessing_record
from msfm.registry import preset_config
from msfm.runtime.atomic import PathLike, probe_writable
from msfm.runtime.config import build_settings
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import TrainResult

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PRESET", "PretrainBatchStream", "ScFoundationTrainConfig", "resolve_panel", "train"]

#: The preset of a new model when the settings name none.
DEFAULT_PRESET = "scfoundation-tiny"

TrainData = str | os.PathLike[str] | AnnData | Sequence[str | os.PathLike[str] | AnnData]


class ScFoundationTrainConfig(BaseModel):
    """Everything a pretraining run needs; written to ``RUN_DIR/config.json``.

    Build it from defaults, a YAML/JSON file and flat overrides with
    :func:`msfm.runtime.config.build_settings` (``train(..., config=..., lr=1e-3)`` does that): a flat key names a
    top-level field or a field of one section (``lr`` -> ``optim.lr``, ``devices`` -> ``trainer.devices``,
    ``layer`` -> ``read.layer``).
    """

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(
        None,
        description=(
            f"Model preset of a new model (msfm.registry; None = {DEFAULT_PRESET!r}). With checkpoint=, a preset "
            "given must have the checkpoint's sizes."
        ),
    )
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Fields replacing the preset's (with checkpoint=: must match it)."
    )
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig, description="Downsampling and masking."
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=100, schedule="cosine"),
        description="AdamW; upstream: lr 1e-4, wd 0, 9,766 warm-up steps at 1,024 cells per step.",
    )
    trainer: TrainerOptions = Field(default_factory=lambda: TrainerOptions(max_steps=1000, gradient_clip=1.0))
    read: CellReadOptions = Field(
        default_factory=CellReadOptions,
        description="How the training files are read (layer, gene_column, species, use_aliases, ...); raw counts.",
    )
    batch_size: int = Field(8, ge=1, description="Cells per device per micro-step.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    block_size: int = Field(256, ge=1, description="Cells per contiguous read from backed files.")
    gene_panel: str | None = Field(
        None,
        description=(
            "'scfoundation' (the default of a new model) = the 19,264 official genes (compatible with the "
            "released weights); 'data' = the panel genes present in the training data, in panel order (a much "
            "cheaper decoder for small studies); or a path to a file with one gene symbol per line. With "
            "checkpoint= the checkpoint's panel is used (a panel given must equal it)."
        ),
    )


def train(
    data: TrainData,
    out: PathLike,
    *,
    config: ScFoundationTrainConfig | Mapping[str, Any] | PathLike | None = None,
    checkpoint: CheckpointLike | None = None,
    callbacks: Sequence[Any] = (),
    **overrides: Any,
) -> TrainResult:
    """Read-depth-aware masked pretraining of scFoundation.

    Args:
        data: one or more ``.h5ad`` files (streamed from disk in backed mode) or in-memory AnnData objects, raw
            counts.
        out: the run directory. If it already holds a run, training resumes from its last checkpoint; with other
            settings than the run started with only when ``allow_config_change=True`` (recorded in its
            ``config.json``). ``num_workers`` is part of the data order here (rows are split between workers).
        config: run settings: a :class:`ScFoundationTrainConfig`, a mapping of its fields, or a YAML/JSON file.
        checkpoint: start from the weights of this msfm scFoundation checkpoint (continued pretraining; its
            sizes and gene panel are kept) instead of a new model from a preset.
        callbacks: extra Lightning callbacks (early stopping, custom logging, ...).
        **overrides: flat settings on top of ``config`` (``max_steps=``, ``lr=``, ``devices=``, ``preset=``,
            ``gene_panel=``, ``layer=``, ``progress_bar=False`` ...).

    Returns:
        ``TrainResult(run_dir=out, checkpoint=out / "model", metrics)``; pass it wherever a checkpoint goes.

    Raises:
        MsfmInputError: no data, an unknown or invalid setting, or settings that disagree with ``checkpoint``.
        CheckpointError: ``checkpoint`` is not an msfm scFoundation checkpoint.
        ConfigChangedError: ``out`` holds a run started with other settings (named as ``old -> new``).
    """
    settings = _settings(config, overrides)
    # Before anything is read or written: a resumed run keeps the settings it was started with.
    check_resume(
        out, trainer=settings.trainer, optim=settings.optim, run_config=settings.model_dump(mode="json")
    )
    sources = _as_sources(data)
    if settings.read.pre_normalized:
        msg = (
            "Pretraining needs raw counts (cells are downsampled binomially); got pre_normalized=True. Pass the "
            "count matrix (read.layer / layer=...)."
        )
        raise MsfmInputError(msg)
    init = backbone_of(load(checkpoint, device="cpu")) if checkpoint is not None else None
    panel = _panel(settings, sources, init)
    model_cfg = _model_config(settings, panel, init)
    run = Path(out)
    probe_writable(run)  # a read-only or full folder: OutputError before any training
    run.mkdir(parents=True, exist_ok=True)
    seed = settings.trainer.seed
    stream = PanelRowStream(
        sources,
        panel,
        layer=settings.read.layer,
        block_size=settings.block_size,
        seed=seed,
        **_gene_kwargs(settings.read),
    )
    collate = PretrainCollator(settings.objective, num_genes=model_cfg.num_genes, seed=seed)
    skip = resume_step(run) * settings.trainer.accumulate
    if skip:
        logger.info("resuming: skipping the %d micro-batches per rank already trained on", skip)
    batches = PretrainBatchStream(
        stream, collate, batch_size=settings.batch_size, seed=seed, skip_batches=skip
    )
    # Its own generator: creating the loader's iterator then draws no seed from the global RNG, which the engine
    # restores on resume (dropout), so a resumed run continues with the same random stream.
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=settings.num_workers,
        persistent_workers=settings.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    torch.manual_seed(seed)
    model = ScFoundation(model_cfg)
    if init is not None:
        model.load_state_dict(init.model.state_dict(), strict=True)
    module = MsfmLightningModule(model, pretrain_loss, settings.optim)
    run_config = settings.model_dump(mode="json")
    extra = {"source": "msfm-pretrain", "run_config": run_config, "gene_mapping": stream.mapping_reports()}
    if init is not None:
        extra["init_checkpoint"] = str(init.path)
    export = ExportCallback(
        family="scfoundation",
        config=model_cfg,
        gene_panel=list(panel.symbols),
        gene_panel_name=panel.name,
        preprocessing=preprocessing_record(panel_name=panel.name),
        get_state_dict=lambda: model.state_dict(),
        extra_meta=extra,
    )
    trainer = build_trainer(settings.trainer, run, callbacks=[export, *callbacks])
    fit(trainer, module, loader, run, run_config=run_config)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["global_step"] = int(trainer.global_step)
    return TrainResult(run_dir=run, checkpoint=run / "model", metrics=metrics)


def _settings(config: Any, overrides: Mapping[str, Any]) -> ScFoundationTrainConfig:
    if isinstance(config, str | os.PathLike):
        return build_settings(ScFoundationTrainConfig, file=config, overrides=overrides)
    if config is not None and not isinstance(config, BaseModel | Mapping):
        msg = (
            f"config must be a ScFoundationTrainConfig, a mapping of its fields or a YAML/JSON path; got "
            f"{type(config).__name__}."
        )
        raise MsfmInputError(msg)
    return build_settings(ScFoundationTrainConfig, base=config, overrides=overrides)


def _as_sources(data: TrainData) -> list[str | os.PathLike[str] | AnnData]:
    sources = [data] if isinstance(data, str | os.PathLike | AnnData) else list(data)
    if not sources:
        msg = "No training data given: pass one or more .h5ad files (or AnnData objects) with raw counts."
        raise MsfmInputError(msg)
    return sources


def _gene_kwargs(read: CellReadOptions) -> dict[str, Any]:
    """The gene-mapping fields of the reading options (``harmonize_genes`` keywords)."""
    return {
        "gene_column": read.gene_column,
        "species": read.species,
        "use_aliases": read.use_aliases,
        "min_panel_fraction": read.min_panel_fraction,
    }


def _panel(settings: ScFoundationTrainConfig, sources: list[Any], init: Loaded | None) -> GenePanel:
    """The checkpoint's panel when continuing, else the one ``settings.gene_panel`` names."""
    if init is None:
        return resolve_panel(settings.gene_panel or "scfoundation", sources, settings.read)
    panel: GenePanel = init.vocab
    if settings.gene_panel is not None:
        wanted = resolve_panel(settings.gene_panel, sources, settings.read)
        if list(wanted.symbols) != list(panel.symbols):
            msg = (
                f"gene_panel={settings.gene_panel!r} gives {len(wanted)} genes, but the checkpoint {init.path} was "
                f"trained on its own {len(panel)}-gene panel, which training from it keeps. Drop gene_panel, or "
                "train a new model without checkpoint=."
            )
            raise MsfmInputError(msg)
    return panel


def _model_config(
    settings: ScFoundationTrainConfig, panel: GenePanel, init: Loaded | None
) -> ScFoundationConfig:
    """A new model's config (preset + overrides, sized for ``panel``), or the checkpoint's, checked against them."""
    if init is None:
        cfg = preset_config(
            settings.preset or DEFAULT_PRESET, family="scfoundation", **settings.model_overrides
        )
        if cfg.num_genes != len(panel):
            logger.info("model sized for a %d-gene panel (%s)", len(panel), panel.name)
            cfg = ScFoundationConfig(**{**cfg.model_dump(), "num_genes": len(panel)})
        return cfg
    have: ScFoundationConfig = init.config
    asked = dict(settings.model_overrides)
    if settings.preset is not None:
        asked = {**preset_config(settings.preset, family="scfoundation", **asked).model_dump(), **asked}
        asked.pop("num_genes", None)  # a preset is sized for the full panel; the checkpoint's panel is kept
    current = have.model_dump()
    unknown = sorted(set(asked) - set(current))
    if unknown:
        msg = f"model_overrides names unknown ScFoundationConfig fields {unknown}."
        raise MsfmInputError(msg)
    differ = {k: (current[k], v) for k, v in asked.items() if current[k] != v}
    if differ:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs settings {b!r}" for k, (a, b) in sorted(differ.items()))
        msg = (
            f"The settings ask for another model than the checkpoint {init.path} holds ({shown}). Training from a "
            "checkpoint keeps its model; drop preset/model_overrides, or train a new model without checkpoint=."
        )
        raise MsfmInputError(msg)
    return have


def resolve_panel(
    choice: str, data: Sequence[str | os.PathLike[str] | AnnData], options: CellReadOptions | None = None
) -> GenePanel:
    """The gene panel a new model is built for (see ``ScFoundationTrainConfig.gene_panel``)."""
    from msfm.data import harmonize_genes, read

    full = GenePanel.scfoundation()
    if choice == "scfoundation":
        return full
    if choice != "data":
        path = Path(choice)
        if not path.exists():
            msg = f"gene_panel={choice!r} is neither 'scfoundation', 'data' nor an existing gene-list file."
            raise MsfmInputError(msg)
        return GenePanel.from_file(path)
    opts = options or CellReadOptions()
    used = np.zeros(len(full), dtype=bool)
    for src in data:
        adata = src if isinstance(src, AnnData) else read(src, backed=Path(src).suffix == ".h5ad")
        try:
            # The model is sized to the genes found here, so the share of the full 19,264-gene panel found is
            # expected to be small: warning about it (warn_panel_fraction) would mislead, so only the hard
            # minimum is kept.
            kwargs = _gene_kwargs(opts)
            mapping = harmonize_genes(
                adata.var, full, **kwargs, warn_panel_fraction=kwargs["min_panel_fraction"]
            )
        finally:
            if not isinstance(src, AnnData) and adata.isbacked:
                adata.file.close()
        used[mapping.input_to_panel[mapping.input_to_panel >= 0]] = True
    symbols = [full.symbols[i] for i in np.flatnonzero(used)]
    return GenePanel.from_symbols(symbols, name=f"scfoundation-subset-{len(symbols)}")


class PretrainBatchStream(torch.utils.data.IterableDataset):
    """Collated pretraining batches from a :class:`PanelRowStream`, reproducible across a resume.

    The masks and downsampling of micro-batch ``k`` of shard ``s`` come from ``default_rng([seed, s, k])``,
    and the row stream is deterministic, so a run resumed at step N (``skip_batches`` = N x accumulate)
    sees exactly the batches an uninterrupted run would have seen from there on.
    """

    def __init__(
        self,
        rows: PanelRowStream,
        collate: PretrainCollator,
        *,
        batch_size: int,
        seed: int,
        skip_batches: int = 0,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.collate = collate
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.skip_batches = int(skip_batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import scipy.sparse as sp

        from msfm.runtime.devices import rank_world

        rank, _world = rank_world()
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard = rank * n_workers + worker
        # The DataLoader takes batches from its workers in turn: worker w produced every n-th of them.
        skip = max(0, -(-(self.skip_batches - worker) // n_workers))
        buf: list[Any] = []
        k = 0
        for row in self.rows:
            buf.append(row)
            if len(buf) < self.batch_size:
                continue
            if k >= skip:
                rng = np.random.default_rng([self.seed, shard, k])
                yield self.collate(sp.vstack(buf, format="csr"), rng=rng)
            k += 1
            buf = []
