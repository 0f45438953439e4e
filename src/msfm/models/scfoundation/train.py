"""scFoundation training entry points: read-depth-aware pretraining and cell-type fine-tuning.

Both run through the shared Lightning engine (``msfm.engine``): any accelerator, DDP/FSDP across GPUs and
nodes, mixed precision, gradient accumulation, resume from ``RUN_DIR/checkpoints/last.ckpt`` after a
kill, and an msfm checkpoint directory exported to ``RUN_DIR/model`` at every save.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from pydantic import BaseModel, ConfigDict, Field

from msfm.data import GenePanel
from msfm.data.stream import PanelRowStream
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.trainer import ExportCallback, TrainerOptions, build_trainer, fit, resume_step
from msfm.errors import MsfmInputError
from msfm.models.scfoundation.api import prepare, preprocessing_record
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.finetune import (
    CellClassifierConfig,
    ScFoundationCellClassifier,
    classification_loss,
)
from msfm.models.scfoundation.inference import load_model
from msfm.models.scfoundation.model import ScFoundation
from msfm.models.scfoundation.objective import PretrainCollator, PretrainConfig, pretrain_loss
from msfm.registry import preset_config
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.config import read_config_file
from msfm.tokenizers.gene_panel import ScFoundationTokenizer

logger = logging.getLogger(__name__)

_TRAINER_KEYS = {
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "max_steps",
    "max_epochs",
    "accumulate",
    "seed",
    "gradient_clip",
    "log_every_n_steps",
    "checkpoint_every_n_steps",
    "progress_bar",
}
_OPTIM_KEYS = {"lr", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio"}


class PretrainRunConfig(BaseModel):
    """Everything a pretraining run needs; written to ``RUN_DIR/config.json``."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("scfoundation-tiny", description="Model preset (msfm.registry).")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Fields replacing the preset's."
    )
    objective: PretrainConfig = Field(default_factory=PretrainConfig, description="Downsampling and masking.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=100, schedule="cosine"),
        description="AdamW; upstream: lr 1e-4, wd 0, 9,766 warm-up steps at 1,024 cells per step.",
    )
    trainer: TrainerOptions = Field(default_factory=lambda: TrainerOptions(max_steps=1000, gradient_clip=1.0))
    batch_size: int = Field(8, ge=1, description="Cells per device per micro-step.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    block_size: int = Field(256, ge=1, description="Cells per contiguous read from backed files.")
    layer: str | None = Field(None, description="Matrix to read (default: the count contract's choice).")
    gene_panel: str = Field(
        "scfoundation",
        description=(
            "'scfoundation' = the 19,264 official genes (compatible with the released weights); 'data' = the "
            "panel genes present in the training data, in panel order (a much cheaper decoder for small "
            "studies); or a path to a file with one gene symbol per line."
        ),
    )
    gene_column: str | None = Field(None, description="var column with symbols/Ensembl IDs.")
    species: Literal["human", "mouse"] = Field("human", description="mouse genes are mapped via orthologs.")
    use_aliases: bool = Field(True, description="Map previous/alias symbols.")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PretrainRunConfig:
        """Read a YAML or JSON file with these fields (nested sections as mappings)."""
        return cls.model_validate(read_config_file(path, what="PretrainRunConfig"))

    def with_overrides(self, flat: dict[str, Any], *, progress_bar: bool | None = None) -> PretrainRunConfig:
        """Apply flat CLI-style overrides (``max_steps``, ``lr``, ``devices`` ...) to the right section."""
        data = self.model_dump()
        for key, value in flat.items():
            if key in _TRAINER_KEYS:
                data["trainer"][key] = _parse_devices(value) if key == "devices" else value
            elif key in _OPTIM_KEYS:
                data["optim"][key] = value
            elif key in data:
                data[key] = value
            else:
                msg = f"Unknown override {key!r}; known: {sorted(set(data) | _TRAINER_KEYS | _OPTIM_KEYS)}."
                raise MsfmInputError(msg)
        if progress_bar is not None:
            data["trainer"]["progress_bar"] = progress_bar
        return PretrainRunConfig.model_validate(data)

    def model_config_resolved(self) -> ScFoundationConfig:
        base = preset_config(self.preset, family="scfoundation")
        return base.model_copy(update=self.model_overrides) if self.model_overrides else base


def _parse_devices(value: Any) -> Any:
    if isinstance(value, str):
        if value == "auto":
            return value
        if "," in value:
            return [int(v) for v in value.split(",") if v]
        if value.isdigit():
            return int(value)
    return value


def pretrain(
    data: Sequence[str | os.PathLike[str] | AnnData],
    out: str | os.PathLike[str],
    config: PretrainRunConfig | None = None,
    *,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Read-depth-aware masked pretraining of scFoundation; returns ``RUN_DIR/model``.

    Args:
        data: ``.h5ad`` files (streamed from disk in backed mode) or in-memory AnnData objects, raw counts.
        out: the run directory. If it already holds a run, training resumes from its last checkpoint.
        config: run settings (preset, objective, optimiser, trainer); defaults to the tiny preset.
        callbacks: extra Lightning callbacks (early stopping, custom logging, ...).
    """
    config = config or PretrainRunConfig()
    if not data:
        msg = "No training data given: pass one or more .h5ad files (or AnnData objects) with raw counts."
        raise MsfmInputError(msg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gene_kwargs = {
        "gene_column": config.gene_column,
        "species": config.species,
        "use_aliases": config.use_aliases,
    }
    panel = resolve_panel(config.gene_panel, data, layer=config.layer, **gene_kwargs)
    model_cfg = config.model_config_resolved()
    if model_cfg.num_genes != len(panel):
        model_cfg = model_cfg.model_copy(update={"num_genes": len(panel)})
        logger.info("model sized for a %d-gene panel (%s)", len(panel), panel.name)
    stream = PanelRowStream(
        list(data),
        panel,
        layer=config.layer,
        block_size=config.block_size,
        seed=config.trainer.seed,
        **gene_kwargs,
    )
    collate = PretrainCollator(config.objective, num_genes=model_cfg.num_genes, seed=config.trainer.seed)
    skip = resume_step(out) * config.trainer.accumulate
    if skip:
        logger.info("resuming: skipping the %d micro-batches per rank already trained on", skip)
    batches = PretrainBatchStream(
        stream, collate, batch_size=config.batch_size, seed=config.trainer.seed, skip_batches=skip
    )
    # Its own generator: creating the loader's iterator then draws no seed from the global RNG, which the engine
    # restores on resume (dropout), so a resumed run continues with the same random stream.
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.trainer.seed),
    )
    torch.manual_seed(config.trainer.seed)
    model = ScFoundation(model_cfg)
    module = MsfmLightningModule(model, pretrain_loss, config.optim)
    export = ExportCallback(
        family="scfoundation",
        config=model_cfg,
        gene_panel=list(panel.symbols),
        gene_panel_name=panel.name,
        preprocessing=preprocessing_record(panel_name=panel.name),
        get_state_dict=lambda: model.state_dict(),
        extra_meta={
            "source": "msfm-pretrain",
            "run_config": config.model_dump(mode="json"),
            "gene_mapping": stream.mapping_reports(),
        },
    )
    trainer = build_trainer(config.trainer, out, callbacks=[export, *callbacks])
    fit(trainer, module, loader, out, run_config=config.model_dump(mode="json"))
    return out / "model"


def resolve_panel(
    choice: str,
    data: Sequence[str | os.PathLike[str] | AnnData],
    *,
    layer: str | None = None,
    **gene_kwargs: Any,
) -> GenePanel:
    """The gene panel a new model is built for (see ``PretrainRunConfig.gene_panel``)."""
    full = GenePanel.scfoundation()
    if choice == "scfoundation":
        return full
    if choice != "data":
        path = Path(choice)
        if not path.exists():
            msg = f"gene_panel={choice!r} is neither 'scfoundation', 'data' nor an existing gene-list file."
            raise MsfmInputError(msg)
        return GenePanel.from_file(path)
    from msfm.data import harmonize_genes, read

    used = np.zeros(len(full), dtype=bool)
    for src in data:
        adata = src if isinstance(src, AnnData) else read(src, backed=Path(src).suffix == ".h5ad")
        try:
            mapping = harmonize_genes(adata.var, full, **gene_kwargs)
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

    def __iter__(self):
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


# ----------------------------------------------------------------------------------------------------------
# fine-tuning for cell-type annotation
# ----------------------------------------------------------------------------------------------------------
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


def _encode_all(
    adata: AnnData,
    loaded: Any,
    *,
    target_depth: str,
    layer: str | None,
    pre_normalized: bool,
    gene_kwargs: dict[str, Any],
) -> tuple[Any, ScFoundationTokenizer, Any]:
    source, mapping = prepare(adata, loaded.panel, layer=layer, pre_normalized=pre_normalized, **gene_kwargs)
    tokenizer = ScFoundationTokenizer(num_genes=loaded.config.num_genes)
    panel_counts = mapping.apply(source.rows(np.arange(source.n_obs)))
    encoded = tokenizer.encode(panel_counts, target_depth, pre_normalized=pre_normalized)
    return encoded, tokenizer, mapping


def fit_classifier(
    adata: AnnData,
    checkpoint: str | os.PathLike[str],
    *,
    labels_key: str,
    out: str | os.PathLike[str],
    mode: Literal["linear", "partial", "full"] = "linear",
    max_epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    target_depth: str = "t4",
    pool: Literal["max", "all"] = "max",
    layer: str | None = None,
    pre_normalized: bool = False,
    accelerator: str = "auto",
    devices: Any = "auto",
    strategy: str = "auto",
    precision: str = "32-true",
    seed: int = 0,
    progress: bool = True,
    **gene_kwargs: Any,
) -> Path:
    """Fine-tune a cell-type classifier on a pretrained backbone and save it to ``out``.

    ``mode="linear"`` trains only the head on a frozen backbone, ``"partial"`` also unfreezes the
    second-to-last encoder layer (the upstream recipe), ``"full"`` trains everything.
    """
    if labels_key not in adata.obs:
        msg = f"labels_key={labels_key!r} is not an obs column; available: {list(adata.obs.columns)[:20]}."
        raise MsfmInputError(msg)
    labels_raw = adata.obs[labels_key]
    if labels_raw.isna().any():
        msg = f"obs[{labels_key!r}] has {int(labels_raw.isna().sum())} missing labels; drop or fill those cells first."
        raise MsfmInputError(msg)
    classes = sorted(labels_raw.astype(str).unique().tolist())
    if len(classes) < 2:
        msg = f"obs[{labels_key!r}] has {len(classes)} distinct label(s); a classifier needs at least 2."
        raise MsfmInputError(msg)
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[c] for c in labels_raw.astype(str)], dtype=np.int64)

    loaded = load_model(checkpoint, device="cpu")
    encoded, tokenizer, mapping = _encode_all(
        adata,
        loaded,
        target_depth=target_depth,
        layer=layer,
        pre_normalized=pre_normalized,
        gene_kwargs=gene_kwargs,
    )
    dataset = _LabelledCells(encoded, labels, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=dataset.collate, generator=gen
    )
    cls_cfg = CellClassifierConfig(num_classes=len(classes), mode=mode, pool=pool)
    classifier = ScFoundationCellClassifier(loaded.model, cls_cfg)
    module = MsfmLightningModule(
        classifier,
        classification_loss,
        OptimConfig(lr=lr, weight_decay=0.01, warmup_steps=0, schedule="constant"),
    )
    out = Path(out)
    run_dir = out.with_name(f".{out.name}.run")
    options = TrainerOptions(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_epochs=max_epochs,
        seed=seed,
        progress_bar=progress,
    )
    trainer = build_trainer(options, run_dir)
    fit(trainer, module, loader, run_dir)
    classifier.eval()
    return save_checkpoint(
        out,
        family="scfoundation-classifier",
        config={
            "backbone": loaded.config.model_dump(),
            "classifier": cls_cfg.model_dump(),
            "classes": classes,
            "target_depth": target_depth,
            "labels_key": labels_key,
        },
        state_dict=classifier.state_dict(),
        gene_panel=list(loaded.panel.symbols),
        preprocessing=preprocessing_record(pre_normalized),
        extra_meta={
            "backbone_checkpoint": str(loaded.path),
            "gene_mapping": mapping.to_uns(),
            "n_train_cells": len(labels),
        },
    )


@torch.inference_mode()
def predict_cell_types(
    adata: AnnData,
    classifier: str | os.PathLike[str],
    *,
    key_added: str = "scfoundation_cell_type",
    batch_size: int = 64,
    device: str = "auto",
    layer: str | None = None,
    pre_normalized: bool = False,
    **gene_kwargs: Any,
) -> None:
    """Write ``obs[key_added]`` (labels), ``obs[key_added + '_confidence']`` and ``obsm[key_added + '_proba']``."""
    from msfm.models.scfoundation.inference import LoadedModel
    from msfm.runtime.devices import resolve_device

    ckpt = load_checkpoint(classifier, family="scfoundation-classifier")
    cfg = ckpt.config
    backbone_cfg = ScFoundationConfig(**cfg["backbone"])
    cls_cfg = CellClassifierConfig(**cfg["classifier"])
    model = ScFoundationCellClassifier(ScFoundation(backbone_cfg), cls_cfg)
    model.load_state_dict(ckpt.state_dict, strict=True)
    dev = resolve_device(device)
    model.to(dev).eval()
    panel = (
        GenePanel.from_symbols(ckpt.gene_panel, name="classifier")
        if ckpt.gene_panel
        else GenePanel.scfoundation()
    )
    loaded = LoadedModel(
        model=model.backbone,
        config=backbone_cfg,
        panel=panel,
        meta=ckpt.meta,
        path=Path(classifier),
        device=dev,
    )
    encoded, tokenizer, mapping = _encode_all(
        adata,
        loaded,
        target_depth=cfg["target_depth"],
        layer=layer,
        pre_normalized=pre_normalized,
        gene_kwargs=gene_kwargs,
    )
    classes = np.asarray(cfg["classes"])
    proba = np.zeros((adata.n_obs, len(classes)), dtype=np.float32)
    order = np.argsort(np.asarray(encoded.lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(dev) for k, v in tokenizer.collate(encoded, idx).items()}
        logits = model(batch).logits
        proba[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    import pandas as pd

    adata.obs[key_added] = pd.Categorical(classes[proba.argmax(1)], categories=classes)
    adata.obs[f"{key_added}_confidence"] = proba.max(1)
    adata.obsm[f"{key_added}_proba"] = proba
    adata.uns[key_added] = {
        "classes": classes.tolist(),
        "classifier": str(classifier),
        "gene_mapping": mapping.to_uns(),
    }
