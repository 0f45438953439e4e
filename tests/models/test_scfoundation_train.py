"""scFoundation pretraining (`train`) and fine-tuning (`fit_classifier`, `predict`) through the engine, on real
bundled cells."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning
import numpy as np
import pytest
import torch

import msfm
from msfm.errors import MsfmInputError
from msfm.models.scfoundation.pretraining import ScFoundationTrainConfig, resolve_panel
from msfm.runtime.checkpoint import load_checkpoint
from msfm.runtime.config import build_settings
from msfm.runtime.results import TrainResult

sf = msfm.scfoundation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return msfm.datasets.pbmc68k()


@pytest.fixture(scope="module")
def pbmc_file(pbmc, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pbmc.h5ad"
    pbmc[:300].copy().write_h5ad(path)
    return path


def _cfg(steps: int, **extra) -> dict:
    base = {
        "max_steps": steps,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "accelerator": "cpu",
        "devices": 1,
        "checkpoint_every_n_steps": 2,
        "gene_panel": "data",
        "block_size": 64,
        "log_every_n_steps": 1,
        "progress_bar": False,
    }
    base.update(extra)
    return base


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "model", family="scfoundation").state_dict


def test_pretrain_streams_backed_file_and_writes_checkpoint(pbmc_file, tmp_path):
    result = sf.train(pbmc_file, tmp_path / "run", **_cfg(4))
    assert isinstance(result, TrainResult)
    assert result.run_dir == tmp_path / "run"
    assert result.metrics["global_step"] == 4
    assert np.isfinite(result.metrics["train/loss"])
    model_dir = result.checkpoint
    ckpt = load_checkpoint(model_dir, family="scfoundation")
    assert ckpt.meta["extra"]["global_step"] == 4
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") >= 2
    assert len(ckpt.gene_panel) == ckpt.config["num_genes"] < 19264
    # the exported model embeds real cells
    a = ad.read_h5ad(pbmc_file)[:16].copy()
    sf.embed(a, result, progress=False)  # a TrainResult is a checkpoint
    assert np.isfinite(a.obsm["X_scfoundation"]).all()


class _Crash(RuntimeError):
    pass


class _CrashAt(lightning.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise _Crash


def test_resume_after_kill_equals_uninterrupted(pbmc_file, tmp_path):
    sf.train([pbmc_file], tmp_path / "a", **_cfg(6))
    with pytest.raises(_Crash):  # the process dies after step 5; the last checkpoint is from step 4
        sf.train([pbmc_file], tmp_path / "b", callbacks=[_CrashAt(5)], **_cfg(6))
    assert load_checkpoint(tmp_path / "b" / "model").meta["extra"]["global_step"] == 4
    sf.train([pbmc_file], tmp_path / "b", **_cfg(6))  # restarted with the same command
    assert load_checkpoint(tmp_path / "b" / "model").meta["extra"]["global_step"] == 6
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_pretrain_full_panel_one_step(pbmc, tmp_path):
    result = sf.train([pbmc[:8].copy()], tmp_path / "run", **_cfg(1, gene_panel="scfoundation", batch_size=2))
    assert load_checkpoint(result.checkpoint).config["num_genes"] == 19264


def test_pretrain_loss_decreases(pbmc, tmp_path):
    run = tmp_path / "run"
    sf.train(pbmc, run, **_cfg(30, batch_size=8, lr=3e-3, checkpoint_every_n_steps=30))
    import pandas as pd

    df = pd.read_csv(run / "metrics.csv").dropna(subset=["train/loss"])
    first, last = df["train/loss"].iloc[:2].mean(), df["train/loss"].iloc[-2:].mean()
    assert last < 0.8 * first, (first, last)


def test_train_config_errors(tmp_path, pbmc):
    with pytest.raises(MsfmInputError, match="Unknown ScFoundationTrainConfig setting 'nope'"):
        sf.train(pbmc, tmp_path / "x", nope=1)
    with pytest.raises(MsfmInputError, match="Did you mean 'max_steps'"):
        build_settings(ScFoundationTrainConfig, overrides={"max_step": 1})
    with pytest.raises(MsfmInputError, match="gene-list"):
        resolve_panel("missing_file.txt", [pbmc])
    with pytest.raises(MsfmInputError, match="No training data"):
        sf.train([], tmp_path / "x", **_cfg(1))
    with pytest.raises(MsfmInputError, match="raw counts"):
        sf.train(pbmc, tmp_path / "x", pre_normalized=True)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("preset: scfoundation-tiny\nbatch_size: 3\ntrainer:\n  max_steps: 2\n")
    cfg = build_settings(ScFoundationTrainConfig, file=cfg_file, overrides={"lr": 0.5, "layer": "counts"})
    assert (cfg.batch_size, cfg.trainer.max_steps, cfg.optim.lr, cfg.read.layer) == (3, 2, 0.5, "counts")
    assert not (tmp_path / "x").exists()  # nothing is written before the settings and data are checked


def test_train_from_checkpoint_starts_from_its_weights(pbmc, tmp_path):
    small = pbmc[:40].copy()
    first = sf.train(small, tmp_path / "a", **_cfg(2))
    start = load_checkpoint(first.checkpoint).state_dict
    # one step at a negligible learning rate: the weights stay where the checkpoint left them
    cont = sf.train(small, tmp_path / "b", checkpoint=first, **_cfg(1, lr=1e-12, gene_panel=None))
    ckpt = load_checkpoint(cont.checkpoint)
    assert ckpt.meta["extra"]["init_checkpoint"] == str(first.checkpoint)
    assert ckpt.gene_panel == load_checkpoint(first.checkpoint).gene_panel
    for k, v in ckpt.state_dict.items():
        torch.testing.assert_close(v, start[k], atol=1e-6, rtol=0, msg=k)
    with pytest.raises(MsfmInputError, match="encoder_dim: checkpoint 64 vs settings 32"):
        sf.train(
            small, tmp_path / "c", checkpoint=first, preset="scfoundation-fixture", **_cfg(1, gene_panel=None)
        )
    with pytest.raises(MsfmInputError, match="another model"):
        sf.train(small, tmp_path / "c", checkpoint=first, model_overrides={"encoder_depth": 3}, **_cfg(1))
    with pytest.raises(MsfmInputError, match="19264 genes"):
        sf.train(small, tmp_path / "c", checkpoint=first, **_cfg(1, gene_panel="scfoundation"))


def test_old_pretrain_names_warn_and_still_work(pbmc, tmp_path):
    with pytest.warns(DeprecationWarning, match="ScFoundationTrainConfig"):
        old_config = sf.PretrainRunConfig
    cfg = old_config(layer="counts").with_overrides(_cfg(1, batch_size=2))
    assert cfg.read.layer == "counts"
    assert cfg.trainer.max_steps == 1
    assert cfg.optim.lr == 1e-3
    with pytest.warns(DeprecationWarning, match=r"msfm\.scfoundation\.train"):
        model_dir = sf.pretrain([pbmc[:8].copy()], tmp_path / "run", cfg)
    assert model_dir == tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").is_file()


@pytest.mark.slow  # 22 s in the full run (two spawned processes)
@pytest.mark.distributed
def test_pretrain_two_process_ddp_cpu(pbmc_file, tmp_path):
    """2-process CPU DDP (gloo): both ranks train, the run exports one model."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import msfm\n"
        "msfm.scfoundation.train(sys.argv[1], sys.argv[2], max_steps=3, batch_size=2, accelerator='cpu',\n"
        "    devices='2', strategy='ddp', gene_panel='data', checkpoint_every_n_steps=3, warmup_steps=1,\n"
        "    progress_bar=False)\n"
    )
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    src = str(Path(msfm.__file__).parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script), str(pbmc_file), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "model").meta["extra"]["global_step"] == 3


