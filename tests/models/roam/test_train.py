"""ROAM cross-validated training: table, splits, sampler, ROI dropout, a full run, exact resume, error paths."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import msfm
from msfm.errors import MsfmInputError
from msfm.models.roam.dataset import SlideBagDataset, collate_slides
from msfm.models.roam.feature_store import FeatureStore
from msfm.models.roam.features import SlideFeatures, write_slide_features
from msfm.models.roam.monitor import FoldMonitor
from msfm.models.roam.objective import roam_objective
from msfm.models.roam.sampler import BalancedEpochSampler, sample_weights
from msfm.models.roam.slide_table import read_slide_table
from msfm.models.roam.splits import make_splits, read_splits
from msfm.models.roam.train_config import RoamTrainConfig
from msfm.runtime.checkpoint import load_checkpoint
from msfm.runtime.results import TrainResult

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

D = 16
TINY = {"dim": 16, "heads": 2, "dim_head": 8, "mlp_dim": 32, "depths": (1, 1, 1, 1, 1)}


def write_cohort(
    root: Path, classes=("astro", "oligo"), n_per=(6, 6), seed=0, rois=(1, 7)
) -> tuple[Path, Path]:
    """Slides whose ROI features separate the classes (a shift of the first feature channels)."""
    rng = np.random.default_rng(seed)
    fd = root / "features"
    fd.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, (name, n) in enumerate(zip(classes, n_per)):
        for i in range(n):
            sid = f"{name}{i}"
            k = int(rng.integers(*rois))
            x = rng.normal(size=(k, 84, D)).astype(np.float32)
            x[..., c * 4 : c * 4 + 4] += 2.5
            sf = SlideFeatures(sid, x, np.zeros((k, 2), np.int64), attrs={"encoder": "synthetic"})
            write_slide_features(fd / f"{sid}.h5", sf)
            rows.append({"slide_id": sid, "case_id": f"{name}-p{i // 2}", "subtype": name})
    table = root / "slides.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table, fd


def cfg(**kw) -> RoamTrainConfig:
    base = {
        "task": "subtype",
        "model": "roam-tiny",
        "model_overrides": TINY,
        "folds": 2,
        "max_epochs": 6,
        "checkpoint_every_n_epochs": 2,
        "warmup_epochs": 1,
        "best_from_epoch": 1,
        "lr": 3e-3,
        "accelerator": "cpu",
        "devices": 1,
        "progress_bar": False,
        "test_frac": 0.2,
        "roi_dropout_min": 3,
        "roi_keep_fraction": 0.7,
    }
    base.update(kw)
    return RoamTrainConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    return write_cohort(tmp_path_factory.mktemp("cohort"))


def train(table: Path, fd: Path, out: Path, config: RoamTrainConfig, **kw) -> TrainResult:
    return msfm.roam.train(fd, out, slides=table, config=config, **kw)


def oof(run: TrainResult) -> pd.DataFrame:
    return pd.read_csv(Path(run.run_dir) / "oof_predictions.csv")


def held_out(run: TrainResult) -> pd.DataFrame:
    return pd.read_csv(Path(run.run_dir) / "test_predictions.csv")


@pytest.fixture(scope="module")
def full_run(cohort, tmp_path_factory):
    torch.set_num_threads(1)
    table, fd = cohort
    out = tmp_path_factory.mktemp("runs") / "full"
    return train(table, fd, out, cfg())


# --- settings -----------------------------------------------------------------------------------------------


def test_settings_come_from_config_file_and_flat_overrides(tmp_path):
    from msfm.models.roam.checkpoint import save_model
    from msfm.models.roam.model import Roam
    from msfm.models.roam.training import training_settings
    from msfm.registry import preset_config

    f = tmp_path / "train.yaml"
    f.write_text("task: subtype\nlr: 0.001\nfolds: 3\n")
    s = training_settings(f, overrides={"lr": 0.01, "devices": "0,1", "label_map": "2=tumour,3=tumour"})
    assert (s.task, s.lr, s.folds, s.devices) == ("subtype", 0.01, 3, [0, 1])
    assert s.label_map == {"2": "tumour", "3": "tumour"}
    s = training_settings(cfg(), overrides={"group_column": "none", "classes": "a,b", "devices": "2"})
    assert (s.group_column, s.classes, s.devices, s.model) == (None, ["a", "b"], 2, "roam-tiny")
    assert training_settings({"task": "t", "preset": "roam-fixture"}).model == "roam-fixture"
    assert training_settings(cfg(), overrides={"preset": "roam-subtyping"}).model == "roam-subtyping"
    with pytest.raises(MsfmInputError, match="task='subtype'"):
        training_settings(None, overrides={"lr": 0.1})
    with pytest.raises(MsfmInputError, match="Did you mean 'lr'"):
        training_settings(cfg(), overrides={"lrr": 0.1})
    # checkpoint= is the init checkpoint (one checkpoint directory, or a Loaded of one)
    save_model(Roam(preset_config("roam-tiny", d_in=D, n_classes=2, **TINY)), tmp_path / "base")
    s = training_settings(cfg(), checkpoint=tmp_path / "base")
    assert s.init_from == str(tmp_path / "base")
    loaded = msfm.roam.load(tmp_path / "base", device="cpu")
    assert training_settings(cfg(), checkpoint=loaded).init_from == str(tmp_path / "base")
    with pytest.raises(MsfmInputError, match="one msfm ROAM checkpoint directory"):
        training_settings(cfg(), checkpoint=tmp_path)


# --- table, splits, sampler, dataset ------------------------------------------------------------------------


def test_slide_table_labels_groups_and_label_map(cohort, tmp_path):
    table, fd = cohort
    t = read_slide_table(table, "subtype", features_dir=fd)
    assert t.class_names == ["astro", "oligo"]
    assert t.group_column == "case_id"
    assert len(t.slide_ids) == 12
    assert np.bincount(t.labels).tolist() == [6, 6]
    # integer codes with gaps stay "1", not "1.0"; empty cells are unlabelled; label_map merges and drops
    df = pd.read_csv(table)
    df["code"] = [2, 3, None, 4, 2, 3, 0, 0, 1, None, 0, 1]
    t2 = read_slide_table(df, "code", features_dir=fd, group_column=None)
    assert t2.class_names == ["0", "1", "2", "3", "4"]
    assert t2.n_unlabelled == 2
    assert t2.groups is None
    t3 = read_slide_table(
        df, "code", features_dir=fd, label_map={"2": "tumour", "3": "tumour", "4": "tumour", "0": "normal"}
    )
    assert t3.class_names == ["normal", "tumour"]
    assert len(t3.slide_ids) == 8
    with pytest.raises(MsfmInputError, match="not among classes"):
        read_slide_table(table, "subtype", features_dir=fd, classes=["astro", "epend"])
    with pytest.raises(MsfmInputError, match="no column 'grade'"):
        read_slide_table(table, "grade", features_dir=fd)


def test_missing_feature_files_are_listed(cohort, tmp_path):
    table, fd = cohort
    df = pd.read_csv(table)
    extra = pd.DataFrame({"slide_id": [f"ghost{i:02d}" for i in range(12)], "subtype": "astro"})
    df = pd.concat([df, extra], ignore_index=True)
    with pytest.raises(MsfmInputError) as err:
        read_slide_table(df, "subtype", features_dir=fd)
    text = str(err.value)
    assert "12 slide(s)" in text
    assert str(fd) in text
    assert "ghost00" in text
    assert "ghost09" in text
    assert "ghost10" not in text
    assert "(+2 more)" in text
    assert "--skip-missing" in text
    t = read_slide_table(df, "subtype", features_dir=fd, skip_missing=True)
    assert len(t.slide_ids) == 12
    assert len(t.missing) == 12


def test_splits_stratified_grouped_and_seeded():
    ids = [f"s{i}" for i in range(40)]
    y = np.repeat([0, 1, 2, 3], 10)
    folds = make_splits(ids, y, folds=4, test_frac=0.2, seed=3)
    test_sets = [set(f.slide_id[f.split == "test"]) for f in folds]
    assert all(t == test_sets[0] for t in test_sets)
    assert len(test_sets[0]) == 8
    assert np.bincount(y[[ids.index(s) for s in test_sets[0]]]).tolist() == [2, 2, 2, 2]
    val_count = pd.concat([f[f.split == "val"] for f in folds]).slide_id.value_counts()
    assert len(val_count) == 32
    assert (val_count == 1).all()
    for f in folds:
        vy = y[[ids.index(s) for s in f.slide_id[f.split == "val"]]]
        assert np.bincount(vy, minlength=4).tolist() == [2, 2, 2, 2]  # stratified
    again = make_splits(ids, y, folds=4, test_frac=0.2, seed=3)
    assert all(a.equals(b) for a, b in zip(folds, again))
    other = make_splits(ids, y, folds=4, test_frac=0.2, seed=4)
    assert not all(a.equals(b) for a, b in zip(folds, other))
    # patient-grouped: a patient's slides never straddle train/val/test
    groups = np.array([f"p{i // 2}" for i in range(40)])
    for f in make_splits(ids, y, groups, folds=4, test_frac=0.25, seed=0):
        where = pd.Series(f.split.values, index=groups)
        assert (where.groupby(level=0).nunique() == 1).all()
    with pytest.raises(MsfmInputError, match="fewer than folds"):
        make_splits(ids[:4], y[:4], folds=5)


def test_read_user_splits_clam_format(cohort, tmp_path):
    table, fd = cohort
    t = read_slide_table(table, "subtype", features_dir=fd)
    d = tmp_path / "splits"
    d.mkdir()
    pd.DataFrame(
        {"train": ["astro0", "astro1", "oligo0", "oligo1"], "val": ["astro2", "oligo2", None, None]}
    ).to_csv(d / "splits_0.csv", index=False)
    (folds,) = read_splits(d, t)
    assert folds.split.value_counts().to_dict() == {"train": 4, "val": 2}
    pd.DataFrame({"slide_id": ["astro0", "nope"], "split": ["train", "val"]}).to_csv(
        d / "splits_1.csv", index=False
    )
    with pytest.raises(MsfmInputError, match="nope"):
        read_splits(d, t)


def test_sample_weights_and_balanced_epoch_sampler():
    y = np.array([0] * 8 + [1] * 2)
    np.testing.assert_allclose(sample_weights(y), [10 / 8] * 8 + [10 / 2] * 2)
    s = BalancedEpochSampler(y, seed=5)
    s.set_epoch(0)
    e0 = list(s)
    assert len(e0) == len(s) == 10
    assert [p for _, _, p in e0] == list(range(10))
    assert list(s) == e0  # a function of (seed, epoch)
    s.set_epoch(1)
    assert [i for i, _, _ in s] != [i for i, _, _ in e0]
    draws = []
    for e in range(200):
        s.set_epoch(e)
        draws += [y[i] for i, _, _ in s]
    assert np.mean(draws) == pytest.approx(0.5, abs=0.05)  # 20% minority drawn half the time
    two = BalancedEpochSampler(y, seed=5, num_replicas=2)
    two.set_epoch(0)
    assert len(two) == 5


def test_roi_dropout_and_collate(cohort):
    table, fd = cohort
    t = read_slide_table(table, "subtype", features_dir=fd)
    store = FeatureStore(t.paths, cache_bytes=10**8)
    big = {sid: store.get(sid).shape[0] for sid in t.slide_ids}
    sid = max(big, key=big.get)
    ds = SlideBagDataset(store, [sid], [0], train=True, keep_fraction=0.5, min_rois=2, seed=1)
    a, b = ds[(0, 3, 7)], ds[(0, 3, 7)]
    assert a["features"].shape[0] == big[sid] // 2
    assert torch.equal(a["features"], b["features"])  # deterministic in (seed, epoch, position)
    assert not torch.equal(ds[(0, 3, 7)]["features"], ds[(0, 4, 7)]["features"]) or big[sid] < 4
    ds_small = SlideBagDataset(store, [sid], [0], train=True, keep_fraction=0.5, min_rois=100)
    assert ds_small[(0, 0, 0)]["features"].shape[0] == big[sid]
    batch = collate_slides([ds_small[(0, 0, 0)], SlideBagDataset(store, t.slide_ids[:1], [1])[0]])
    assert batch["features"].shape[:2] == batch["roi_mask"].shape
    assert batch["labels"].tolist() == [0, 1]
    assert batch["roi_mask"].sum(1).tolist() == [big[sid], big[t.slide_ids[0]]]


def test_objective_batch_equals_mean_of_slides(cohort):
    """Padding slides into one batch gives the reference's (sum of per-slide losses) / batch size."""
    from msfm.models.roam.model import Roam
    from msfm.registry import preset_config

    table, fd = cohort
    t = read_slide_table(table, "subtype", features_dir=fd)
    store = FeatureStore(t.paths)
    ds = SlideBagDataset(store, t.slide_ids[:4], t.labels[:4])
    model = Roam(preset_config("roam-tiny", d_in=D, n_classes=2, dropout=0.0, mil_dropout=0.0, **TINY))
    model.train()  # instance loss on; no dropout so the comparison is exact
    whole = roam_objective(model, collate_slides([ds[i] for i in range(4)]), roi_weight=0.7).loss
    per = [roam_objective(model, collate_slides([ds[i]]), roi_weight=0.7).loss for i in range(4)]
    assert whole.item() == pytest.approx(torch.stack(per).sum().item() / 4, rel=1e-5)


