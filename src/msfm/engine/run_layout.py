"""The layout of a training run folder, shared by the trainer and the resume guard::

RUN_DIR/
  checkpoints/last.ckpt   # Lightning state for resume
  model/                  # msfm checkpoint directory (safetensors)
  config.json             # the resolved settings and their versions
  metrics.csv             # logged metrics
"""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | os.PathLike[str]

CHECKPOINTS_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
MODEL_DIR = "model"
RUN_CONFIG = "config.json"
METRICS_FILE = "metrics.csv"

__all__ = ["CHECKPOINTS_DIR", "LAST_CKPT", "METRICS_FILE", "MODEL_DIR", "RUN_CONFIG", "last_checkpoint"]


def last_checkpoint(run_dir: PathLike) -> Path | None:
    """Path of the resumable Lightning checkpoint of a run, if there is one.

    Args:
        run_dir: Run directory.

    Returns:
        ``run_dir/checkpoints/last.ckpt`` when it exists, else None.
    """
    path = Path(run_dir) / CHECKPOINTS_DIR / LAST_CKPT
    return path if path.is_file() else None