@pytest.mark.slow  # 58 s in the full run
def test_finetune_and_predict_on_real_labels(pbmc, tmp_path):
    from msfm.models.scfoundation.model import ScFoundation
    from msfm.models.scfoundation.provenance import preprocessing_record
    from msfm.registry import preset_config
    from msfm.runtime.checkpoint import save_checkpoint

    panel = resolve_panel("data", [pbmc])
    cfg = preset_config("scfoundation-tiny").model_copy(update={"num_genes": len(panel)})
    torch.manual_seed(0)
    backbone = save_checkpoint(
        tmp_path / "bb",
        family="scfoundation",
        config=cfg,
        state_dict=ScFoundation(cfg).state_dict(),
        gene_panel=list(panel.symbols),
        preprocessing=preprocessing_record(),
    )
    train = pbmc[:200].copy()
    clf = sf.fit_classifier(
        train,
        backbone,
        labels_key="cell_type",
        out=tmp_path / "clf",
        mode="partial",
        max_epochs=8,
        batch_size=32,
        lr=3e-3,
        accelerator="cpu",
        progress=False,
    )
    assert isinstance(clf, TrainResult)
    assert clf.checkpoint == tmp_path / "clf"
    assert clf.run_dir.is_dir()
    assert sf.predict(train, clf, device="cpu", progress=False) is train
    pred = train.obs["scfoundation_cell_type"].astype(str).to_numpy()
    truth = train.obs["cell_type"].astype(str).to_numpy()
    majority = max(np.mean(truth == c) for c in set(truth))
    assert np.mean(pred == truth) > majority + 0.1  # learns beyond the majority class on its training cells
    conf = train.obs["scfoundation_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()
    probs = train.obsm["scfoundation_probs"]
    assert probs.shape == (200, len(set(truth)))
    np.testing.assert_allclose(probs.max(1), conf)
    assert train.uns["scfoundation"]["predict"]["classes"] == sorted(set(truth))
    # a classifier is also a checkpoint for embed (its fine-tuned backbone) and loads as one Loaded
    loaded = sf.load(clf, device="cpu")
    assert loaded.family == "scfoundation"
    assert loaded.config.labels_key == "cell_type"
    emb = sf.embed(train[:8].copy(), loaded, progress=False)
    assert emb.obsm["X_scfoundation"].shape == (8, 4 * cfg.encoder_dim)
    # the old name keeps its keys for one release
    with pytest.warns(DeprecationWarning, match=r"msfm\.scfoundation\.predict"):
        sf.predict_cell_types(train, clf, device="cpu", progress=False)
    assert {"scfoundation_cell_type", "scfoundation_cell_type_confidence"} <= set(train.obs)
    assert "scfoundation_cell_type_proba" in train.obsm
    with pytest.raises(MsfmInputError, match="labels_key"):
        sf.fit_classifier(train, backbone, labels_key="nope", out=tmp_path / "x")
    with pytest.raises(MsfmInputError, match="exists"):
        sf.fit_classifier(train, backbone, labels_key="cell_type", out=tmp_path / "clf")
