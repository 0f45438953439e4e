"""``msfm view`` server: discovery, deep-zoom tiles, ROIs, spatial and cell routes, path traversal, tokens."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.view._server_data import build_demo_like

from msfm.errors import MsfmInputError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_like(tmp_path_factory.mktemp("view_demo"))


@pytest.fixture(scope="module")
def client(demo: Path) -> TestClient:
    from msfm.datasets.histology import cmu_svs_path
    from msfm.view import create_app

    return TestClient(create_app([demo, cmu_svs_path()]))


@pytest.fixture(scope="module")
def index(client: TestClient) -> dict:
    r = client.get("/api/index")
    assert r.status_code == 200
    return r.json()


def _slide(index: dict, name: str) -> dict:
    return next(s for s in index["slides"] if s["name"] == name)


def test_index_discovers_slides_heatmaps_cascade_spatial_and_cells(index: dict) -> None:
    names = sorted(s["name"] for s in index["slides"])
    assert names == ["cmu_00", "cmu_restained_00", "cmu_small_region", "tia_00"]  # no figure PNG
    cmu = _slide(index, "cmu_00")
    assert cmu["has_heatmap"] is True
    assert cmu["cascade"] == {"source": "cmu"}
    assert cmu["width"] > 0
    assert cmu["height"] > 0
    assert cmu["mpp"] == pytest.approx(0.5)
    assert _slide(index, "tia_00")["has_heatmap"] is False
    assert _slide(index, "cmu_small_region")["cascade"] is None
    assert [(s["name"], s["n_obs"], s["has_model"]) for s in index["spatial"]] == [("spots", 50, False)]
    (cells,) = index["cells"]
    assert cells["n_obs"] == 300
    assert cells["bases"] == ["X_pca", "X_umap"]
    kinds = {c["name"]: c["kind"] for c in cells["columns"]}
    assert kinds == {"cell_type": "categorical", "scmulan_confidence": "numeric", "n_genes": "numeric"}
    ids = (
        [s["id"] for s in index["slides"]]
        + [s["id"] for s in index["spatial"]]
        + [c["id"] for c in index["cells"]]
    )
    assert len(set(ids)) == len(ids)
    assert all(i.replace("-", "").replace("_", "").isalnum() for i in ids)


def test_ids_are_stable_across_starts(demo: Path, index: dict) -> None:
    from msfm.view.sources import discover

    again = discover([demo])
    assert {s.id for s in again.slides.values()} <= {s["id"] for s in index["slides"]}


def test_dzi_and_tiles_are_jpeg_of_the_right_size(client: TestClient, index: dict) -> None:
    s = _slide(index, "cmu_00")
    xml = client.get(f"/api/slides/{s['id']}/dzi")
    assert xml.status_code == 200
    assert xml.headers["content-type"].startswith("application/xml")
    assert 'TileSize="254"' in xml.text
    assert 'Overlap="1"' in xml.text
    assert 'Format="jpeg"' in xml.text
    assert f'Width="{s["width"]}"' in xml.text
    assert f'Height="{s["height"]}"' in xml.text
    top = int(np.ceil(np.log2(max(s["width"], s["height"]))))
    r = client.get(f"/api/slides/{s['id']}/tiles/{top}/0_0.jpeg")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG"
    assert img.size == (255, 255)
    # The level where the whole slide fits in one tile: its size is the slide's, scaled, and it shows tissue.
    fit = top - int(np.ceil(np.log2(max(s["width"], s["height"]) / 254)))
    whole = Image.open(io.BytesIO(client.get(f"/api/slides/{s['id']}/tiles/{fit}/0_0.jpeg").content))
    scale = 2 ** (top - fit)
    assert whole.size == (int(np.ceil(s["width"] / scale)), int(np.ceil(s["height"] / scale)))
    assert np.asarray(whole).std() > 5
    one = Image.open(io.BytesIO(client.get(f"/api/slides/{s['id']}/tiles/0/0_0.jpeg").content))
    assert one.size == (1, 1)
    assert client.get(f"/api/slides/{s['id']}/tiles/{top + 1}/0_0.jpeg").status_code == 404
    assert client.get(f"/api/slides/{s['id']}/tiles/{top}/999_0.jpeg").status_code == 404


def test_tiles_cached_and_tiffslide_backend_agrees(client: TestClient, index: dict) -> None:
    from msfm.view.tiles import SlideTiles

    s = _slide(index, "tia_00")
    cache = client.app.state.viewer.tiles
    url = f"/api/slides/{s['id']}/tiles/9/1_0.jpeg"
    first = client.get(url).content
    hits = cache.hits
    assert client.get(url).content == first
    assert cache.hits == hits + 1
    entry = client.app.state.viewer.sources.slides[s["id"]]
    tiff = SlideTiles(entry.image, backend="tiffslide")
    a = np.asarray(Image.open(io.BytesIO(tiff.tile(9, 1, 0))), dtype=np.float32)
    b = np.asarray(Image.open(io.BytesIO(first)), dtype=np.float32)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 3
    tiff.close()


def test_rois_and_roi_maps(client: TestClient, index: dict) -> None:
    sid = _slide(index, "cmu_00")["id"]
    r = client.get(f"/api/slides/{sid}/rois").json()
    assert r["roi_size"] == 512
    assert r["class_shown"] == "cmu"
    assert r["predicted"] == "cmu"
    assert r["probabilities"] == {"cmu": 0.7, "tia": 0.3}
    assert r["score_range"] == [0.2, 0.5]
    assert [(i["index"], i["x"], i["y"], i["rank"]) for i in r["rois"]] == [
        (0, 0, 0, 1),
        (1, 512, 0, 2),
        (2, 0, 512, 3),
    ]
    d = client.get(f"/api/slides/{sid}/rois/0").json()
    assert d["index"] == 0
    assert d["score"] == 0.5
    assert d["probabilities"]["cmu"] == 0.7
    assert np.asarray(d["maps"]["20x"]).shape == (8, 8)
    assert np.asarray(d["maps"]["5x"]).shape == (2, 2)
    assert d["maps"]["fused"] == f"/api/slides/{sid}/rois/0/maps.png"
    png = client.get(d["maps"]["fused"])
    assert png.status_code == 200
    assert Image.open(io.BytesIO(png.content)).size == (60, 40)
    none = client.get(f"/api/slides/{sid}/rois/1").json()
    assert none["has_maps"] is False
    assert none["maps"]["fused"] is None
    assert client.get(f"/api/slides/{sid}/rois/1/maps.png").status_code == 404
    assert client.get(f"/api/slides/{sid}/rois/3").status_code == 404
    no_heat = _slide(index, "tia_00")["id"]
    assert "no ROAM heatmap" in client.get(f"/api/slides/{no_heat}/rois").json()["error"]


def test_spatial_routes(client: TestClient, index: dict) -> None:
    sid = index["spatial"][0]["id"]
    d = client.get(f"/api/spatial/{sid}").json()
    assert len(d["x"]) == len(d["y"]) == 50
    assert d["genes"] == ["G1", "G2", "G3", "G4"]
    assert d["obs"] == [{"name": "niche", "kind": "categorical"}]
    assert len(d["bounds"]) == 4
    assert all(len(f"{v:.6g}".replace(".", "").lstrip("0")) <= 4 for v in d["x"])  # 4 significant digits
    c = client.get(f"/api/spatial/{sid}/color", params={"key": "niche"}).json()
    assert c["kind"] == "categorical"
    assert c["categories"] == ["a", "b"]
    assert set(c["values"]) <= {0, 1}
    g = client.get(f"/api/spatial/{sid}/color", params={"key": "G2"}).json()
    assert g["kind"] == "numeric"
    assert len(g["values"]) == 50
    assert client.get(f"/api/spatial/{sid}/color", params={"key": "G9"}).status_code == 404
    sub = client.get(f"/api/spatial/{sid}", params={"max_points": 10}).json()
    assert len(sub["x"]) == 10
    assert len(sub["index"]) == 10
    r = client.post(f"/api/spatial/{sid}/perturb", json={"box": [0, 0, 500, 500], "up": ["G1"]})
    assert r.status_code == 409
    assert "--checkpoint" in r.json()["error"]


def test_cells_routes(client: TestClient, index: dict) -> None:
    cid = index["cells"][0]["id"]
    d = client.get(f"/api/cells/{cid}", params={"basis": "X_umap"}).json()
    assert len(d["x"]) == 300
    assert {c["name"] for c in d["columns"]} >= {"cell_type", "scmulan_confidence"}
    assert client.get(f"/api/cells/{cid}", params={"basis": "X_tsne"}).status_code == 404
    c = client.get(f"/api/cells/{cid}/color", params={"key": "cell_type"}).json()
    assert c["kind"] == "categorical"
    assert c["categories"] == ["B", "NK", "T"]
    hover = client.get(f"/api/cells/{cid}/obs/7").json()
    assert set(hover) == {"cell_type", "scmulan_confidence", "n_genes"}
    assert 0 <= hover["scmulan_confidence"] <= 1
    assert client.get(f"/api/cells/{cid}/obs/300").status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "/static/../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/.%2e/app.py",
        "/static/%2fetc%2fpasswd",
        "/static/vendor/../../app.py",
        "/api/slides/nope/dzi",
        "/api/slides/%2e%2e/dzi",
        "/api/slides/..%2F..%2Fetc%2Fpasswd/tiles/0/0_0.jpeg",
        "/api/slides/cmu_00/rois",
        "/api/spatial/..%2Fspots/color?key=G1",
        "/api/cells/%2e%2e%2fcells/obs/0",
        "/api/jobs/..%2F..%2Fetc%2Fpasswd/result.h5ad",
    ],
)
def test_path_traversal_is_404(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404, (url, r.text)
    assert "error" in r.json()
    assert "root:" not in r.text


def test_static_serves_only_its_folder(client: TestClient) -> None:
    from msfm.view.app import STATIC_DIR

    # The page ships inside the package (package data): its files must be there.
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert any(p.name == "index.html" for p in files), files
    rel = files[0].relative_to(STATIC_DIR).as_posix()
    r = client.get(f"/static/{rel}")
    assert r.status_code == 200
    assert r.content == files[0].read_bytes()
    assert client.get("/").status_code == 200


def test_token_required_when_set(demo: Path) -> None:
    from msfm.view import create_app

    app = create_app([demo / "cells.h5ad"], token="s3cret-token")
    assert TestClient(app).get("/api/index").status_code == 401
    assert TestClient(app).get("/api/index", params={"token": "wrong-token"}).status_code == 401
    assert TestClient(app).get("/", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert TestClient(app).get("/api/index", params={"token": "s3cret-token"}).status_code == 200
    bearer = TestClient(app).get("/api/index", headers={"Authorization": "Bearer s3cret-token"})
    assert bearer.status_code == 200
    # The page's own <script>/<img> requests carry the HttpOnly cookie set by the first authenticated request.
    c = TestClient(app)
    first = c.get("/", params={"token": "s3cret-token"})
    assert first.status_code == 200
    assert "HttpOnly" in first.headers["set-cookie"]
    assert c.get("/api/index").status_code == 200


def test_non_loopback_host_needs_a_token(demo: Path) -> None:
    from msfm.view import resolve_token, serve
    from msfm.view.security import is_loopback

    assert is_loopback("127.0.0.1")
    assert is_loopback("localhost")
    assert is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.5")
    assert not is_loopback("example.org")
    with pytest.raises(MsfmInputError, match="needs a token"):
        serve([demo], host="0.0.0.0", port=0, token=None, open_browser=False)
    with pytest.raises(MsfmInputError, match="at least 8"):
        resolve_token("0.0.0.0", "a b")
    assert resolve_token("127.0.0.1", "auto") is None
    generated = resolve_token("0.0.0.0", "auto")
    assert generated
    assert len(generated) >= 32
    assert resolve_token("127.0.0.1", "given-token") == "given-token"


def test_discover_rejects_bad_inputs(tmp_path: Path) -> None:
    from msfm.view.sources import discover

    with pytest.raises(MsfmInputError, match="does not exist"):
        discover([tmp_path / "missing"])
    with pytest.raises(MsfmInputError, match="nothing to show"):
        discover([tmp_path])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MsfmInputError, match="do not know"):
        discover([tmp_path / "notes.txt"])
    with pytest.raises(MsfmInputError, match="not a GeST checkpoint"):
        discover([tmp_path], checkpoint=tmp_path)


def test_a_100k_slide_is_tiled_without_reading_a_level() -> None:
    """Every tile of a 100,000 x 100,000 pyramid is one small read at the nearest level."""
    from openslide.deepzoom import DeepZoomGenerator

    from msfm.view.tiles import _OpenSlideAPI

    reads: list[tuple[int, int, int]] = []

    class HugeSlide:
        dimensions = (100_000, 100_000)
        level_downsamples = tuple(float(4**i) for i in range(6))
        level_dimensions = tuple((100_000 // 4**i, 100_000 // 4**i) for i in range(6))
        level_count = 6
        properties: dict[str, str] = {}

        def best_level_for_downsample(self, d: float) -> int:
            return max(i for i, ds in enumerate(self.level_downsamples) if ds <= d * (1 + 1e-6))

        def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
            reads.append((level, *size))
            return np.full((size[1], size[0], 3), 230, np.uint8)

    dz = DeepZoomGenerator(_OpenSlideAPI(HugeSlide()), tile_size=254, overlap=1, limit_bounds=False)
    assert dz.level_dimensions[-1] == (100_000, 100_000)
    for level in (0, 5, 9, 12, dz.level_count - 1):
        cols, rows = dz.level_tiles[level]
        tile = dz.get_tile(level, (cols // 2, rows // 2))
        assert max(tile.size) <= 256
    assert max(w * h for _, w, h in reads) <= 1024 * 1024  # at most 4x a tile, never a whole level


def test_cli_view_refuses_a_public_host_without_token(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from msfm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["view", str(demo), "--host", "0.0.0.0", "--token", "", "--no-browser"])
    assert exc.value.code == 2
    assert "needs a token" in capsys.readouterr().err
