"""Time the `msfm view` server on a demo folder: tiles (cold and cached), ROI requests, spatial colouring and GeST
perturbation jobs. Requests go through Starlette's test client, so the numbers leave out the network.

Usage: .venv/bin/python scripts/bench_view.py demo_out
Numbers go into docs/benchmarks.md ("Viewer") with the machine they were measured on.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import numpy as np
from starlette.testclient import TestClient

from msfm.runtime.precision import cpu_capability
from msfm.view import create_app


def _ms(call, n: int = 1) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _slides(client: TestClient, index: dict) -> None:
    s = next((s for s in index["slides"] if s["has_heatmap"]), None)
    if s is None:
        return
    sid, top = s["id"], int(np.ceil(np.log2(max(s["width"], s["height"]))))
    client.get(f"/api/slides/{sid}/dzi")
    cols, rows = int(np.ceil(s["width"] / 254)), int(np.ceil(s["height"] / 254))
    urls = [f"/api/slides/{sid}/tiles/{top}/{i}_{j}.jpeg" for i in range(cols) for j in range(rows)][:60]
    cold = [_ms(lambda u=u: client.get(u))[0] for u in urls]
    warm = [_ms(lambda u=u: client.get(u))[0] for u in urls]
    print(
        f"slide {s['name']} {s['width']}x{s['height']}: tile cold median {statistics.median(cold):.1f} ms "
        f"(90th percentile {np.percentile(cold, 90):.1f}, n={len(cold)}), cached median {statistics.median(warm):.1f} ms"
    )
    first = _ms(lambda: client.get(f"/api/slides/{sid}/rois"))[0]
    again = statistics.median(_ms(lambda: client.get(f"/api/slides/{sid}/rois"), 10))
    roi = statistics.median(_ms(lambda: client.get(f"/api/slides/{sid}/rois/0"), 10))
    print(f"  ROI list first {first:.1f} ms, then {again:.1f} ms; one ROI's maps {roi:.1f} ms")


def _spatial(client: TestClient, index: dict) -> None:
    sp = next((s for s in index["spatial"] if s["has_model"]), None)
    if sp is None:
        return
    sid = sp["id"]
    first = _ms(lambda: client.get(f"/api/spatial/{sid}"))[0]
    data = client.get(f"/api/spatial/{sid}").json()
    colour = statistics.median(
        _ms(lambda: client.get(f"/api/spatial/{sid}/color", params={"key": data["genes"][0]}), 5)
    )
    print(
        f"spatial {sp['name']} ({sp['n_obs']} spots): data first {first:.0f} ms, colour by a gene {colour:.1f} ms"
    )
    x, y = np.asarray(data["x"]), np.asarray(data["y"])
    cx, cy = float(np.median(x)), float(np.median(y))
    for k in range(3):
        body = {"box": [cx - 150, cy - 150, cx + 150, cy + 150], "up": ["KRT14", "KRT5"], "down": ["COL1A1"],
                "amount": 0.95, "mode": "continuous", "ring_um": 150}  # fmt: skip
        t = time.perf_counter()
        job = client.post(f"/api/spatial/{sid}/perturb", json=body).json()["job"]
        while (j := client.get(f"/api/jobs/{job}").json())["state"] in ("queued", "running"):
            time.sleep(0.02)
        note = " (first: includes loading the checkpoint)" if k == 0 else ""
        print(f"  perturbation job {j['state']} in {time.perf_counter() - t:.2f} s{note}")


def main(paths: list[str]) -> None:
    warnings.simplefilter("ignore")
    print(f"machine: {cpu_capability().line()}")
    t = time.perf_counter()
    client = TestClient(create_app(paths, device="cpu"))
    index = client.get("/api/index").json()
    print(
        f"start-up and index {time.perf_counter() - t:.2f} s: "
        + ", ".join(f"{k} {len(v)}" for k, v in index.items())
    )
    _slides(client, index)
    _spatial(client, index)


if __name__ == "__main__":
    main(sys.argv[1:] or ["demo_out"])
