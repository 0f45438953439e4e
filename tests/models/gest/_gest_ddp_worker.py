"""Entry point of the 2-process CPU DDP GeST test (run as a script; Lightning re-launches it for rank 1).

Usage: python _gest_ddp_worker.py RUN_DIR
"""

from __future__ import annotations

import sys

from msfm.datasets import semi_real_tissue
from msfm.engine.trainer import TrainerOptions
from msfm.models.gest.pretrain import GestTrainConfig, train


def main(run: str) -> None:
    tissue = semi_real_tissue(n_cells=300, n_domains=3, side_um=300.0, seed=2)
    config = GestTrainConfig(
        preset="gest-tiny",
        n_genes=40,
        n_metacells=12,
        n_pcs=8,
        levels=(4, 2),
        side_um=120.0,
        max_cells=32,
        batch_size=2,
        trainer=TrainerOptions(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_steps=4,
            checkpoint_every_n_steps=2,
            progress_bar=False,
            model_summary=False,
        ),
    )
    train(tissue, run, config=config)


if __name__ == "__main__":
    main(sys.argv[1])
