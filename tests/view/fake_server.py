"""A small stand-in for the ``msfm view`` HTTP API (docs in /work/spec: the contract), for the browser tests.

It serves the real client files from ``msfm/view/static`` and answers every API route with synthetic data of the
contract's shape: one slide drawn with numpy (deep-zoom tiles cut with PIL), a grid of ROIs, spots with genes and a
niche column, a perturbation job that runs in a thread, and an embedding with a confidence column. The browser tests
use it so that the client is tested on its own, fast and without model weights; the real server is tested by
``tests/view/test_server_*.py`` and by the browser test that opens the real app.
"""

from __future__ import annotations

import io
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

STATIC = Path(__file__).resolve().parents[2] / "src" / "msfm" / "view" / "static"
TILE, OVERLAP, ROI = 254, 1, 256


def _slide_image(width: int = 3000, height: int = 2000) -> np.ndarray:
    """A pink 'tissue' blob with purple texture on a white background (uint8 RGB)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = ((xx - width / 2) / (width * 0.42)) ** 2 + ((yy - height / 2) / (height * 0.42)) ** 2 < 1
    texture = (np.sin(xx / 23.0) * np.cos(yy / 17.0) + 1) / 2
    img = np.full((height, width, 3), 245, np.uint8)
    img[blob, 0] = (230 - 60 * texture[blob]).astype(np.uint8)
    img[blob, 1] = (150 - 90 * texture[blob]).astype(np.uint8)
    img[blob, 2] = (200 - 20 * texture[blob]).astype(np.uint8)
    return img


class FakeData:
    """Synthetic slide, spatial and cells data in the contract's shapes."""

    def __init__(self, n_spots: int = 2500, n_cells: int = 3000, job_seconds: float = 1.0) -> None:
        rng = np.random.default_rng(0)
        self.image = _slide_image()
        self.height, self.width = self.image.shape[:2]
        self.max_level = math.ceil(math.log2(max(self.width, self.height)))
        rois = []
        for y in range(0, self.height - ROI + 1, ROI):
            for x in range(0, self.width - ROI + 1, ROI):
                if self.image[y + ROI // 2, x + ROI // 2, 1] < 200:  # tissue under the centre
                    score = float(np.exp(-(((x - 900) / 600) ** 2 + ((y - 800) / 500) ** 2)))
                    rois.append({"index": len(rois), "x": x, "y": y, "score": round(score, 4)})
        order = np.argsort([-r["score"] for r in rois])
        for rank, i in enumerate(order):
            rois[i]["rank"] = rank + 1
            rois[i]["percentile"] = round(100.0 * (1 - rank / max(len(rois) - 1, 1)), 2)
        self.rois = rois
        side = math.ceil(math.sqrt(n_spots))
        gx, gy = np.meshgrid(np.arange(side), np.arange(side))
        self.sx = (gx.ravel()[:n_spots] * 100.0).astype(np.float32)
        self.sy = (gy.ravel()[:n_spots] * 100.0).astype(np.float32)
        # "FAIL" makes the fake job fail, to test how the page shows a failed job; "NOOP" (pushed down) makes it a
        # no-op edit, as a requantized edit too small to move any spot to another meta-cell.
        self.genes = [f"GENE{i}" for i in range(30)] + ["EPCAM", "KRT5", "CD3E", "FAIL", "NOOP"]
        self.expr = rng.gamma(2.0, 1.0, (n_spots, len(self.genes))).astype(np.float32)
        self.niche = (self.sx // (side * 100 / 3)).astype(int) + 3 * (self.sy > side * 50).astype(int)
        centres = rng.normal(0, 6, (6, 2))
        lab = rng.integers(0, 6, n_cells)
        self.cx = (centres[lab, 0] + rng.normal(0, 1, n_cells)).astype(np.float32)
        self.cy = (centres[lab, 1] + rng.normal(0, 1, n_cells)).astype(np.float32)
        self.cell_type = np.array([f"type {k}" for k in lab])
        self.conf = rng.uniform(0.4, 1.0, n_cells).astype(np.float32)
        self.job_seconds = job_seconds
        self.jobs: dict[str, dict[str, Any]] = {}

    def tile(self, level: int, col: int, row: int) -> bytes:
        from PIL import Image

        scale = 2 ** (self.max_level - level)
        w = max(1, math.ceil(self.width / scale))
        h = max(1, math.ceil(self.height / scale))
        x0 = max(0, col * TILE - OVERLAP)
        y0 = max(0, row * TILE - OVERLAP)
        x1 = min(w, (col + 1) * TILE + OVERLAP)
        y1 = min(h, (row + 1) * TILE + OVERLAP)
        crop = self.image[y0 * scale : y1 * scale : scale, x0 * scale : x1 * scale : scale]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, "JPEG", quality=80)
        return buf.getvalue()

    def run_job(self, jid: str, body: dict[str, Any]) -> None:
        job = self.jobs[jid]
        job["state"] = "running"
        for k in range(5):
            if job.get("cancel"):
                job["state"] = "cancelled"
                return
            job["progress"] = k / 5
            job["message"] = f"step {k + 1} of 5"
            time.sleep(self.job_seconds / 5)
        up = body.get("up") or []
        if "FAIL" in up:
            job.update(state="failed", error="gene FAIL made the fake model fail (as a real error would)")
            return
        gene = (up or body.get("down"))[0]
        g = self.genes.index(gene)
        control = self.expr[:, g]
        perturbed = control.copy()
        edited = np.asarray(body.get("cells") or [], dtype=int)
        sign = 1.0 if up else -1.0
        # "NOOP" among the down genes stands for an edit too small to change the model's input (requantize).
        no_op = "NOOP" in (body.get("down") or [])
        if not no_op:
            perturbed[edited] = control[edited] + sign * 4.0 * float(body.get("amount", 0.95))
        job.update(
            state="done",
            progress=1.0,
            message="done",
            result={
                "control": control.round(4).tolist(),
                "perturbed": perturbed.round(4).tolist(),
                "diff": (perturbed - control).round(4).tolist(),
                "gene": gene,
                "edited": edited.tolist(),
                "targets": edited.tolist(),
                "summary": {"n_edited": int(edited.size), "no_op": no_op},
            },
        )


def create_fake_app(token: str | None = None, **kwargs: Any) -> Any:
    """A Starlette app answering the viewer's API contract from :class:`FakeData`."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    data = FakeData(**kwargs)

    def err(msg: str, status: int = 404) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    async def index(request: Any) -> Any:
        return FileResponse(STATIC / "index.html")

    async def api_index(request: Any) -> Any:
        return JSONResponse(
            {
                "slides": [
                    {
                        "id": "s1",
                        "name": "synthetic slide",
                        "width": data.width,
                        "height": data.height,
                        "mpp": 0.5,
                        "has_heatmap": True,
                        "cascade": {"stage1": "tumour", "stage2": "subtype B"},
                    }
                ],
                "spatial": [
                    {"id": "sp1", "name": "synthetic spots", "n_obs": len(data.sx), "has_model": True}
                ],
                "cells": [
                    {
                        "id": "c1",
                        "name": "synthetic cells",
                        "n_obs": len(data.cx),
                        "bases": ["X_umap"],
                        "columns": [
                            {"name": "cell_type", "kind": "categorical"},
                            {"name": "cell_type_confidence", "kind": "numeric"},
                        ],
                    }
                ],
            }
        )

    async def dzi(request: Any) -> Any:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" Overlap="{OVERLAP}" '
            f'TileSize="{TILE}"><Size Width="{data.width}" Height="{data.height}"/></Image>'
        )
        return Response(xml, media_type="application/xml")

    async def tile(request: Any) -> Any:
        p = request.path_params
        col, row = p["name"].removesuffix(".jpeg").split("_")
        return Response(data.tile(int(p["level"]), int(col), int(row)), media_type="image/jpeg")

    async def rois(request: Any) -> Any:
        scores = [r["score"] for r in data.rois]
        return JSONResponse(
            {
                "roi_size": ROI,
                "rois": data.rois,
                "class_shown": "tumour",
                "predicted": "tumour",
                "probabilities": {"tumour": 0.8, "normal": 0.2},
                "score_range": [min(scores), max(scores)],
            }
        )

    async def roi(request: Any) -> Any:
        i = int(request.path_params["index"])
        if not 0 <= i < len(data.rois):
            return err(f"no ROI {i}")
        yy, xx = np.mgrid[0:16, 0:16]
        maps = {
            s: (np.sin(xx / (k + 2)) * np.cos(yy / (k + 3))).round(3).tolist()
            for k, s in enumerate(["20x", "10x", "5x"])
        }
        maps["fused"] = None
        return JSONResponse(
            {
                "index": i,
                "score": data.rois[i]["score"],
                "maps": maps,
                "probabilities": {"tumour": 0.8, "normal": 0.2},
            }
        )

    async def maps_png(request: Any) -> Any:
        return err("no maps figure for this ROI")

    async def spatial(request: Any) -> Any:
        return JSONResponse(
            {
                "x": data.sx.tolist(),
                "y": data.sy.tolist(),
                "genes": data.genes,
                "obs": [
                    {"name": "niche", "kind": "categorical"},
                    {"name": "total_counts", "kind": "numeric"},
                ],
                "bounds": [
                    float(data.sx.min()),
                    float(data.sy.min()),
                    float(data.sx.max()),
                    float(data.sy.max()),
                ],
            }
        )

    async def spatial_color(request: Any) -> Any:
        key = request.query_params.get("key", "")
        if key == "niche":
            cats = [f"niche {k}" for k in range(6)]
            return JSONResponse(
                {"values": [cats[k] for k in data.niche], "kind": "categorical", "categories": cats}
            )
        if key == "total_counts":
            return JSONResponse({"values": data.expr.sum(1).round(3).tolist(), "kind": "numeric"})
        if key in data.genes:
            return JSONResponse(
                {"values": data.expr[:, data.genes.index(key)].round(3).tolist(), "kind": "numeric"}
            )
        return err(f"unknown key {key!r}: expected a gene or an obs column")

    async def perturb(request: Any) -> Any:
        body = await request.json()
        jid = uuid.uuid4().hex[:12]
        data.jobs[jid] = {"state": "queued", "progress": 0.0, "message": "queued"}
        threading.Thread(target=data.run_job, args=(jid, body), daemon=True).start()
        return JSONResponse({"job": jid})

    async def job(request: Any) -> Any:
        j = data.jobs.get(request.path_params["job"])
        if j is None:
            return err("no such job")
        if request.method == "DELETE":
            j["cancel"] = True
        return JSONResponse({k: v for k, v in j.items() if k != "cancel"})

    async def result(request: Any) -> Any:
        return Response(b"fake h5ad", media_type="application/octet-stream")

    async def cells(request: Any) -> Any:
        return JSONResponse(
            {"x": data.cx.tolist(), "y": data.cy.tolist(), "columns": ["cell_type", "cell_type_confidence"]}
        )

    async def cells_color(request: Any) -> Any:
        key = request.query_params.get("key", "")
        if key == "cell_type":
            cats = sorted(set(data.cell_type.tolist()))
            return JSONResponse(
                {"values": data.cell_type.tolist(), "kind": "categorical", "categories": cats}
            )
        if key == "cell_type_confidence":
            return JSONResponse({"values": data.conf.round(4).tolist(), "kind": "numeric"})
        return err(f"unknown column {key!r}")

    async def cells_obs(request: Any) -> Any:
        i = int(request.path_params["i"])
        return JSONResponse(
            {"cell_type": str(data.cell_type[i]), "cell_type_confidence": round(float(data.conf[i]), 4)}
        )

    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC)),
        Route("/api/index", api_index),
        Route("/api/slides/{sid}/dzi", dzi),
        Route("/api/slides/{sid}/tiles/{level:int}/{name}", tile),
        Route("/api/slides/{sid}/rois", rois),
        Route("/api/slides/{sid}/rois/{index:int}", roi),
        Route("/api/slides/{sid}/rois/{index:int}/maps.png", maps_png),
        Route("/api/spatial/{sid}", spatial),
        Route("/api/spatial/{sid}/color", spatial_color),
        Route("/api/spatial/{sid}/perturb", perturb, methods=["POST"]),
        Route("/api/jobs/{job}", job, methods=["GET", "DELETE"]),
        Route("/api/jobs/{job}/result.h5ad", result),
        Route("/api/cells/{cid}", cells),
        Route("/api/cells/{cid}/color", cells_color),
        Route("/api/cells/{cid}/obs/{i:int}", cells_obs),
    ]
    app = Starlette(routes=routes)
    if token:
        from starlette.middleware.base import BaseHTTPMiddleware

        async def check(request: Any, call_next: Any) -> Any:
            # As the real server: the query token, or the cookie a tokened request received.
            if token not in (request.query_params.get("token"), request.cookies.get("msfm_view_token")):
                return err("token required", 401)
            response = await call_next(request)
            response.set_cookie("msfm_view_token", token, httponly=True, samesite="strict")
            return response

        app.add_middleware(BaseHTTPMiddleware, dispatch=check)
    return app
