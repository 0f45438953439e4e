"""The Starlette application of ``msfm view``: the HTTP API of docs/viewer.md over a :class:`Sources` allow-list.

Every data route addresses an entry by the id discovery gave it; unknown ids are 404 and no request path is ever
joined onto the disk except under the package's own ``static/`` folder, after a containment check. Handlers are
plain functions (Starlette runs them in its thread pool, so slide reads do not block the event loop); GeST
perturbations run on the :class:`~msfm.view.jobs.JobRunner` thread.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError
from msfm.view.jobs import Job, JobRunner
from msfm.view.sources import CellsEntry, Sources, SpatialEntry
from msfm.view.tiles import TileCache

logger = logging.getLogger(__name__)

__all__ = ["STATIC_DIR", "build_app"]

STATIC_DIR = Path(__file__).parent / "static"
_NO_CLIENT = (
    "<!doctype html><meta charset='utf-8'><title>msfm view</title><p>The msfm view page is missing from this "
    "installation (msfm/view/static/index.html). The API answers under <code>/api/index</code>.</p>"
)


# -------------------------------------------------------------------------------------------------- helpers
class ApiError(Exception):
    """An error answered as ``{"error": text}`` with an HTTP status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _round4(values: Any) -> list[Any]:
    """float list with 4 significant digits (what a screen shows); NaN/inf become None (strict JSON)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(a)
    out = np.where(finite, a, 0.0)
    nz = finite & (out != 0)
    mag = np.zeros_like(out)
    mag[nz] = np.floor(np.log10(np.abs(out[nz])))
    small = nz & (mag <= 3)
    big = nz & (mag > 3)
    # Multiply/divide by exact powers of ten so the printed decimals are short (0.1235, not 0.12350000000000001).
    s = 10.0 ** (3 - mag[small])
    out[small] = np.round(out[small] * s) / s
    b = 10.0 ** (mag[big] - 3)
    out[big] = np.round(out[big] / b) * b
    lst: list[Any] = out.tolist()
    if not finite.all():
        for i in np.flatnonzero(~finite):
            lst[i] = None
    return lst


def _plain(value: Any) -> Any:
    """A numpy/pandas scalar as a JSON value (NaN -> None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _json(payload: Any, status: int = 200) -> Any:
    from starlette.responses import Response

    from msfm.runtime.jsonable import to_jsonable

    body = json.dumps(to_jsonable(payload), allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


def _unknown(kind: str, given: str, known: list[str], *, entry: bool = True) -> ApiError:
    hint = difflib.get_close_matches(given, known, n=3)
    return ApiError(
        404,
        f"no {kind} {given!r} here (received {given!r}; expected one of {known[:20]}"
        f"{' ...' if len(known) > 20 else ''}){f'; did you mean {hint}?' if hint else ''}."
        + (" The ids are listed by /api/index; only what was found at start-up is served." if entry else ""),
    )


def _column_kind(series: Any) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return "categorical"
    return "numeric"


def _column_payload(series: Any, keep: np.ndarray | None) -> dict[str, Any]:
    """``{"values", "kind", "categories"?}`` of an obs column; categories are sent as codes (-1 = missing)."""
    import pandas as pd

    kind = _column_kind(series)
    if kind == "numeric":
        v = np.asarray(series, dtype=np.float64)
        return {"values": _round4(v if keep is None else v[keep]), "kind": kind}
    if isinstance(series.dtype, pd.CategoricalDtype):
        cat = series.cat.remove_unused_categories().array
    else:
        cat = pd.Categorical(series.astype(str).where(series.notna(), None))
    codes = np.asarray(cat.codes, dtype=np.int64)
    codes = codes if keep is None else codes[keep]
    return {"values": codes.tolist(), "kind": kind, "categories": [str(c) for c in cat.categories]}


def _keep(n: int, max_points: str | None) -> np.ndarray | None:
    """Indices of an even random subsample when ``?max_points=`` asks for fewer points than there are."""
    if max_points is None:
        return None
    try:
        m = int(max_points)
    except ValueError as err:
        raise ApiError(400, f"max_points must be a positive integer; received {max_points!r}.") from err
    if m < 1:
        raise ApiError(400, f"max_points must be a positive integer; received {max_points!r}.")
    if n <= m:
        return None
    return np.sort(np.random.default_rng(0).choice(n, size=m, replace=False))


def _dense_column(x: Any, j: int) -> np.ndarray:
    col = x[:, j]
    if hasattr(col, "toarray"):
        col = col.toarray()
    return np.asarray(col, dtype=np.float64).ravel()


def _looks_normalised(adata: Any) -> bool:
    """True when ``X`` holds non-integer values (log1p data) and no ``counts`` layer exists."""
    if "counts" in adata.layers:
        return False
    x = adata.X[: min(adata.n_obs, 200)]
    x = x.data if hasattr(x, "data") else np.asarray(x)
    return bool(np.any(np.abs(x - np.round(x)) > 1e-6))


# ----------------------------------------------------------------------------------------------------- app
class ViewerState:
    """What the routes share: the sources, the tile cache, the job runner, loaded GeST models."""

    def __init__(self, sources: Sources, *, jobs_root: Path | None = None, device: str = "auto") -> None:
        self.sources = sources
        self.tiles = TileCache(512)
        self.jobs = JobRunner(jobs_root)
        self.device = device
        self._rois: dict[str, Any] = {}
        self._models: dict[Path, Any] = {}
        self._lock = threading.Lock()

    # entries -------------------------------------------------------------------------------------------
    def slide(self, sid: str) -> Any:
        e = self.sources.slides.get(sid)
        if e is None:
            raise _unknown("slide", sid, list(self.sources.slides))
        return e

    def spatial(self, sid: str) -> SpatialEntry:
        e = self.sources.spatial.get(sid)
        if e is None:
            raise _unknown("spatial data set", sid, list(self.sources.spatial))
        return e

    def cells(self, cid: str) -> CellsEntry:
        e = self.sources.cells.get(cid)
        if e is None:
            raise _unknown("cell data set", cid, list(self.sources.cells))
        return e

    def rois(self, sid: str) -> tuple[Any, dict[str, Any]]:
        """``(rois AnnData, summary)`` of a slide's heatmap folder (read once)."""
        entry = self.slide(sid)
        if entry.heatmap is None:
            raise ApiError(
                404, f"slide {entry.name!r} has no ROAM heatmap (no rois.h5ad); run msfm roam heatmap."
            )
        with self._lock:
            if sid not in self._rois:
                import anndata

                summary = json.loads((entry.heatmap / "summary.json").read_text(encoding="utf-8"))
                self._rois[sid] = (anndata.read_h5ad(entry.heatmap / "rois.h5ad"), summary)
            return self._rois[sid]

    def model(self, checkpoint: Path) -> Any:
        """The loaded GeST checkpoint (loaded once, shared by jobs; only the job thread uses it)."""
        with self._lock:
            if checkpoint not in self._models:
                import msfm

                self._models[checkpoint] = msfm.gest.load(checkpoint, device=self.device)
            return self._models[checkpoint]


def _index(st: ViewerState) -> dict[str, Any]:
    slides = []
    for e in st.sources.slides.values():
        item: dict[str, Any] = {"id": e.id, "name": e.name, "has_heatmap": e.heatmap is not None}
        try:
            s = e.tiles.slide
            item.update(width=int(s.dimensions[0]), height=int(s.dimensions[1]), mpp=s.mpp, backend=s.backend)
        except MsfmInputError as err:
            item.update(width=None, height=None, mpp=None, error=str(err))
        item["cascade"] = e.cascade["calls"] if e.cascade else None
        item["cascade_confidence"] = e.cascade["confidence"] if e.cascade else None
        slides.append(item)
    spatial = [
        {"id": e.id, "name": e.name, "n_obs": e.n_obs, "has_model": e.checkpoint is not None}
        for e in st.sources.spatial.values()
    ]
    cells = []
    for c in st.sources.cells.values():
        obs = c.adata.obs
        cols = [{"name": str(k), "kind": _column_kind(obs[k])} for k in obs.columns]
        cells.append({"id": c.id, "name": c.name, "n_obs": c.n_obs, "bases": c.bases, "columns": cols})
    return {"slides": slides, "spatial": spatial, "cells": cells}


def _perturb_job(st: ViewerState, entry: SpatialEntry, body: dict[str, Any]) -> Any:
    """Validate a perturbation request and return the job function (validation errors are 400 at once)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object {cells|box, up, down, amount, mode, ring_um}.")
    unknown = sorted(set(body) - {"cells", "box", "up", "down", "amount", "mode", "ring_um", "how", "seed"})
    if unknown:
        raise ApiError(400, f"unknown fields {unknown}; expected cells|box, up, down, amount, mode, ring_um.")
    if entry.checkpoint is None:
        raise ApiError(
            409,
            f"spatial data {entry.name!r} has no GeST checkpoint; restart msfm view with --checkpoint RUN/model.",
        )
    if ("cells" in body) == ("box" in body):
        raise ApiError(
            400, "give exactly one region: 'cells' (a list of spot indices) or 'box' [x0, y0, x1, y1]."
        )
    up = body.get("up") or []
    down = body.get("down") or []
    if (
        not isinstance(up, list)
        or not isinstance(down, list)
        or not all(isinstance(g, str) for g in up + down)
    ):
        raise ApiError(400, "'up' and 'down' must be lists of gene names.")
    if not up and not down:
        raise ApiError(400, "nothing to perturb: give at least one gene in 'up' or 'down'.")
    mode = body.get("mode", "requantize")
    if mode not in ("requantize", "continuous"):
        raise ApiError(400, f"mode must be 'requantize' or 'continuous'; received {mode!r}.")
    how = body.get("how", "set_quantile")
    try:
        amount = None if body.get("amount") is None else float(body["amount"])
        ring = None if body.get("ring_um") is None else float(body["ring_um"])
        seed = int(body.get("seed", 0))
        region: dict[str, Any]
        if "box" in body:
            box = [float(v) for v in body["box"]]
            if len(box) != 4:
                raise ValueError("box")
            region = {"region_box": tuple(box)}
        else:
            cells = np.asarray(body["cells"], dtype=np.int64).ravel()
            if cells.size == 0 or cells.min() < 0 or cells.max() >= entry.n_obs:
                raise ApiError(
                    400, f"'cells' must be spot indices in 0..{entry.n_obs - 1}; received {cells.size}."
                )
            region = {"region_cells": np.unique(cells)}
    except (TypeError, ValueError) as err:
        raise ApiError(
            400, f"bad number in the request ({err}); box is [x0, y0, x1, y1], amount and ring_um numbers."
        ) from err

    def run(job: Job) -> dict[str, Any]:
        from msfm.runtime.h5ad import write_h5ad_atomic

        job.stage(0.05, "reading the data")
        adata = entry.adata
        job.stage(0.15, "loading the GeST checkpoint")
        loaded = st.model(entry.checkpoint)  # type: ignore[arg-type]
        job.stage(0.3, "generating control and perturbed spots (cannot be interrupted inside this stage)")
        import msfm

        data = adata
        if not adata.obs_names.is_unique:  # results are matched back by name
            data = adata.copy()
            data.obs_names = [str(i) for i in range(adata.n_obs)]
        res = msfm.gest.perturb(
            data,
            loaded,
            genes_up=up,
            genes_down=down,
            how=how,
            amount=amount,
            ring_um=ring,
            perturb_mode=mode,
            seed=seed,
            progress=False,
            pre_normalized=_looks_normalised(adata),
            **region,
        )
        job.stage(0.9, "writing result.h5ad")
        path = write_h5ad_atomic(res.adata, job.folder / "result.h5ad")
        pos = data.obs_names.get_indexer(res.adata.obs_names)
        role = res.adata.obs["gest_role"].astype(str).to_numpy()
        return {
            "entry": entry.id,
            "path": path,
            "adata": res.adata,
            "rows": pos,
            "edited": pos[role == "region"],
            "targets": pos[role == "target"],
            "summary": {**res.summary, "params": res.params},
            "genes": list(up) + list(down),
        }

    return run


def _job_payload(st: ViewerState, job: Job, gene: str | None) -> dict[str, Any]:
    out = job.as_dict()
    r = job.result
    if job.state != "done" or not isinstance(r, dict):
        return out
    res = r["adata"]
    gene = gene or r["genes"][0]
    names = list(res.var_names)
    if gene not in names:
        raise _unknown("gene", gene, names, entry=False)
    j = names.index(gene)
    entry = st.spatial(r["entry"])
    adata = entry.adata
    # Spots outside the result keep their measured value (in model space) so the three panels share a scale.
    base = np.full(adata.n_obs, np.nan)
    if gene in adata.var_names:
        col = _dense_column(adata.X, int(adata.var_names.get_loc(gene)))
        if not _looks_normalised(adata):
            from msfm.data.normalize import log1p_cp10k

            totals = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
            col = np.asarray(log1p_cp10k(col[:, None], totals), dtype=np.float64).ravel()
        base = col
    control, perturbed = base.copy(), base.copy()
    control[r["rows"]] = np.asarray(res.layers["control"][:, j], dtype=np.float64)
    perturbed[r["rows"]] = np.asarray(res.layers["perturbed"][:, j], dtype=np.float64)
    out["result"] = {
        "gene": gene,
        "genes": r["genes"],
        "control": _round4(control),
        "perturbed": _round4(perturbed),
        "diff": _round4(perturbed - control),
        "edited": r["edited"].tolist(),
        "targets": r["targets"].tolist(),
        "summary": r["summary"],
        "download": f"/api/jobs/{job.id}/result.h5ad",
    }
    return out


def build_app(
    sources: Sources, *, token: str | None = None, jobs_root: Path | None = None, device: str = "auto"
) -> Any:
    """The Starlette app serving ``sources`` (see :func:`msfm.view.create_app`)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, Response
    from starlette.routing import Route

    st = ViewerState(sources, jobs_root=jobs_root, device=device)

    def index_page(request: Request) -> Any:
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})
        return HTMLResponse(_NO_CLIENT)

    def static(request: Request) -> Any:
        rel = request.path_params["path"]
        parts = rel.replace("\\", "/").split("/")
        if any(p in ("", ".", "..") or p.startswith(".") or "\x00" in p for p in parts):
            raise ApiError(404, f"no static file {rel!r}.")
        root = STATIC_DIR.resolve()
        target = (root / "/".join(parts)).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise ApiError(404, f"no static file {rel!r}.")
        return FileResponse(target, headers={"Cache-Control": "no-cache"})

    def api_index(request: Request) -> Any:
        return _json(_index(st))

    # slides ------------------------------------------------------------------------------------------------
    def dzi(request: Request) -> Any:
        e = st.slide(request.path_params["sid"])
        return Response(e.tiles.dzi(), media_type="application/xml")

    def tile(request: Request) -> Any:
        p = request.path_params
        e = st.slide(p["sid"])
        key = (e.id, int(p["level"]), int(p["col"]), int(p["row"]))
        data = st.tiles.get(key)
        if data is None:
            try:
                data = e.tiles.tile(key[1], key[2], key[3])
            except MsfmInputError as err:
                raise ApiError(404, str(err)) from err
            st.tiles.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def rois(request: Request) -> Any:
        sid = request.path_params["sid"]
        a, summary = st.rois(sid)
        obs = a.obs
        size = a.uns.get("spatial", {}).get(summary.get("slide_id", ""), {}).get("scalefactors", {})
        roi_size = int(size.get("roi_size_level0", 0)) or None
        score = np.asarray(obs["score"], dtype=np.float64)
        items = [
            {
                "index": i,
                "x": int(obs["x"].iloc[i]),
                "y": int(obs["y"].iloc[i]),
                "score": _round4([score[i]])[0],
                "percentile": _plain(obs["percentile"].iloc[i]),
                "rank": int(obs["rank"].iloc[i]),
                "has_maps": (st.slide(sid).heatmap / "roi_maps" / f"roi{i}.npz").is_file(),  # type: ignore[operator]
            }
            for i in range(a.n_obs)
        ]
        return _json(
            {
                "roi_size": roi_size,
                "rois": items,
                "class_shown": summary.get("class_shown"),
                "predicted": summary.get("predicted_class"),
                "probabilities": summary.get("probabilities"),
                "score_range": [float(score.min()), float(score.max())] if score.size else None,
                "colour_by": summary.get("colour_by"),
                "method": summary.get("method"),
            }
        )

    def _roi_index(request: Request) -> tuple[Any, int]:
        sid = request.path_params["sid"]
        a, _ = st.rois(sid)
        i = int(request.path_params["index"])
        if not 0 <= i < a.n_obs:
            raise ApiError(404, f"ROI {i} does not exist; this slide has ROIs 0..{a.n_obs - 1}.")
        return st.slide(sid), i

    def roi(request: Request) -> Any:
        e, i = _roi_index(request)
        a, summary = st.rois(e.id)
        npz = e.heatmap / "roi_maps" / f"roi{i}.npz"
        png = e.heatmap / "roi_maps" / f"roi{i}.png"
        maps: dict[str, Any] = {}
        if npz.is_file():
            with np.load(npz) as z:
                maps = {k: [_round4(row) for row in np.asarray(z[k])] for k in z.files}
        maps["fused"] = f"/api/slides/{e.id}/rois/{i}/maps.png" if png.is_file() else None
        return _json(
            {
                "index": i,
                "score": float(a.obs["score"].iloc[i]),
                "percentile": _plain(a.obs["percentile"].iloc[i]),
                "rank": int(a.obs["rank"].iloc[i]),
                "maps": maps,
                "has_maps": npz.is_file(),
                "probabilities": summary.get("probabilities"),
                "class_shown": summary.get("class_shown"),
                "method": summary.get("method"),
            }
        )

    def roi_png(request: Request) -> Any:
        e, i = _roi_index(request)
        png = e.heatmap / "roi_maps" / f"roi{i}.png"
        if not png.is_file():
            raise ApiError(
                404, f"no ROI maps figure for ROI {i} (msfm roam heatmap draws the top --roi-maps ROIs)."
            )
        return FileResponse(png, media_type="image/png")

    # spatial -----------------------------------------------------------------------------------------------
    def spatial(request: Request) -> Any:
        e = st.spatial(request.path_params["sid"])
        a = e.adata
        xy = np.asarray(a.obsm["spatial"], dtype=np.float64)[:, :2]
        keep = _keep(a.n_obs, request.query_params.get("max_points"))
        pts = xy if keep is None else xy[keep]
        out = {
            "x": _round4(pts[:, 0]),
            "y": _round4(pts[:, 1]),
            "genes": [str(g) for g in a.var_names],
            "obs": [{"name": str(k), "kind": _column_kind(a.obs[k])} for k in a.obs.columns],
            "bounds": [
                float(xy[:, 0].min()),
                float(xy[:, 1].min()),
                float(xy[:, 0].max()),
                float(xy[:, 1].max()),
            ],
            "n_obs": a.n_obs,
            "has_model": e.checkpoint is not None,
        }
        if keep is not None:
            out["index"] = keep.tolist()
        return _json(out)

    def spatial_color(request: Request) -> Any:
        e = st.spatial(request.path_params["sid"])
        a = e.adata
        key = request.query_params.get("key", "")
        keep = _keep(a.n_obs, request.query_params.get("max_points"))
        if key in a.obs.columns:
            return _json(_column_payload(a.obs[key], keep))
        if key in a.var_names:
            v = _dense_column(a.X, int(a.var_names.get_loc(key)))
            return _json({"values": _round4(v if keep is None else v[keep]), "kind": "numeric"})
        raise _unknown(
            "gene or obs column", key, [*map(str, a.obs.columns), *map(str, a.var_names)], entry=False
        )

    async def perturb(request: Request) -> Any:
        e = st.spatial(request.path_params["sid"])
        try:
            body = await request.json()
        except ValueError as err:
            raise ApiError(400, f"the body is not JSON ({err}).") from err
        fn = _perturb_job(st, e, body)
        job = st.jobs.submit("perturb", fn)
        return _json({"job": job.id, "state": job.state}, status=202)

    # jobs --------------------------------------------------------------------------------------------------
    def _job(request: Request) -> Job:
        jid = request.path_params["job"]
        job = st.jobs.get(jid)
        if job is None:
            raise ApiError(
                404, f"no job {jid!r} (jobs are kept while the server runs; the id comes from perturb)."
            )
        return job

    def job_get(request: Request) -> Any:
        return _json(_job_payload(st, _job(request), request.query_params.get("gene")))

    def job_delete(request: Request) -> Any:
        job = _job(request)
        st.jobs.cancel(job.id)
        return _json(job.as_dict())

    def job_file(request: Request) -> Any:
        job = _job(request)
        r = job.result
        if job.state != "done" or not isinstance(r, dict) or not Path(r["path"]).is_file():
            raise ApiError(
                404, f"job {job.id} has no result file (state {job.state}); wait until it is done."
            )
        return FileResponse(
            r["path"], media_type="application/x-hdf5", filename=f"perturbation-{job.id}.h5ad"
        )

    # cells -------------------------------------------------------------------------------------------------
    def cells(request: Request) -> Any:
        c = st.cells(request.path_params["cid"])
        basis = request.query_params.get("basis") or c.bases[0]
        if basis not in c.bases:
            raise _unknown("embedding", basis, c.bases, entry=False)
        a = c.adata
        emb = np.asarray(a.obsm[basis], dtype=np.float64)
        keep = _keep(a.n_obs, request.query_params.get("max_points"))
        pts = emb if keep is None else emb[keep]
        out = {
            "x": _round4(pts[:, 0]),
            "y": _round4(pts[:, 1] if pts.shape[1] > 1 else np.zeros(len(pts))),
            "basis": basis,
            "columns": [{"name": str(k), "kind": _column_kind(a.obs[k])} for k in a.obs.columns],
            "n_obs": a.n_obs,
        }
        if keep is not None:
            out["index"] = keep.tolist()
        return _json(out)

    def cells_color(request: Request) -> Any:
        c = st.cells(request.path_params["cid"])
        a = c.adata
        key = request.query_params.get("key", "")
        if key not in a.obs.columns:
            raise _unknown("obs column", key, [str(k) for k in a.obs.columns], entry=False)
        return _json(_column_payload(a.obs[key], _keep(a.n_obs, request.query_params.get("max_points"))))

    def cells_obs(request: Request) -> Any:
        c = st.cells(request.path_params["cid"])
        a = c.adata
        i = int(request.path_params["i"])
        if not 0 <= i < a.n_obs:
            raise ApiError(404, f"cell {i} does not exist; indices run 0..{a.n_obs - 1}.")
        row = a.obs.iloc[i]
        return _json({str(k): _plain(row[k]) for k in a.obs.columns})

    async def api_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, ApiError)
        return _json({"error": exc.text}, status=exc.status)

    async def http_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, HTTPException)
        text = exc.detail if exc.status_code != 404 else f"nothing at {request.url.path}; see /api/index."
        return _json({"error": text}, status=exc.status_code)

    async def input_error(request: Request, exc: Exception) -> Any:
        return _json({"error": str(exc)}, status=400)

    routes = [
        Route("/", index_page),
        Route("/static/{path:path}", static),
        Route("/api/index", api_index),
        Route("/api/slides/{sid}/dzi", dzi),
        Route("/api/slides/{sid}/tiles/{level:int}/{col:int}_{row:int}.jpeg", tile),
        Route("/api/slides/{sid}/rois", rois),
        Route("/api/slides/{sid}/rois/{index:int}", roi),
        Route("/api/slides/{sid}/rois/{index:int}/maps.png", roi_png),
        Route("/api/spatial/{sid}", spatial),
        Route("/api/spatial/{sid}/color", spatial_color),
        Route("/api/spatial/{sid}/perturb", perturb, methods=["POST"]),
        Route("/api/jobs/{job}", job_get, methods=["GET"]),
        Route("/api/jobs/{job}", job_delete, methods=["DELETE"]),
        Route("/api/jobs/{job}/result.h5ad", job_file),
        Route("/api/cells/{cid}", cells),
        Route("/api/cells/{cid}/color", cells_color),
        Route("/api/cells/{cid}/obs/{i:int}", cells_obs),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        st.jobs.close()  # removes the job folder the server owns

    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: api_error, HTTPException: http_error, MsfmInputError: input_error},
        lifespan=lifespan,
    )
    app.state.viewer = st
    if token:
        from msfm.view.security import TokenMiddleware

        app.add_middleware(TokenMiddleware, token=token)
    return app
