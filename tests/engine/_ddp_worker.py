"""Entry point for the 2-process CPU DDP tests (run as a script; Lightning re-launches it for rank 1).

Usage: python _ddp_worker.py train RUN_DIR | predict OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.objective import LossOutput
from msfm.engine.predict import distributed_predict
from msfm.engine.sampler import ResumableDataLoader
from msfm.engine.trainer import ExportSpec, TrainerOptions, build_trainer, fit
from msfm.runtime.checkpoint import save_checkpoint

N_PREDICT = 13  # odd on purpose: DistributedSampler pads one rank with a duplicate


class RowDataset(Dataset):
    """Rows of a fixed random matrix (tensor per item, so the model is called on a plain tensor batch)."""

    def __init__(self, n: int, d: int = 4) -> None:
        self.x = torch.randn(n, d, generator=torch.Generator().manual_seed(123))

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def predict_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def mse(model: torch.nn.Module, batch: list[torch.Tensor]) -> LossOutput:
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    return LossOutput(loss, {"mse": loss.detach()}, n=x.shape[0])


def train(run_dir: Path) -> None:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(24, 4, generator=g), torch.randn(24, 1, generator=g))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    module = MsfmLightningModule(net, mse, OptimConfig(lr=1e-2, warmup_steps=1, total_steps=6))
    options = TrainerOptions(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, checkpoint_every_n_steps=4,
        progress_bar=False, model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer = build_trainer(options, run_dir, export=ExportSpec(family="tiny", config={"hidden": 8}))
    fit(trainer, module, ResumableDataLoader(ds, batch_size=4, seed=1), run_dir)
    # Every rank dumps its own parameters; the test checks that DDP kept them identical.
    save_checkpoint(
        run_dir / f"params-rank{trainer.global_rank}", family="tiny", config={}, state_dict=net.state_dict()
    )


def predict(out_dir: Path) -> None:
    options = TrainerOptions(accelerator="cpu", devices=2, strategy="ddp", progress_bar=False)
    distributed_predict(
        predict_model(), DataLoader(RowDataset(N_PREDICT), batch_size=4), out_dir, options=options
    )


if __name__ == "__main__":
    # Two ranks share two cores; more threads per rank only adds contention.
    torch.set_num_threads(1)
    mode, target = sys.argv[1], Path(sys.argv[2])
    {"train": train, "predict": predict}[mode](target)