def test_fold_monitor_best_and_early_stopping(tmp_path):
    saved, ckpts = [], []
    mon = FoldMonitor(
        export=lambda m, e, v: saved.append((e, v)),
        ckpt_path=tmp_path / "last.ckpt",
        best_from_epoch=2,
        early_stopping=True,
        patience=2,
        stop_epoch=5,
        max_epochs=50,
        every_n_epochs=1,
    )
    losses = [0.1, 0.5, 0.9, 0.8, 0.85, 0.84, 0.83, 0.82, 0.7]
    trainer = SimpleNamespace(
        current_epoch=0, callback_metrics={}, is_global_zero=True, should_stop=False, max_epochs=50
    )
    trainer.save_checkpoint = lambda path, weights_only=False: ckpts.append(path)
    for epoch, loss in enumerate(losses):
        trainer.current_epoch, trainer.callback_metrics = epoch, {"val/loss": torch.tensor(loss)}
        mon.on_train_epoch_end(trainer, SimpleNamespace(model=None))
        if trainer.should_stop:
            break
    # epoch 0's low loss is before best_from_epoch; best = epoch 3; > 2 bad epochs and epoch >= 5 -> stop at 6
    assert [e for e, _ in saved] == [2, 3]
    assert mon.best_epoch == 3
    assert epoch == 6
    assert mon.stopped
    assert len(ckpts) == 7
    state = mon.state_dict()
    mon2 = FoldMonitor(
        export=lambda *a: None,
        ckpt_path=tmp_path / "x",
        best_from_epoch=2,
        early_stopping=True,
        patience=2,
        stop_epoch=5,
        max_epochs=50,
        every_n_epochs=1,
    )
    mon2.load_state_dict(state)
    t2 = SimpleNamespace(should_stop=False)
    mon2.on_train_start(t2, None)
    assert t2.should_stop
    assert mon2.best_loss == pytest.approx(0.8)


