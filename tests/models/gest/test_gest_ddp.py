"""GeST training on 2 CPU processes (DDP, gloo): each rank draws its own windows; the export loads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msfm
from msfm.models.gest.checkpoint import load
from msfm.models.gest.pretrain import WindowStream

WORKER = Path(__file__).with_name("_gest_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_training_runs_and_exports(tmp_path: Path) -> None:
    src = str(Path(msfm.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK"):
        env.pop(key, None)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(run)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    loaded = load(run / "model", device="cpu")
    assert loaded.meta["extra"]["global_step"] == 4
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_stream_shards_windows_by_rank() -> None:
    import numpy as np

    from msfm.tokenizers.spatial import WindowSampler

    rng = np.random.default_rng(0)
    xy = rng.random((200, 2)) * 300
    sampler = WindowSampler(xy, side_um=100.0, max_cells=16, seed=0)
    stream = WindowStream(xy, rng.integers(0, 5, 200), sampler, batch_size=3)
    r0, r1 = stream.batch(0, rank=0, world=2), stream.batch(0, rank=1, world=2)
    single = [stream.batch(m) for m in range(2)]
    # Rank r of W takes micro-batch m*W + r of the single-process stream: together they cover it exactly.
    assert torch.equal(r0["tokens"], single[0]["tokens"])
    assert torch.equal(r1["tokens"], single[1]["tokens"])
