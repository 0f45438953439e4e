"""``msfm view`` jobs: the runner (queue, cancel, failures leave nothing) and a real GeST perturbation job."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from msfm.view.jobs import JobRunner

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def test_cancel_a_queued_job_and_a_running_one_between_stages(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")
    gate = threading.Event()

    def slow(job):
        job.stage(0.1, "waiting")
        gate.wait(10)
        (job.folder / "partial.h5ad").write_text("half")
        job.stage(0.5, "second stage")  # cancellation lands here
        return "never"

    first = runner.submit("slow", slow)
    queued = runner.submit("slow", slow)
    while first.state != "running":
        time.sleep(0.01)
    assert runner.cancel(queued.id).state == "cancelled"
    runner.cancel(first.id)
    gate.set()
    assert runner.wait(first.id, 10).state == "cancelled"
    assert first.result is None
    assert not first.folder.exists()  # nothing half-written is left
    assert runner.wait(queued.id).state == "cancelled"
    assert not queued.folder.exists()  # never started
    assert runner.cancel("nope") is None
    runner.close()


def test_a_failing_job_reports_its_error_and_leaves_no_file(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "jobs")

    def bad(job):
        (job.folder / "result.h5ad").write_text("half")
        raise ValueError("boom: received x, expected y")

    job = runner.wait(runner.submit("bad", bad).id)
    assert job.state == "failed"
    assert job.error == "ValueError: boom: received x, expected y"
    assert job.as_dict()["error"] == job.error
    assert not job.folder.exists()
    ok = runner.wait(runner.submit("ok", lambda job: 42).id)  # the worker survives a failure
    assert ok.state == "done"
    assert ok.result == 42
    runner.close()


@pytest.fixture(scope="module")
def spatial_app(tmp_path_factory: pytest.TempPathFactory):
    import msfm
    from msfm.datasets.spatial import scc_st
    from msfm.engine.trainer import TrainerOptions
    from msfm.view import create_app

    root = tmp_path_factory.mktemp("view_gest")
    adata = scc_st()
    adata.write_h5ad(root / "scc.h5ad")
    trainer = TrainerOptions(max_steps=30, progress_bar=False, model_summary=False, accelerator="cpu")
    run = msfm.gest.train(
        adata,
        root / "run",
        config=msfm.gest.GestTrainConfig(
            preset="gest-tiny",
            n_genes=200,
            n_metacells=32,
            n_pcs=10,
            side_um=400.0,
            max_cells=64,
            batch_size=4,
            pre_normalized=True,
            trainer=trainer,
        ),
    )
    app = create_app([root / "scc.h5ad"], checkpoint=run.checkpoint, jobs_root=root / "jobs", device="cpu")
    return TestClient(app), adata


def _wait(client: TestClient, jid: str, timeout: float = 120) -> dict:
    end = time.time() + timeout
    while True:
        j = client.get(f"/api/jobs/{jid}").json()
        if j["state"] not in ("queued", "running") or time.time() > end:
            return j
        time.sleep(0.1)


def test_perturbation_job_runs_and_its_h5ad_downloads(spatial_app, tmp_path: Path) -> None:
    import anndata

    client, adata = spatial_app
    (entry,) = client.get("/api/index").json()["spatial"]
    assert entry["has_model"] is True
    assert entry["n_obs"] == adata.n_obs
    sid = entry["id"]
    d = client.get(f"/api/spatial/{sid}").json()
    x, y = np.asarray(d["x"]), np.asarray(d["y"])
    cx, cy = float(np.median(x)), float(np.median(y))
    genes = list(
        client.app.state.viewer.model(
            next(iter(client.app.state.viewer.sources.spatial.values())).checkpoint
        ).vocab.genes
    )
    up, down = genes[:2], genes[2]
    body = {"box": [cx - 150, cy - 150, cx + 150, cy + 150], "up": up, "down": [down]}
    r = client.post(
        f"/api/spatial/{sid}/perturb", json={**body, "amount": 0.99, "mode": "continuous", "ring_um": 100}
    )
    assert r.status_code == 202
    job = _wait(client, r.json()["job"])
    assert job["state"] == "done", job
    assert job["progress"] == 1.0
    res = job["result"]
    assert res["gene"] == up[0]
    assert len(res["control"]) == len(res["perturbed"]) == len(res["diff"]) == adata.n_obs
    assert res["edited"]
    assert res["targets"]
    assert not set(res["edited"]) & set(res["targets"])
    inside = (x >= cx - 150) & (x <= cx + 150) & (y >= cy - 150) & (y <= cy + 150)
    assert set(res["edited"]) == set(np.flatnonzero(inside).tolist())
    assert res["summary"]["n_region_cells"] == len(res["edited"])
    edited = np.asarray(res["edited"])
    assert np.all(
        np.asarray(res["perturbed"])[edited] >= np.asarray(res["control"])[edited] - 1e-3
    )  # pushed up
    other = client.get(f"/api/jobs/{job['job']}", params={"gene": down}).json()["result"]
    assert other["gene"] == down
    assert client.get(f"/api/jobs/{job['job']}", params={"gene": "NOPE"}).status_code == 404
    dl = client.get(f"/api/jobs/{job['job']}/result.h5ad")
    assert dl.status_code == 200
    (tmp_path / "r.h5ad").write_bytes(dl.content)
    got = anndata.read_h5ad(tmp_path / "r.h5ad")
    assert set(got.layers) >= {"control", "perturbed"}
    assert got.n_obs == len(res["edited"]) + len(res["targets"])


def test_a_failed_perturbation_reports_the_error_and_leaves_no_file(spatial_app) -> None:
    client, _ = spatial_app
    sid = client.get("/api/index").json()["spatial"][0]["id"]
    r = client.post(f"/api/spatial/{sid}/perturb", json={"cells": [0, 1, 2], "up": ["NOTAGENE"]})
    job = _wait(client, r.json()["job"])
    assert job["state"] == "failed"
    assert "NOTAGENE" in job["error"]
    assert "result" not in job
    assert client.get(f"/api/jobs/{job['job']}/result.h5ad").status_code == 404
    runner = client.app.state.viewer.jobs
    assert not (runner.root / job["job"]).exists()
    bad = client.post(
        f"/api/spatial/{sid}/perturb", json={"cells": [0], "box": [0, 0, 1, 1], "up": ["KRT14"]}
    )
    assert bad.status_code == 400
    assert "exactly one region" in bad.json()["error"]
    assert (
        client.post(f"/api/spatial/{sid}/perturb", json={"cells": [10**6], "up": ["KRT14"]}).status_code
        == 400
    )
    gone = client.delete("/api/jobs/doesnotexist")
    assert gone.status_code == 404
