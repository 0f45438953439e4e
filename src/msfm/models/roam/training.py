"""``msfm.roam.train``: ROAM slide classifiers with K-fold cross-validation, through the shared Lightning engine.

``train(features, out, slides=table, task=...)`` reads a slide table (``slide_id``, an optional patient column, one
column per task), finds each slide's feature file, splits the labelled slides into stratified (and, with a
patient column, patient-grouped) folds with an optional held-out test set, and trains one model per fold the way
the released ROAM does (see ``RoamTrainConfig`` for every setting):

* loss ``CE(slide logits) + roi_weight * top-k instance CE``, averaged over the slides of a batch of 4 (the
  reference's "sum of 4 per-slide losses / 4"; slides are padded into one batch, the model skips the padding);
* ROI dropout (keep a random 80% of the ROIs of a slide with >= 16 of them) and a class-balanced sampler
  (weight ``N / N_class`` per slide of the training fold, drawn with replacement);
* AdamW (lr 2e-4, weight decay 1e-5), linear warm-up over 5 epochs, then constant;
* up to 200 epochs; the model with the lowest validation loss from epoch 5 on is kept; training stops when more
  than 20 epochs pass without improvement once epoch 20 is reached (epochs count from 0).

Run directory::

    RUN/
      run.json                 # config, classes, label mapping, encoder, table digest (resume guard)
      splits/fold{k}.csv       # slide_id, split (train|val|test), label; reused when present
      fold{k}/checkpoints/last.ckpt, fold{k}/metrics.csv, fold{k}/config.json   # engine contract
      fold{k}/best/            # msfm ROAM checkpoint of the fold's best epoch (class names, task, encoder)
      fold{k}/predictions.csv  # the best model's val (and test) probabilities
      fold{k}/done.json        # written last: the fold is finished and is skipped on resume
      oof_predictions.csv      # out-of-fold (validation) predictions of every fold
      test_predictions.csv     # test slides: mean softmax over the folds (ensemble)
      metrics.json, fold_metrics.csv, confusion_oof.png, confusion_test.png

``train`` returns a :class:`~msfm.runtime.results.TrainResult`: pass it (or the run folder) as the checkpoint of
``predict``, ``heatmap`` or ``cascade`` to use the fold ensemble.

Repeating the same call after a crash or a kill resumes: finished folds are skipped and the running fold
continues from its ``last.ckpt`` (written at every epoch end) with the same data order, ROI subsets and dropout
draws as an uninterrupted run. A different config for an existing run directory is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from pydantic import ValidationError

from msfm.errors import MsfmInputError
from msfm.models.roam.checkpoint import read_model, save_model
from msfm.models.roam.config import RoamConfig
from msfm.models.roam.cv_report import FOLD_PREDICTIONS, aggregate_run, fold_frame
from msfm.models.roam.dataset import SlideBagDataset, collate_slides
from msfm.models.roam.ensemble import BEST_DIR, DONE_FILE
from msfm.models.roam.feature_store import FeatureStore
from msfm.models.roam.model import Roam
from msfm.models.roam.monitor import FoldMonitor
from msfm.models.roam.objective import roam_objective
from msfm.models.roam.prediction import predict_probabilities
from msfm.models.roam.sampler import BalancedEpochSampler, mix_seed
from msfm.models.roam.slide_table import SlideTable, read_slide_table
from msfm.models.roam.splits import make_splits, read_splits, split_files, write_splits
from msfm.models.roam.tables import SLIDE_ID
from msfm.models.roam.train_config import RoamTrainConfig
from msfm.runtime.atomic import atomic_write_json, atomic_write_text, probe_writable
from msfm.runtime.checkpoint import is_checkpoint_dir
from msfm.runtime.config import build_settings, read_config_file
from msfm.runtime.jsonable import to_jsonable
from msfm.runtime.loaded import Loaded
from msfm.runtime.results import TrainResult

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = ["RUN_FILE", "SPLITS_DIR", "train", "trainer_options", "training_settings"]

RUN_FILE = "run.json"
SPLITS_DIR = "splits"


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _scan_features(table: SlideTable) -> tuple[str | None, int]:
    """Check every feature file's header (encoder, dimension, ROI count) before any training starts."""
    from msfm.models.roam.features import read_feature_attrs, read_recorded_geometry

    encoders: dict[str, list[str]] = {}
    dims: dict[int, list[str]] = {}
    geometries: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    empty: list[str] = []
    for sid in table.slide_ids:
        attrs = read_feature_attrs(table.paths[sid])
        geo = read_recorded_geometry(table.paths[sid])
        if geo:  # files that record no geometry cannot disagree (they warn where a model checks them)
            key = tuple(sorted((k, round(float(v), 4)) for k, v in geo.items()))
            geometries.setdefault(key, []).append(sid)
        if not attrs.get("n_roi"):
            empty.append(sid)
            continue
        dims.setdefault(int(attrs["feature_dim"]), []).append(sid)
        enc = attrs.get("encoder")
        if enc and enc != "unknown":
            encoders.setdefault(str(enc), []).append(sid)
    if empty:
        msg = (
            f"{len(empty)} feature file(s) hold no ROI features of shape [n >= 1, 84, d]: {empty[:10]}. Leave these "
            "slides out of the table (no tissue was found) or re-run `msfm roam preprocess` for them."
        )
        raise MsfmInputError(msg)
    if len(encoders) > 1 or len(dims) > 1:
        enc_txt = {k: v[:3] for k, v in encoders.items()}
        dim_txt = {k: v[:3] for k, v in dims.items()}
        msg = (
            f"The feature files come from different encoders/dimensions (encoders {enc_txt}, dims {dim_txt}). All "
            "slides of a task must be embedded by the same encoder; re-extract the odd ones."
        )
        raise MsfmInputError(msg)
    if len(geometries) > 1:
        found = "; ".join(
            f"{', '.join(f'{k}={v:g}' for k, v in key)} ({len(sids)} slides, e.g. {sids[:3]})"
            for key, sids in geometries.items()
        )
        msg = (
            f"The feature files were made with different ROI geometries: {found}. A model trained on a mix learns "
            "features that mean different things; re-run `msfm roam preprocess` for the odd slides with the same "
            "--roi-size/--patch-size/--target-mpp as the rest, or train on one geometry."
        )
        raise MsfmInputError(msg)
    return (next(iter(encoders)) if encoders else None), (next(iter(dims)) if dims else 0)


