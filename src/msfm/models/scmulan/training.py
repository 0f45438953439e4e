"""``train``: train or fine-tune scMulan on cells with metadata columns, through the shared Lightning engine.

``train(data, out)`` turns cells and their ``obs`` metadata into a stream of multitask c-sentence examples
(annotation, organ/region prediction, conditional generation and our next-state task; see
:mod:`msfm.models.scmulan.objective`), trains a new model or fine-tunes an msfm scMulan checkpoint
(``checkpoint=``), and writes the run directory of the engine contract::

    RUN_DIR/
      checkpoints/last.ckpt   # resume state (a killed run continues when the same call is repeated)
      model/                  # msfm scMulan checkpoint (msfm.scmulan.load(RUN_DIR / "model"))
      vocabulary.json         # the run's vocabulary (reused on resume)
      config.json, metrics.csv

Everything runs through :class:`msfm.engine.MsfmLightningModule`, :func:`msfm.engine.build_trainer` and
:func:`msfm.engine.fit`: any accelerator, DDP/FSDP (``strategy``), mixed precision, gradient accumulation.
Example ``k`` of the stream is a pure function of ``(seed, k)`` (:mod:`.train_stream`), so a resumed run sees
exactly the examples an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from msfm.data import CellSource, GenePanel
from msfm.engine.module import MsfmLightningModule
from msfm.engine.resume import check_resume
from msfm.engine.trainer import ExportCallback, TrainerOptions, build_trainer, fit, resume_step
from msfm.errors import MsfmInputError
from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.loading import Checkpoint, fresh_copy, preprocessing_record
from msfm.models.scmulan.model import ScMulan, ScMulanBlock
from msfm.models.scmulan.objective import TaskSampler, scmulan_loss
from msfm.models.scmulan.train_cells import (
    Cells,
    Dataset,
    check_columns,
    check_support,
    group_codes,
    map_genes,
    open_datasets,
    pair_buckets,
    raw_meta,
    task_support,
    time_values,
)
from msfm.models.scmulan.train_config import FINETUNE_OVERRIDES, ScMulanTrainConfig
from msfm.models.scmulan.train_stream import ScMulanExampleStream, ValExamples
from msfm.models.scmulan.train_vocab import VOCAB_FILE, meta_ids, run_vocabulary
from msfm.registry import preset_config
from msfm.runtime.config import build_settings
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import TrainResult
from msfm.tokenizers.cell_sentence import CellSentenceVocab

logger = logging.getLogger(__name__)

__all__ = ["grow_model", "train"]

PathLike = str | os.PathLike[str]
#: Settings besides msfm.engine.resume.RESUME_SAFE_SETTINGS that may change on resume: the example stream does not
#: depend on the number of DataLoader workers.
RESUME_SAFE = ("num_workers",)


def train(
    data: AnnData | PathLike | Sequence[AnnData | PathLike],
    out: PathLike,
    *,
    config: ScMulanTrainConfig | Mapping[str, Any] | PathLike | None = None,
    checkpoint: Checkpoint | None = None,
    callbacks: Sequence[Any] = (),
    **overrides: Any,
) -> TrainResult:
    """Train scMulan on cells with metadata, or fine-tune a checkpoint (``checkpoint=``).

    Args:
        data: an AnnData, an ``.h5ad`` path (opened backed), or a list of them; raw counts (``layers['counts']``
            or ``X``) unless ``pre_normalized``. Never modified.
        out: the run directory. If it already holds a run, training resumes from its last checkpoint (repeat
            the same call; other settings only with ``allow_config_change=True``, recorded in ``config.json``).
        config: the settings (:class:`ScMulanTrainConfig`): an object, a mapping or a YAML/JSON file; defaults to
            the tiny preset, annotation + generation on ``obs['cell_type']``.
        checkpoint: fine-tune this msfm scMulan checkpoint (a directory such as a converted official one, a
            ``TrainResult`` or a ``Loaded``; it is never modified). Its vocabulary is used (``vocabulary`` is
            ignored) and grown with new metadata values.
        callbacks: extra Lightning callbacks.
        overrides: flat settings on top of ``config``: ``max_steps=``, ``lr=``, ``devices=``, ``batch_size=``,
            ``meta_columns="cell_type=celltype"``, ``tasks="annotate=1,generate=0.5"``, ``expression_weight=`` ...
            (a flat key lands in its section; ``optim.lr`` names one explicitly).

    Returns:
        ``TrainResult(run_dir, checkpoint=RUN_DIR/model, metrics)``; pass it to any verb as the checkpoint.

    Raises:
        MsfmInputError: missing metadata columns (the message lists the obs columns), no usable cells, a task
            with no cell to learn from, unknown or invalid settings.
        ConfigChangedError: ``out`` holds a run started with other settings (named as ``old -> new``).
    """
    settings = _settings(config, overrides)
    # Before the data is read or the vocabulary rewritten: a resumed run keeps the settings it was started with.
    check_resume(
        out,
        trainer=settings.trainer,
        optim=settings.optim,
        run_config=settings.model_dump(mode="json"),
        resume_safe=RESUME_SAFE,
    )
    init = None
    init_path = None
    if checkpoint is not None:
        init = fresh_copy(checkpoint)
        init_path = str(init.path) if init.path is not None else "<in-memory model>"
    datasets = open_datasets(data)
    run_dir = Path(out)
    try:
        model_dir = _train(datasets, run_dir, settings, init, init_path, callbacks)
    finally:
        for ds in datasets:
            if ds.opened and ds.adata.isbacked:
                ds.adata.file.close()
    return TrainResult(run_dir=run_dir, checkpoint=model_dir, metrics=final_metrics(run_dir))


def _settings(config: Any, overrides: Mapping[str, Any]) -> ScMulanTrainConfig:
    if config is None or isinstance(config, ScMulanTrainConfig | Mapping):
        return build_settings(ScMulanTrainConfig, base=config, overrides=overrides)
    if isinstance(config, str | os.PathLike):
        return build_settings(ScMulanTrainConfig, file=config, overrides=overrides)
    msg = (
        f"config must be a ScMulanTrainConfig, a mapping of its fields or a YAML/JSON file; got "
        f"{type(config).__name__}."
    )
    raise MsfmInputError(msg)


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged value of every column of ``RUN_DIR/metrics.csv`` (empty when there is none)."""
    import pandas as pd

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    out: dict[str, Any] = {}
    for column in table.columns:
        values = table[column].dropna()
        if len(values):
            value = values.iloc[-1]
            out[str(column)] = value.item() if hasattr(value, "item") else value
    return out


