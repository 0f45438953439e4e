"""Two-process CPU DDP runs (gloo): training keeps ranks identical; distributed_predict merges in order."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import msfm
from msfm.engine.predict import PREDICTIONS_FILE, distributed_predict
from msfm.engine.trainer import TrainerOptions
from msfm.runtime.checkpoint import is_checkpoint_dir, load_checkpoint

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("msfm_test_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_worker(mode: str, target: Path, *, external: bool = False) -> None:
    """Run the worker on 2 CPU ranks.

    ``external=False`` lets Lightning's launcher start rank 1 (the path ``msfm train --devices 2`` takes);
    ``external=True`` starts both ranks at once with LOCAL_RANK set, as torchrun or SLURM would, which halves the
    wall time because the two imports of Lightning overlap.
    """
    src = str(Path(msfm.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        # Bind gloo to loopback: resolving the host's interfaces can stall for seconds in containers.
        "GLOO_SOCKET_IFNAME": "lo",
    }
    # Launcher variables of an outer run (e.g. a test session under torchrun) would confuse the child.
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, str(WORKER), mode, str(target)]
    if not external:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-5000:]}"


@pytest.mark.distributed
def test_ddp_training_two_ranks_end_identical(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_worker("train", run_dir)
    r0 = load_checkpoint(run_dir / "params-rank0").state_dict
    r1 = load_checkpoint(run_dir / "params-rank1").state_dict
    assert r0.keys() == r1.keys()
    for name in r0:
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0)
    # The run directory contract, written by rank 0 only.
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "metrics.csv").is_file()
    assert (run_dir / "config.json").is_file()
    assert is_checkpoint_dir(run_dir / "model")
    exported = load_checkpoint(run_dir / "model", family="tiny")
    assert exported.meta["extra"]["global_step"] == 6
    for name in r0:
        torch.testing.assert_close(exported.state_dict[name], r0[name])
    # Training moved the weights away from their seeded initial values.
    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).state_dict()
    assert not torch.allclose(init["0.weight"], r0["0.weight"])


@pytest.mark.distributed
def test_distributed_predict_two_ranks_matches_single_process(tmp_path: Path) -> None:
    worker = _load_worker()
    _run_worker("predict", tmp_path / "ddp", external=True)
    merged = np.load(tmp_path / "ddp" / PREDICTIONS_FILE)
    assert not list((tmp_path / "ddp").glob("part-rank*.npy")), (
        "per-rank parts must be cleaned up after merging"
    )

    ds = worker.RowDataset(worker.N_PREDICT)
    with torch.no_grad():
        expected = worker.predict_model()(ds.x).numpy()
    assert merged.shape == (worker.N_PREDICT, 3)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)


def test_distributed_predict_single_process(tmp_path: Path) -> None:
    worker = _load_worker()
    ds = worker.RowDataset(10)
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    opts = TrainerOptions(accelerator="cpu", devices=1, progress_bar=False)
    out = distributed_predict(worker.predict_model(), loader, tmp_path, options=opts)
    with torch.no_grad():
        expected = worker.predict_model()(ds.x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    # A function predictor with a separate model gives the same rows.
    out_fn = distributed_predict(
        lambda model, batch: model(batch) * 2, loader, tmp_path, options=opts, model=worker.predict_model(),
        overwrite=True,
    )  # fmt: skip
    np.testing.assert_allclose(out_fn, 2 * expected, rtol=1e-5, atol=1e-6)

    with pytest.raises(msfm.errors.MsfmInputError, match="already exists"):
        distributed_predict(worker.predict_model(), loader, tmp_path, options=opts)