def _prepare_run_dir(out: Path, record: dict[str, Any], *, overwrite: bool) -> bool:
    """Create or check the run directory; returns True when resuming an existing run."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            msg = f"{run_file} is unreadable ({err}); remove the run directory or pass another --out."
            raise MsfmInputError(msg) from err
        keys = ("config", "task", "classes", "table_digest", "encoder", "feature_dim")
        diff = [k for k in keys if old.get(k) != record.get(k)]
        if not diff:
            logger.info("resuming the run in %s", out)
            return True
        details = []
        for k in diff:
            if k == "config":
                a, b = old.get("config") or {}, record["config"]
                changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
                details.append(f"config fields {changed}")
            else:
                details.append(f"{k} ({old.get(k)!r} -> {record.get(k)!r})")
        if not overwrite:
            msg = (
                f"{out} holds a ROAM run with different settings: {'; '.join(details)}. Repeat the original command "
                "to resume it, choose another --out, or pass --overwrite to discard that run."
            )
            raise MsfmInputError(msg)
        logger.warning("discarding the run in %s (--overwrite): %s", out, "; ".join(details))
        shutil.rmtree(out)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        msg = (
            f"--out {out} exists and is not a ROAM run directory (no {RUN_FILE}). Choose a new or empty folder; "
            "msfm does not delete folders it did not create."
        )
        raise MsfmInputError(msg)
    probe_writable(out)  # a read-only or full folder: OutputError before any training
    out.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        atomic_write_json(run_file, record)
    return False


def _load_or_make_splits(
    out: Path, table: SlideTable, config: RoamTrainConfig, splits: PathLike | None
) -> list[pd.DataFrame]:
    own = out / SPLITS_DIR
    if split_files(own) if own.is_dir() else []:
        folds = read_splits(own, table, skip_missing=config.skip_missing)
        if splits is not None:
            given = read_splits(Path(splits), table, skip_missing=config.skip_missing)
            same = len(given) == len(folds) and all(
                a.sort_values(SLIDE_ID)
                .reset_index(drop=True)
                .equals(b.sort_values(SLIDE_ID).reset_index(drop=True))
                for a, b in zip(given, folds)
            )
            if not same:
                msg = f"--splits {splits} differ from the splits this run already uses ({own}); use a new --out."
                raise MsfmInputError(msg)
        logger.info("using the %d existing split files in %s", len(folds), own)
        return folds
    if splits is not None:
        folds = read_splits(Path(splits), table, skip_missing=config.skip_missing)
        logger.info("using %d user-provided folds from %s", len(folds), splits)
    else:
        folds = make_splits(
            table.slide_ids,
            table.labels,
            table.groups,
            folds=config.folds,
            test_frac=config.test_frac,
            seed=config.seed,
        )
    if _is_rank_zero():
        write_splits(folds, own, table=table)
    return folds


def _build_model(config: RoamTrainConfig, table: SlideTable, d_in: int, seed: int) -> Any:
    from msfm.registry import preset_config

    fixed = {"d_in": d_in, "n_classes": len(table.class_names), "class_names": tuple(table.class_names)}
    clash = {k: v for k, v in config.model_overrides.items() if k in fixed and v != fixed[k]}
    if clash:
        msg = f"model_overrides {clash} contradict the data (features are {d_in}-d, {fixed['n_classes']} classes)."
        raise MsfmInputError(msg)
    torch.manual_seed(seed)
    if config.init_from is None:
        return Roam(preset_config(config.model, family="roam", **{**config.model_overrides, **fixed}))
    base, _ = read_model(config.init_from)
    if base.config.d_in != d_in:
        msg = (
            f"init_from {config.init_from} expects {base.config.d_in}-d features but the feature files are {d_in}-d "
            "(another encoder). Use features from the checkpoint's encoder."
        )
        raise MsfmInputError(msg)
    allowed = {"dropout", "mil_dropout", "emb_dropout", "topk"}
    current = base.config.model_dump(mode="json")
    # Sizes equal to the checkpoint's (e.g. a shared config file) change nothing and are fine.
    bad = sorted(
        k
        for k, v in config.model_overrides.items()
        if k not in allowed and k not in fixed and _plain_value(v) != current.get(k)
    )
    if bad:
        msg = f"With init_from, model_overrides may only change {sorted(allowed)}; got {bad}."
        raise MsfmInputError(msg)
    try:
        cfg = RoamConfig(**{**base.config.model_dump(), **config.model_overrides, **fixed})
    except ValidationError as err:
        msg = f"Invalid model settings with init_from: {err}"
        raise MsfmInputError(msg) from err
    model = Roam(cfg)
    own = model.state_dict()
    loaded = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    fresh = sorted(set(own) - set(loaded))
    model.load_state_dict(loaded, strict=False)
    if fresh:
        logger.info("init_from: %d tensors re-initialised (new class count): %s", len(fresh), fresh[:8])
    return model


def _plain_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def trainer_options(config: RoamTrainConfig, *, seed: int = 0) -> Any:
    """The engine's :class:`~msfm.engine.trainer.TrainerOptions` for a fold of this run.

    Raises:
        MsfmInputError: If the hardware settings (accelerator, devices, strategy, precision) are invalid.
    """
    from msfm.engine.trainer import TrainerOptions

    try:
        return TrainerOptions(
            accelerator=config.accelerator,
            devices=config.devices,
            strategy=config.strategy,
            num_nodes=config.num_nodes,
            precision=config.precision,
            max_epochs=config.max_epochs,
            seed=seed,
            gradient_clip=config.gradient_clip,
            # Resume points are written by FoldMonitor at epoch ends; the engine's step-based saves are not needed.
            checkpoint_every_n_steps=10**12,
            progress_bar=config.progress_bar,
            model_summary=False,
        )
    except ValidationError as err:
        msg = f"Invalid hardware settings for ROAM training: {err}"
        raise MsfmInputError(msg) from err


def _train_fold(
    k: int,
    split: pd.DataFrame,
    *,
    out: Path,
    table: SlideTable,
    store: FeatureStore,
    config: RoamTrainConfig,
    encoder: dict[str, Any],
    callbacks: Sequence[Callback],
) -> dict[str, Any] | None:
    from msfm.engine.module import MsfmLightningModule, OptimConfig
    from msfm.engine.trainer import build_trainer, fit
    from msfm.eval.classification import classification_report

    fold_dir = out / f"fold{k}"
    best_dir = fold_dir / BEST_DIR
    lab = table.label_of()
    parts = {p: [s for s in split.loc[split["split"] == p, SLIDE_ID]] for p in ("train", "val", "test")}
    y_train = np.array([lab[s] for s in parts["train"]], dtype=np.int64)
    y_val = np.array([lab[s] for s in parts["val"]], dtype=np.int64)
    absent = [table.class_names[c] for c in range(len(table.class_names)) if not (y_train == c).any()]
    if absent:
        logger.warning("fold %d: no training slide of class(es) %s", k, absent)
    fold_seed = mix_seed(config.seed, k)
    d_in = int(encoder["feature_dim"])
    model = _build_model(config, table, d_in, fold_seed)

    opts = trainer_options(config, seed=fold_seed % 2**31)
    extra = {
        "task": table.task,
        "class_names": list(table.class_names),
        "label_map": dict(table.label_map),
        "encoder": encoder,
        "feature_dim": d_in,
        "fold": k,
        "n_train": len(parts["train"]),
        "n_val": len(parts["val"]),
        "train_config": config.model_dump(mode="json"),
        "source": "msfm-roam-train",
    }
    preprocessing = store.preprocessing() or None

    def export(net: torch.nn.Module, epoch: int, loss: float) -> None:
        save_model(
            net, best_dir, extra={**extra, "epoch": epoch, "val_loss": loss}, preprocessing=preprocessing
        )

    monitor = FoldMonitor(
        export=export,
        ckpt_path=fold_dir / "checkpoints" / "last.ckpt",
        best_from_epoch=config.best_from_epoch,
        early_stopping=config.early_stopping,
        patience=config.patience,
        stop_epoch=config.stop_epoch,
        max_epochs=config.max_epochs,
        every_n_epochs=config.checkpoint_every_n_epochs,
    )
    trainer = build_trainer(
        opts,
        fold_dir,
        callbacks=[monitor, *callbacks],
        trainer_kwargs={
            "use_distributed_sampler": False,
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": 1,
        },
    )
    world = int(getattr(trainer, "world_size", 1) or 1)
    sampler = BalancedEpochSampler(
        y_train, seed=mix_seed(config.seed, k, 1), balanced=config.balanced_sampling, num_replicas=world
    )
    train_ds = SlideBagDataset(
        store,
        parts["train"],
        y_train,
        train=True,
        keep_fraction=config.roi_keep_fraction,
        min_rois=config.roi_dropout_min,
        max_rois=config.max_train_rois,
        seed=mix_seed(config.seed, k, 2),
    )
    val_ds = SlideBagDataset(store, parts["val"], y_val)
    pin = torch.cuda.is_available() and config.accelerator not in ("cpu",)
    loader_kw = {
        "batch_size": config.batch_size,
        "collate_fn": collate_slides,
        "num_workers": config.num_workers,
        "persistent_workers": config.num_workers > 0,
        "pin_memory": pin,
    }
    # Own generators: creating the iterators draws nothing from the global RNG that the engine restores on resume.
    train_loader = torch.utils.data.DataLoader(
        train_ds, sampler=sampler, generator=torch.Generator().manual_seed(fold_seed % 2**63), **loader_kw
    )
    val_loader = torch.utils.data.DataLoader(
        val_ds, shuffle=False, generator=torch.Generator().manual_seed(fold_seed % 2**63), **loader_kw
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    trainer.log_every_n_steps = max(1, min(50, steps_per_epoch))
    optim = OptimConfig(
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_epochs * steps_per_epoch,
        schedule="constant",
    )
    module = MsfmLightningModule(
        model, lambda m, b: roam_objective(m, b, roi_weight=config.roi_weight), optim
    )
    logger.info(
        "fold %d: %d train / %d val / %d test slides, %d steps per epoch",
        k,
        len(parts["train"]),
        len(parts["val"]),
        len(parts["test"]),
        steps_per_epoch,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches.*")
        fit(
            trainer,
            module,
            train_loader,
            fold_dir,
            val_dataloaders=val_loader,
            run_config={"fold": k, "roam": config.model_dump(mode="json"), "n_train": len(parts["train"])},
            resume_guard=False,  # run.json was compared by _prepare_run_dir (runtime fields may change)
        )
    device = trainer.strategy.root_device
    if not trainer.is_global_zero or not _is_rank_zero():
        return None
    if monitor.best_epoch < 0 or not best_dir.is_dir():
        # No finite validation loss at any eligible epoch (diverged): keep the final weights, say so.
        logger.warning("fold %d: no epoch improved the validation loss; exporting the final model", k)
        export(module.model, int(monitor.epochs_done) - 1, float("nan"))
    best, meta = read_model(best_dir)
    best.to(device)
    ids = parts["val"] + parts["test"]
    probs = predict_probabilities([best], store, ids, device=device, roi_chunk=config.roi_chunk)[0]
    n_val = len(parts["val"])
    frames = [fold_frame(parts["val"], "val", probs[:n_val], table, k)]
    if parts["test"]:
        frames.append(fold_frame(parts["test"], "test", probs[n_val:], table, k))
    preds = pd.concat(frames, ignore_index=True)
    atomic_write_text(fold_dir / FOLD_PREDICTIONS, preds.to_csv(index=False))
    val_report = classification_report(y_val, probs[:n_val], table.class_names)
    test_report = None
    if parts["test"]:
        y_test = np.array([lab[s] for s in parts["test"]], dtype=np.int64)
        test_report = classification_report(y_test, probs[n_val:], table.class_names)
    done = {
        "fold": k,
        "best_epoch": int(meta.get("extra", {}).get("epoch", monitor.best_epoch)),
        "best_val_loss": float(monitor.best_loss),
        "epochs_trained": int(monitor.epochs_done),
        "stopped_early": bool(monitor.stopped),
        "n_train": len(parts["train"]),
        "n_val": n_val,
        "n_test": len(parts["test"]),
        "classes_missing_in_train": absent,
        "val": val_report,
        "test": test_report,
    }
    atomic_write_json(fold_dir / DONE_FILE, to_jsonable(done))
    best.to("cpu")
    return done


def training_settings(
    config: RoamTrainConfig | Mapping[str, Any] | PathLike | None,
    *,
    checkpoint: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> RoamTrainConfig:
    """The run's settings: ``config`` (object, mapping or YAML/JSON file) plus flat overrides and the init checkpoint.

    Raises:
        MsfmInputError: No ``task`` anywhere, an unknown or invalid setting, or an init checkpoint that is not one
            checkpoint directory.
    """
    base: Any = config
    if isinstance(config, str | os.PathLike):
        base = read_config_file(config, what="RoamTrainConfig")
    given = dict(overrides or {})
    # ``preset`` (the name every family's train takes) is RoamTrainConfig's ``model`` field.
    if isinstance(base, Mapping) and "preset" in base:
        base = {("model" if k == "preset" else k): v for k, v in base.items()}
    if "preset" in given:
        given["model"] = given.pop("preset")
    if checkpoint is not None:
        given["init_from"] = _init_path(checkpoint)
    has_task = (
        given.get("task")
        or isinstance(base, RoamTrainConfig)
        or (isinstance(base, Mapping) and base.get("task"))
    )
    if not has_task:
        msg = (
            "ROAM training needs the label column to learn: pass task='subtype' (CLI --task), or set 'task' in the "
            "config file."
        )
        raise MsfmInputError(msg)
    return build_settings(RoamTrainConfig, base=base, overrides=given)


def _init_path(checkpoint: Any) -> str:
    """The checkpoint directory of ``checkpoint=`` (a path or a ``Loaded`` of one checkpoint)."""
    path = checkpoint.path if isinstance(checkpoint, Loaded) else checkpoint
    if isinstance(path, str | os.PathLike) and is_checkpoint_dir(Path(path)):
        return str(path)
    msg = (
        f"checkpoint={checkpoint!r}: fine-tuning starts from one msfm ROAM checkpoint directory (e.g. a converted "
        "official fold, or RUN/fold0/best of a run), not from a run or an in-memory model."
    )
    raise MsfmInputError(msg)


def train(
    data: PathLike,
    out: PathLike,
    *,
    slides: PathLike | pd.DataFrame,
    config: RoamTrainConfig | Mapping[str, Any] | PathLike | None = None,
    checkpoint: Any = None,
    splits: PathLike | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    **overrides: Any,
) -> TrainResult:
    """Cross-validated ROAM training of one task (see the module docstring for the recipe and the files).

    Args:
        data: Feature folder (``msfm roam preprocess`` output, or its ``features/`` folder).
        out: Run directory; an existing run with the same settings is resumed.
        slides: Slide table (CSV/TSV path or DataFrame) with ``slide_id``, the task column and optionally a
            patient column.
        config: Training settings: a :class:`RoamTrainConfig`, a mapping or a YAML/JSON file.
        checkpoint: Start from this msfm ROAM checkpoint directory (fine-tuning; sets ``init_from``).
        splits: Folder of user split files (``fold{k}.csv`` with ``slide_id, split``, or CLAM ``splits_{k}.csv``);
            None makes stratified (patient-grouped) folds.
        overwrite: Discard an existing run with different settings instead of refusing.
        callbacks: Extra Lightning callbacks for every fold.
        **overrides: :class:`RoamTrainConfig` fields, e.g. ``task="subtype"``, ``folds=5``, ``preset="roam-tiny"``
            (the ``model`` field), ``max_epochs=50``, ``lr=1e-4``, ``devices="0,1"``; they take precedence over
            ``config``.

    Returns:
        ``TrainResult(run_dir, checkpoint, metrics)``: ``checkpoint`` is the run (its fold ensemble), ``metrics``
        the contents of ``metrics.json`` (per fold, out-of-fold, test ensemble).

    Raises:
        MsfmInputError: Bad settings, table or splits, missing feature files, features of mixed encoders, or an
            existing run with different settings.
    """
    out, data = Path(out), Path(data)
    config = training_settings(config, checkpoint=checkpoint, overrides=overrides)
    trainer_options(config)  # bad accelerator/precision/strategy fail here, before any file is written
    table = read_slide_table(
        slides,
        config.task,
        features_dir=data,
        classes=config.classes,
        label_map=config.label_map,
        slide_column=config.slide_column,
        group_column=config.group_column,
        skip_missing=config.skip_missing,
    )
    enc_name, dim = _scan_features(table)
    store = FeatureStore(table.paths, encoder=enc_name, cache_bytes=int(config.cache_gb * 2**30))
    store.get(table.slide_ids[0])  # reads the attributes and checks the first file through the contract
    encoder = store.encoder_description()
    if dim and dim != encoder["feature_dim"]:
        msg = f"Feature dimension mismatch: headers say {dim}, the reader returned {encoder['feature_dim']}."
        raise MsfmInputError(msg)
    record = {
        "kind": "msfm-roam-train",
        "config": config.fingerprint(),
        "task": table.task,
        "classes": list(table.class_names),
        "label_map": dict(table.label_map),
        "group_column": table.group_column,
        "table_digest": table.digest(),
        "n_slides": len(table.slide_ids),
        "encoder": encoder["name"],
        "feature_dim": int(encoder["feature_dim"]),
        "features_dir": str(data),
    }
    _prepare_run_dir(out, record, overwrite=overwrite)
    folds = _load_or_make_splits(out, table, config, splits)
    dones: list[dict[str, Any]] = []
    for k, split in enumerate(folds):
        fold_dir = out / f"fold{k}"
        done_file = fold_dir / DONE_FILE
        if done_file.is_file() and (fold_dir / BEST_DIR).is_dir():
            logger.info("fold %d is finished; skipping it", k)
            dones.append(json.loads(done_file.read_text()))
            continue
        done = _train_fold(
            k, split, out=out, table=table, store=store, config=config, encoder=encoder, callbacks=callbacks
        )
        if done is not None:
            dones.append(done)
    if not _is_rank_zero():
        return TrainResult(run_dir=out, checkpoint=out, metrics={})
    metrics = aggregate_run(out, table, dones)
    oof = metrics["oof"]
    logger.info(
        "%s: out-of-fold accuracy %.3f, balanced accuracy %.3f, macro AUC %s",
        table.task,
        oof["accuracy"],
        oof["balanced_accuracy"],
        oof["auc_macro"],
    )
    return TrainResult(run_dir=out, checkpoint=out, metrics=metrics)
