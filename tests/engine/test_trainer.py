"""build_trainer / fit: strategies, run-directory contract, exact resume, export, safe checkpoint loading."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from pydantic import ValidationError
from torch.utils.data import DataLoader, TensorDataset

from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.objective import LossOutput
from msfm.engine.sampler import ResumableDataLoader
from msfm.engine.trainer import (
    ExportCallback,
    ExportSpec,
    SafeCheckpointIO,
    TrainerOptions,
    _build_strategy,
    _SafeFSDPStrategy,
    build_trainer,
    fit,
    last_checkpoint,
)
from msfm.errors import CheckpointError, MsfmInputError
from msfm.runtime.checkpoint import is_checkpoint_dir, load_checkpoint

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "progress_bar": False,
    "model_summary": False,
    "log_every_n_steps": 1,
}


def _data(n: int = 20) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


def _net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
    )


def _noisy_mse(model: torch.nn.Module, batch: list[torch.Tensor]) -> LossOutput:
    x, y = batch
    # Draws from the global RNG (as masking objectives do): resume must restore the generator state too.
    noise = 0.01 * torch.randn_like(y)
    loss = torch.nn.functional.mse_loss(model(x), y + noise)
    return LossOutput(loss, {"mse": loss.detach(), "noise": noise.abs().mean()}, n=x.shape[0])


def _train(
    run_dir: Path, max_steps: int, *, resumable: bool = True, every: int = 3, **opts
) -> torch.nn.Module:
    net = _net()
    if resumable:
        loader = ResumableDataLoader(_data(), batch_size=3, shuffle=True, seed=5)
    else:
        loader = DataLoader(_data(), batch_size=4, shuffle=False)
    module = MsfmLightningModule(net, _noisy_mse, OptimConfig(lr=1e-2, warmup_steps=2, total_steps=20))
    options = TrainerOptions(**{**QUIET, "max_steps": max_steps, "checkpoint_every_n_steps": every, **opts})
    trainer = build_trainer(options, run_dir, export=ExportSpec(family="tiny", config={"hidden": 8}))
    fit(trainer, module, loader, run_dir, run_config={"experiment": "resume"})
    return net


def _metric_rows(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as fh:
        return [(r["step"], r["train/loss"], r["lr"]) for r in csv.DictReader(fh)]


@pytest.mark.parametrize(
    ("k", "resumable"),
    [
        (4, True),  # mid-epoch (7 batches per epoch), shuffled: needs the resumable loader
        (7, True),  # exactly at the epoch boundary
        (10, False),  # plain DataLoader, resumed at an epoch boundary (5 batches per epoch)
    ],
)
def test_resume_equals_uninterrupted(
    tmp_path: Path, k: int, resumable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    total = 14
    ref = _train(tmp_path / "ref", total, resumable=resumable)
    _train(tmp_path / "run", k, resumable=resumable)  # "killed" after k steps
    assert last_checkpoint(tmp_path / "run") is not None
    with caplog.at_level(logging.INFO, logger="msfm.engine.trainer"):
        resumed = _train(tmp_path / "run", total, resumable=resumable)
    assert f"resuming from step {k}" in caplog.text

    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # The metrics log of the resumed run is the same as the uninterrupted one (no lost or duplicated steps).
    assert _metric_rows(tmp_path / "run" / "metrics.csv") == _metric_rows(tmp_path / "ref" / "metrics.csv")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resumed_from_step"] == k
    assert config["trainer"]["max_steps"] == total
    assert config["optim"]["lr"] == 1e-2
    assert config["run"] == {"experiment": "resume"}


def test_run_directory_contract_and_export(tmp_path: Path) -> None:
    net = _train(tmp_path, 5, every=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    for name in ("metrics.csv", "config.json"):
        assert (tmp_path / name).is_file()
    # last.ckpt holds the final step although 5 is not a multiple of 2, and loads with weights_only=True.
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 5
    assert state["hyper_parameters"]["optim"]["lr"] == 1e-2
    assert is_checkpoint_dir(tmp_path / "model")
    exported = load_checkpoint(tmp_path / "model", family="tiny")
    assert exported.config == {"hidden": 8}
    assert exported.meta["extra"]["global_step"] == 5
    for name, value in net.state_dict().items():
        torch.testing.assert_close(exported.state_dict[name], value)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/mse", "train/noise", "lr", "step"} <= set(header)


def test_export_callback_state_sources(tmp_path: Path) -> None:
    net = _net()
    module = MsfmLightningModule(net, _noisy_mse, OptimConfig(lr=1e-2))
    # Zero-argument form, no out_dir: written to <run_dir>/model.
    live = ExportCallback(
        family="tiny", config={}, get_state_dict=lambda: net.state_dict(), gene_panel=["A", "B"]
    )
    # One-argument form: maps the gathered LightningModule state dict.
    mapped = ExportCallback(
        "tiny",
        {},
        out_dir=tmp_path / "head_only",
        get_state_dict=lambda state: {
            k[len("model.3.") :]: v for k, v in state.items() if k.startswith("model.3.")
        },
    )
    trainer = build_trainer(
        TrainerOptions(**{**QUIET, "max_steps": 3}), tmp_path / "run", callbacks=[live, mapped]
    )
    fit(trainer, module, DataLoader(_data(), batch_size=4), tmp_path / "run")
    exported = load_checkpoint(tmp_path / "run" / "model")
    assert exported.gene_panel == ["A", "B"]
    for name, value in net.state_dict().items():
        torch.testing.assert_close(exported.state_dict[name], value)
    head = load_checkpoint(tmp_path / "head_only").state_dict
    assert sorted(head) == ["bias", "weight"]
    torch.testing.assert_close(head["weight"], net[3].weight)


class _Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt  # what a kill looks like from inside the loop


def test_killed_run_leaves_usable_model_and_resumes(tmp_path: Path) -> None:
    # The optimiser settings of _train: a resume must repeat them (msfm.engine.trainer.check_resume).
    module = MsfmLightningModule(_net(), _noisy_mse, OptimConfig(lr=1e-2, warmup_steps=2, total_steps=20))
    options = TrainerOptions(**{**QUIET, "max_steps": 10, "checkpoint_every_n_steps": 2})
    trainer = build_trainer(
        options, tmp_path, export=ExportSpec(family="tiny", config={}), callbacks=[_Crash(at_step=5)]
    )
    loader = ResumableDataLoader(_data(), batch_size=3, seed=0)
    try:
        fit(trainer, module, loader, tmp_path)
    except (KeyboardInterrupt, SystemExit):
        pass  # Lightning may turn the interrupt into a graceful shutdown or re-raise it
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert load_checkpoint(tmp_path / "model").meta["extra"]["global_step"] == 4
    _train(tmp_path, 10)
    assert load_checkpoint(tmp_path / "model").meta["extra"]["global_step"] == 10


def test_validation_and_max_epochs(tmp_path: Path) -> None:
    module = MsfmLightningModule(_net(), _noisy_mse, OptimConfig(lr=1e-2))
    options = TrainerOptions(**{**QUIET, "max_epochs": 2, "checkpoint_every_n_steps": 100})
    trainer = build_trainer(options, tmp_path)
    val = DataLoader(_data(6), batch_size=3)
    fit(trainer, module, DataLoader(_data(), batch_size=5), tmp_path, val_dataloaders=val)
    # Final save at the end of the last epoch although 8 steps < checkpoint_every_n_steps.
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    text = (tmp_path / "metrics.csv").read_text()
    assert "val/loss" in text.splitlines()[0]


def test_frozen_prefix_stays_fixed_in_training(tmp_path: Path) -> None:
    net = _net()
    before = net[0].weight.detach().clone()
    module = MsfmLightningModule(
        net, _noisy_mse, OptimConfig(lr=1e-2, frozen_prefixes=("0",), lr_multipliers={"3": 0.5})
    )
    trainer = build_trainer(TrainerOptions(**{**QUIET, "max_steps": 3}), tmp_path)
    fit(trainer, module, DataLoader(_data(), batch_size=4), tmp_path)
    torch.testing.assert_close(net[0].weight, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("strategy", "devices"),
    [("auto", 1), ("ddp", 1), ("ddp_spawn", 1), ("ddp_find_unused_parameters_true", 1), ("single_device", 1)],
)
def test_build_trainer_strategies(tmp_path: Path, strategy: str, devices: int) -> None:
    options = TrainerOptions(
        **{
            **QUIET,
            "devices": devices,
            "strategy": strategy,
            "max_steps": 7,
            "accumulate": 2,
            "gradient_clip": 0.5,
        }
    )
    trainer = build_trainer(options, tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert trainer.accumulate_grad_batches == 2
    assert trainer.gradient_clip_val == 0.5
    assert trainer.max_steps == 7
    assert Path(trainer.checkpoint_callback.dirpath) == tmp_path / "checkpoints"
    assert trainer.msfm_options == options


def test_fsdp_strategy_object_and_cpu_error(tmp_path: Path) -> None:
    strategy = _build_strategy(TrainerOptions(accelerator="gpu", strategy="fsdp"), {torch.nn.Linear})
    assert isinstance(strategy, _SafeFSDPStrategy)
    assert isinstance(strategy.checkpoint_io, SafeCheckpointIO)
    offload = _build_strategy(TrainerOptions(accelerator="gpu", strategy="fsdp_cpu_offload"), None)
    assert isinstance(offload, _SafeFSDPStrategy)
    assert offload.cpu_offload.offload_params
    for name in ("fsdp", "fsdp_cpu_offload"):
        with pytest.raises(MsfmInputError, match=r"fsdp.*needs CUDA GPUs"):
            build_trainer(TrainerOptions(**{**QUIET, "strategy": name, "max_steps": 1}), tmp_path)


def test_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="Unknown strategy"):
        TrainerOptions(strategy="dpp")
    with pytest.raises(ValidationError, match="DeepSpeed"):
        TrainerOptions(strategy="deepspeed_stage_2")
    with pytest.raises(ValidationError, match="devices"):
        TrainerOptions(devices=0)
    with pytest.raises(ValidationError):
        TrainerOptions(precision="fp8")
    with pytest.raises(MsfmInputError, match="Invalid trainer options"):
        build_trainer({"strategy": "dpp", "max_steps": 1}, tmp_path)
    with pytest.raises(MsfmInputError, match="neither max_steps nor max_epochs"):
        build_trainer(TrainerOptions(**QUIET), tmp_path)
    # Lightning's own rejections come back as MsfmInputError naming the options.
    with pytest.raises(MsfmInputError, match="Lightning rejected the trainer options"):
        build_trainer(TrainerOptions(**{**QUIET, "devices": [5], "max_steps": 1}), tmp_path)


class Evil:
    """Any non-allow-listed class: unpickling it under weights_only=True must fail."""


def test_safe_checkpoint_io_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        SafeCheckpointIO().load_checkpoint(path)
    good = tmp_path / "good.ckpt"
    SafeCheckpointIO().save_checkpoint({"w": torch.ones(2), "step": 3}, good)
    assert SafeCheckpointIO().load_checkpoint(good, weights_only=False)["step"] == 3


def test_fit_refuses_unsafe_last_ckpt(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 3, "payload": Evil()}, tmp_path / "checkpoints" / "last.ckpt")
    module = MsfmLightningModule(_net(), _noisy_mse, OptimConfig())
    trainer = build_trainer(TrainerOptions(**{**QUIET, "max_steps": 2}), tmp_path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        fit(trainer, module, DataLoader(_data(), batch_size=4), tmp_path)


class _Fail(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _train_epochs(run_dir: Path, callbacks: list[Callback]) -> torch.nn.Module:
    net = _net()
    module = MsfmLightningModule(
        net, _noisy_mse, OptimConfig(lr=1e-2, warmup_steps=2)
    )  # schedule length from
    # estimated_stepping_batches: Lightning then sets the data up before restoring the checkpoint.
    options = TrainerOptions(**{**QUIET, "max_epochs": 3, "checkpoint_every_n_steps": 1})
    trainer = build_trainer(options, run_dir, callbacks=callbacks)
    loader = ResumableDataLoader(_data(9), batch_size=3, shuffle=True, seed=5)
    if callbacks:
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(trainer, module, loader, run_dir)
    else:
        fit(trainer, module, loader, run_dir)
    return net


@pytest.mark.parametrize("crash_at", [2, 4, 7])  # mid-epoch in epochs 0, 1 and 2 (3 batches per epoch)
def test_crash_mid_epoch_with_max_epochs_resumes_exactly(tmp_path: Path, crash_at: int) -> None:
    ref = _train_epochs(tmp_path / "ref", [])
    _train_epochs(tmp_path / "run", [_Fail(crash_at)])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == crash_at
    resumed = _train_epochs(tmp_path / "run", [])
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert _metric_rows(tmp_path / "run" / "metrics.csv") == _metric_rows(tmp_path / "ref" / "metrics.csv")
