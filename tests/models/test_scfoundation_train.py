"""scFoundation pretraining and fine-tuning through the engine, on real bundled cells."""

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
from msfm.models.scfoundation.train import (
    PretrainRunConfig,
    fit_classifier,
    predict_cell_types,
    pretrain,
    resolve_panel,
)
from msfm.runtime.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return msfm.datasets.pbmc68k()


@pytest.fixture(scope="module")
def pbmc_file(pbmc, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pbmc.h5ad"
    pbmc[:300].copy().write_h5ad(path)
    return path


def _cfg(steps: int, **extra) -> PretrainRunConfig:
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
    }
    base.update(extra)
    return PretrainRunConfig().with_overrides(base, progress_bar=False)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "model", family="scfoundation").state_dict


def test_pretrain_streams_backed_file_and_writes_checkpoint(pbmc_file, tmp_path):
    model_dir = pretrain([pbmc_file], tmp_path / "run", _cfg(4))
    ckpt = load_checkpoint(model_dir, family="scfoundation")
    assert ckpt.meta["extra"]["global_step"] == 4
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") >= 2
    assert len(ckpt.gene_panel) == ckpt.config["num_genes"] < 19264
    # the exported model embeds real cells
    a = ad.read_h5ad(pbmc_file)[:16].copy()
    msfm.scfoundation.embed(a, model_dir, progress=False)
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
    pretrain([pbmc_file], tmp_path / "a", _cfg(6))
    with pytest.raises(_Crash):  # the process dies after step 5; the last checkpoint is from step 4
        pretrain([pbmc_file], tmp_path / "b", _cfg(6), callbacks=[_CrashAt(5)])
    assert load_checkpoint(tmp_path / "b" / "model").meta["extra"]["global_step"] == 4
    pretrain([pbmc_file], tmp_path / "b", _cfg(6))  # restarted with the same command
    assert load_checkpoint(tmp_path / "b" / "model").meta["extra"]["global_step"] == 6
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_pretrain_full_panel_one_step(pbmc, tmp_path):
    model_dir = pretrain(
        [pbmc[:8].copy()], tmp_path / "run", _cfg(1, gene_panel="scfoundation", batch_size=2)
    )
    assert load_checkpoint(model_dir).config["num_genes"] == 19264


def test_pretrain_loss_decreases(pbmc, tmp_path):
    run = tmp_path / "run"
    pretrain([pbmc], run, _cfg(30, batch_size=8, lr=3e-3, checkpoint_every_n_steps=30))
    import pandas as pd

    df = pd.read_csv(run / "metrics.csv").dropna(subset=["train/loss"])
    first, last = df["train/loss"].iloc[:2].mean(), df["train/loss"].iloc[-2:].mean()
    assert last < 0.8 * first, (first, last)


def test_pretrain_config_errors(tmp_path, pbmc):
    with pytest.raises(MsfmInputError, match="Unknown override"):
        PretrainRunConfig().with_overrides({"nope": 1})
    with pytest.raises(MsfmInputError, match="gene-list"):
        resolve_panel("missing_file.txt", [pbmc])
    with pytest.raises(MsfmInputError, match="No training data"):
        pretrain([], tmp_path / "x", _cfg(1))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("preset: scfoundation-tiny\nbatch_size: 3\ntrainer:\n  max_steps: 2\n")
    cfg = PretrainRunConfig.from_file(cfg_file)
    assert cfg.batch_size == 3
    assert cfg.trainer.max_steps == 2


@pytest.mark.distributed
def test_pretrain_two_process_ddp_cpu(pbmc_file, tmp_path):
    """2-process CPU DDP (gloo): both ranks train, the run exports one model."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from msfm.models.scfoundation.train import PretrainRunConfig, pretrain\n"
        "cfg = PretrainRunConfig().with_overrides({'max_steps': 3, 'batch_size': 2, 'accelerator': 'cpu',\n"
        "    'devices': 2, 'strategy': 'ddp', 'gene_panel': 'data', 'checkpoint_every_n_steps': 3,\n"
        "    'warmup_steps': 1}, progress_bar=False)\n"
        "pretrain([sys.argv[1]], sys.argv[2], cfg)\n"
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


def test_finetune_and_predict_on_real_labels(pbmc, tmp_path):
    from msfm.models.scfoundation.api import preprocessing_record
    from msfm.models.scfoundation.model import ScFoundation
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
    clf = fit_classifier(
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
    predict_cell_types(train, clf, device="cpu")
    pred = train.obs["scfoundation_cell_type"].astype(str).to_numpy()
    truth = train.obs["cell_type"].astype(str).to_numpy()
    majority = max(np.mean(truth == c) for c in set(truth))
    assert np.mean(pred == truth) > majority + 0.1  # learns beyond the majority class on its training cells
    conf = train.obs["scfoundation_cell_type_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()
    assert train.obsm["scfoundation_cell_type_proba"].shape == (200, len(set(truth)))
    with pytest.raises(MsfmInputError, match="labels_key"):
        fit_classifier(train, backbone, labels_key="nope", out=tmp_path / "x")