# --- full runs ----------------------------------------------------------------------------------------------


def test_two_fold_run_learns_and_writes_everything(full_run, cohort):
    assert isinstance(full_run, TrainResult)
    assert full_run.checkpoint == full_run.run_dir  # the run (its fold ensemble) is the checkpoint
    assert full_run.metrics["classes"] == ["astro", "oligo"]
    run = full_run.run_dir
    for name in (
        "run.json",
        "splits/fold0.csv",
        "splits/fold1.csv",
        "oof_predictions.csv",
        "test_predictions.csv",
        "metrics.json",
        "fold_metrics.csv",
        "confusion_oof.png",
        "confusion_test.png",
        "fold0/done.json",
        "fold1/checkpoints/last.ckpt",
    ):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["oof"]["accuracy"] >= 0.85
    assert m["oof"]["auc_macro"] >= 0.9
    assert m["test_ensemble"]["accuracy"] >= 0.75
    assert len(m["folds"]) == 2
    assert set(m["oof"]["confusion"]) == {"counts", "normalized"}
    # the run's classes and label mapping travel with each fold's best model
    ck = load_checkpoint(run / "fold0" / "best", family="roam")
    extra = ck.meta["extra"]
    assert extra["class_names"] == ["astro", "oligo"]
    assert extra["task"] == "subtype"
    assert extra["encoder"]["name"] == "synthetic"
    assert extra["feature_dim"] == D
    assert extra["epoch"] >= 1
    assert ck.config["class_names"] == ["astro", "oligo"]
    rec = json.loads((run / "run.json").read_text())
    assert rec["label_map"] == {"astro": 0, "oligo": 1}
    # out-of-fold = each non-test slide once; test ensemble = mean of the two folds' softmax
    oof = pd.read_csv(run / "oof_predictions.csv")
    test = pd.read_csv(run / "test_predictions.csv")
    assert len(oof) + len(test) == 12
    assert not set(oof.slide_id) & set(test.slide_id)
    f0 = pd.read_csv(run / "fold0" / "predictions.csv").query("split == 'test'").set_index("slide_id")
    f1 = pd.read_csv(run / "fold1" / "predictions.csv").query("split == 'test'").set_index("slide_id")
    cols = ["prob_astro", "prob_oligo"]
    mean = (f0.loc[test.slide_id, cols].to_numpy() + f1.loc[test.slide_id, cols].to_numpy()) / 2
    np.testing.assert_allclose(test[cols].to_numpy(), mean, atol=1e-12)
    assert (test.n_models == 2).all()