def grow_model(
    model: ScMulan, old_vocab: CellSentenceVocab, new_vocab: CellSentenceVocab, *, seed: int = 0
) -> ScMulan:
    """A copy of ``model`` sized for ``new_vocab``, an extension of ``old_vocab`` (tokens appended at the end).

    Rows of ``token_embed``, ``entity_head`` and ``expression_head`` for existing tokens are copied unchanged. A
    new token's rows are the mean of the existing rows of its category (so a new cell type starts as an
    "average cell type"), or ``N(0, 0.02)`` (seeded) when the category had no token before.

    Raises:
        MsfmInputError: ``new_vocab`` does not start with ``old_vocab``'s tokens, or the model does not match
            ``old_vocab``.
    """
    v_old, v_new = len(old_vocab), len(new_vocab)
    if model.config.vocab_size != v_old:
        msg = f"The model has {model.config.vocab_size} tokens but its vocabulary {v_old}."
        raise MsfmInputError(msg)
    if new_vocab.tokens[:v_old] != old_vocab.tokens:
        msg = (
            "The new vocabulary does not extend the checkpoint's: its first tokens differ. Only appending new "
            "tokens keeps the pretrained ids valid."
        )
        raise MsfmInputError(msg)
    if v_new == v_old:
        return model
    new = ScMulan(model.config.model_copy(update={"vocab_size": v_new}))
    state = model.state_dict()
    grown = {"token_embed.weight", "entity_head.weight", "expression_head.weight"}
    gen = torch.Generator().manual_seed(seed)
    new_state = {}
    for key in new.state_dict():
        if key not in grown:
            new_state[key] = state[key]
            continue
        old = state[key]
        rows = torch.empty(v_new - v_old, old.shape[1], dtype=old.dtype)
        for i in range(v_old, v_new):
            token = new_vocab.tokens[i]
            cat = next((c for c, vals in new_vocab.categories.items() if token in vals), None)
            peers = [] if cat is None else [old_vocab.id(t) for t in old_vocab.categories.get(cat, [])]
            if peers:
                rows[i - v_old] = old[peers].mean(dim=0)
            else:
                rows[i - v_old] = torch.randn(old.shape[1], generator=gen).to(old.dtype) * 0.02
        new_state[key] = torch.cat([old, rows], dim=0)
    new.load_state_dict(new_state, strict=True)
    new.train(model.training)
    return new