def test_finished_run_is_reused_and_other_config_refused(full_run, cohort):
    table, fd = cohort
    run = full_run.run_dir
    before = (run / "fold0" / "best" / "model.safetensors").stat().st_mtime_ns
    again = train(
        table, fd, run, cfg(progress_bar=True, checkpoint_every_n_epochs=1)
    )  # runtime fields may differ
    assert (run / "fold0" / "best" / "model.safetensors").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(oof(again), oof(full_run))
    assert again.metrics == full_run.metrics
    with pytest.raises(MsfmInputError, match=r"different settings: config fields \['lr'\]"):
        train(table, fd, run, cfg(lr=1e-3))
    nonempty = run.parent / "not_a_run"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("user file")
    with pytest.raises(MsfmInputError, match="not a ROAM run"):
        train(table, fd, nonempty, cfg(), overwrite=True)
    assert (nonempty / "keep.txt").exists()


class _Kill(Callback):
    """Simulates a kill: fails at the start of epoch 3 of fold 1 (fold 0 finished; last.ckpt is from epoch 1)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 3 and Path(trainer.default_root_dir).name == "fold1":
            raise RuntimeError("simulated kill")


def test_resume_after_a_kill_matches_the_uninterrupted_run(full_run, cohort, tmp_path):
    table, fd = cohort
    out = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(table, fd, out, cfg(), callbacks=[_Kill()])
    assert (out / "fold0" / "done.json").is_file()
    assert not (out / "fold1" / "done.json").exists()
    assert (out / "fold1" / "checkpoints" / "last.ckpt").is_file()
    resumed = train(table, fd, out, cfg())
    np.testing.assert_allclose(
        oof(resumed).filter(like="prob_").to_numpy(), oof(full_run).filter(like="prob_").to_numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        held_out(resumed).filter(like="prob_").to_numpy(),
        held_out(full_run).filter(like="prob_").to_numpy(),
        atol=1e-6,
    )
    a = pd.read_csv(full_run.run_dir / "fold1" / "metrics.csv")["val/loss"].dropna().to_numpy()
    b = pd.read_csv(out / "fold1" / "metrics.csv")["val/loss"].dropna().to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)  # every epoch's validation loss, not just the end point


def test_class_absent_from_a_fold(tmp_path):
    table, fd = write_cohort(tmp_path, classes=("astro", "oligo", "epend"), n_per=(4, 4, 1), seed=1)
    res = train(table, fd, tmp_path / "run", cfg(max_epochs=2, test_frac=0.0, best_from_epoch=5))
    m = res.metrics
    folds_without = [f for f in m["folds"] if f["val"]["support"]["epend"] == 0]
    assert len(folds_without) == 1
    assert folds_without[0]["val"]["auc"]["epend"] is None  # NaN -> null in JSON
    assert any("epend" in n for n in folds_without[0]["val"]["notes"])
    assert sorted(oof(res).slide_id) == sorted(pd.read_csv(table).slide_id)
    assert all(f["best_epoch"] == 1 for f in m["folds"])  # short run: the last epoch is still a candidate
    assert math.isfinite(m["oof"]["accuracy"])


def test_init_from_keeps_shared_weights_and_resizes_heads(cohort, tmp_path):
    from msfm.models.roam.checkpoint import save_model
    from msfm.models.roam.model import Roam
    from msfm.models.roam.training import _build_model
    from msfm.registry import preset_config

    table, fd = cohort
    t = read_slide_table(table, "subtype", features_dir=fd)
    base = Roam(preset_config("roam-tiny", d_in=D, n_classes=3, **TINY))
    save_model(base, tmp_path / "base", extra={"task": "other"})
    model = _build_model(
        cfg(init_from=str(tmp_path / "base"), model_overrides={"dropout": 0.0}), t, D, seed=0
    )
    assert model.config.n_classes == 2
    assert model.config.dropout == 0.0
    assert model.config.class_names == ("astro", "oligo")
    own, old = model.state_dict(), base.state_dict()
    assert torch.equal(own["pyramid.embed_20.proj.weight"], old["pyramid.embed_20.proj.weight"])
    assert own["mil.score.weight"].shape[0] == 2
    assert old["mil.score.weight"].shape[0] == 3
    with pytest.raises(MsfmInputError, match="only change"):
        _build_model(cfg(init_from=str(tmp_path / "base"), model_overrides={"dim": 32}), t, D, seed=0)
    with pytest.raises(MsfmInputError, match="expects 16-d"):
        _build_model(cfg(init_from=str(tmp_path / "base")), t, 32, seed=0)


def test_bad_hardware_settings_fail_before_writing(cohort, tmp_path):
    table, fd = cohort
    with pytest.raises(MsfmInputError, match="hardware settings"):
        train(table, fd, tmp_path / "r", cfg(precision="17-bits"))
    assert not (tmp_path / "r").exists()