def _build_model(
    config: ScMulanTrainConfig, vocab: CellSentenceVocab, init: Loaded | None
) -> tuple[ScMulan, ScMulanConfig]:
    if init is not None:
        shape_changes = sorted(set(config.model_overrides) - FINETUNE_OVERRIDES)
        if shape_changes:
            msg = (
                f"model_overrides {shape_changes} would change the shape of the checkpoint being fine-tuned; "
                f"fine-tuning only allows {sorted(FINETUNE_OVERRIDES)}."
            )
            raise MsfmInputError(msg)
        model = grow_model(init.model, init.vocab, vocab, seed=config.seed)
        if config.model_overrides:
            cfg = model.config.model_copy(update=config.model_overrides)
            grown = ScMulan(cfg)
            grown.load_state_dict(model.state_dict(), strict=True)
            model = grown
        return model.train(), model.config
    overrides = dict(config.model_overrides)
    if overrides.get("vocab_size", len(vocab)) != len(vocab):
        logger.warning(
            "model_overrides vocab_size=%s replaced by the vocabulary size %d",
            overrides["vocab_size"],
            len(vocab),
        )
    overrides["vocab_size"] = len(vocab)
    cfg = preset_config(config.preset, family="scmulan", **overrides)
    torch.manual_seed(config.seed)
    return ScMulan(cfg), cfg


def _world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def _train(
    datasets: list[Dataset],
    out: Path,
    config: ScMulanTrainConfig,
    init: Loaded | None,
    init_path: str | None,
    callbacks: Sequence[Any],
) -> Path:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    check_columns(datasets, config)
    sources = [
        CellSource(ds.adata, layer=config.layer, pre_normalized=config.pre_normalized) for ds in datasets
    ]
    meta = raw_meta(datasets, config)
    vocab, added, vocab_info = run_vocabulary(
        datasets, sources, meta, config, None if init is None else init.vocab, init_path, out
    )
    for cat, toks in added.items():
        logger.info("vocabulary: added %d %s token(s): %s", len(toks), cat, toks[:20])
    logger.info("vocabulary: %r", vocab)

    panel = GenePanel.from_symbols(list(vocab.genes), name="scmulan-vocabulary")
    mappings = map_genes(
        datasets,
        panel,
        config,
        what="is a gene of the vocabulary",
        fix="Check gene_column= / species=, or use vocabulary='data'.",
    )
    cells = Cells(sources, mappings, meta_ids(meta, vocab), vocab)

    model, model_cfg = _build_model(config, vocab, init)
    sampler = TaskSampler(
        vocab,
        tasks=config.tasks,
        n_levels=model_cfg.n_levels,
        gene_order=config.gene_order,
        max_genes=config.max_genes,
        meta_prompt_prob=config.meta_prompt_prob,
        max_length=model_cfg.max_length,
    )

    # Next-state partners over every usable cell (validation pairs) and over training cells only.
    time = group = None
    if "next_state" in sampler.task_names:
        time = np.concatenate(
            [
                time_values(ds.adata.obs[config.time_key], f"{config.time_key!r} of {ds.name}")
                for ds in datasets
            ]
        )
        group = (
            np.zeros(cells.n, dtype=np.int64)
            if config.pair_key is None
            else group_codes(
                np.concatenate([ds.adata.obs[config.pair_key].astype(object).to_numpy() for ds in datasets])
            )
        )
    no_pairs = (np.full(cells.n, -1, dtype=np.int64), [])
    has_genes = cells.n_expr > 0
    bucket_all, buckets_all = no_pairs if time is None else pair_buckets(time, group, has_genes)
    support = task_support(cells, sampler.task_names, bucket_all)
    check_support(support, sampler, cells, config, time)
    eligible = np.flatnonzero(support.any(axis=1))

    rng = np.random.default_rng([config.seed, 5])
    n_val = round(config.val_fraction * eligible.size)
    shuffled = rng.permutation(eligible)
    val_cells, train_cells = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
    in_train = np.zeros(cells.n, dtype=bool)
    in_train[train_cells] = True
    bucket_train, buckets_train = (
        no_pairs if time is None else pair_buckets(time, group, has_genes & in_train)
    )
    support_train = task_support(cells, sampler.task_names, bucket_train)
    train_cells = train_cells[support_train[train_cells].any(axis=1)]
    if train_cells.size == 0:
        msg = f"No training cell is left after holding out {n_val} validation cells; lower val_fraction."
        raise MsfmInputError(msg)
    logger.info(
        "scMulan training: %d training and %d validation cells (%s)",
        train_cells.size,
        val_cells.size,
        sampler.tasks,
    )

    opts = config.trainer
    accumulate = opts.accumulate
    skip = resume_step(out) * accumulate
    if skip:
        logger.info("resuming: skipping the %d micro-batches per rank already trained on", skip)
    stream = ScMulanExampleStream(
        cells,
        sampler,
        train_cells,
        support_train,
        bucket_train,
        buckets_train,
        batch_size=config.batch_size,
        seed=config.seed,
        skip_batches=skip,
    )
    # Own generators: creating the iterators draws nothing from the global RNG, which the engine restores on
    # resume, so a resumed run continues with the same random stream (dropout).
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_loader = None
    trainer_kwargs: dict[str, Any] = {}
    if val_cells.size:
        val_stream = ScMulanExampleStream(
            cells,
            sampler,
            val_cells,
            support,
            bucket_all,
            buckets_all,
            batch_size=config.batch_size,
            seed=config.seed,
            stream=1,
        )
        val_ds = ValExamples(val_stream)
        val_loader = torch.utils.data.DataLoader(
            val_ds,
            batch_size=config.batch_size,
            shuffle=False,
            collate_fn=val_ds.collate,
            generator=torch.Generator().manual_seed(config.seed + 1),
        )
        # The training stream never ends an epoch, so validation runs every N optimiser steps.
        interval = (
            opts.val_check_interval
            if isinstance(opts.val_check_interval, int)
            else opts.checkpoint_every_n_steps
        )
        trainer_kwargs = {"val_check_interval": int(interval) * accumulate, "check_val_every_n_epoch": None}
    else:
        trainer_kwargs = {"limit_val_batches": 0}

    objective = functools.partial(scmulan_loss, config=config.loss)
    module = MsfmLightningModule(model, objective, config.optim)
    export = ExportCallback(
        family="scmulan",
        config=model_cfg,
        gene_panel=list(vocab.genes),
        gene_panel_name="scmulan",
        preprocessing=preprocessing_record(n_levels=model_cfg.n_levels, gene_order=config.gene_order),
        extra_meta={
            "source": "msfm-scmulan-train",
            "vocabulary": vocab.to_dict(),
            "vocabulary_sha256": vocab.sha256(),
            "vocabulary_origin": vocab_info,
            "vocabulary_added": added,
            "finetuned_from": init_path,
            "tasks": sampler.tasks,
            "n_train_cells": int(train_cells.size),
            "n_val_cells": int(val_cells.size),
            "run_config": config.model_dump(mode="json"),
            "gene_mapping": [m.report for m in mappings],
        },
    )
    wrap = [ScMulanBlock] if opts.strategy.startswith("fsdp") else None

    def make_trainer(options: TrainerOptions) -> Any:
        return build_trainer(
            options, out, callbacks=[export, *callbacks], fsdp_wrap_layers=wrap, trainer_kwargs=trainer_kwargs
        )

    trainer = make_trainer(opts)
    if opts.max_steps == -1:
        # An endless stream has no epochs: turn max_epochs into steps over the training cells.
        per_step = config.batch_size * _world_size(trainer) * accumulate
        steps = int(opts.max_epochs or 1) * max(1, math.ceil(train_cells.size / per_step))
        logger.info("max_epochs=%s -> max_steps=%d", opts.max_epochs, steps)
        opts = opts.model_copy(update={"max_steps": steps, "max_epochs": None})
        trainer = make_trainer(opts)

    if trainer.is_global_zero and rank_zero_only.rank == 0:
        vocab.save(out / VOCAB_FILE)
    run_config = config.model_copy(update={"trainer": opts}).model_dump(mode="json")
    fit(
        trainer,
        module,
        loader,
        out,
        val_dataloaders=val_loader,
        run_config=run_config,
        resume_safe=RESUME_SAFE,
    )
    return out / "model"
