"""The viewer's page in headless Chromium against the real ``msfm view`` app (``msfm.view.create_app``).

The data is the small demo-like folder of the server tests (pyramid TIFF slides, a ROAM heatmap folder written by
the real writer, a cascade table, spots and an embedding); the app runs in-process under uvicorn with a token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.view._browser import browser_page, colourful, require_browser, save, serve_in_thread, state

TOKEN = "real-token-4567"


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_browser()
    from tests.view._server_data import build_demo_like

    from msfm.view import create_app

    demo = build_demo_like(tmp_path_factory.mktemp("view_demo_browser"))
    app = create_app([demo], token=TOKEN)
    with serve_in_thread(app) as base, browser_page() as pg:
        pg.msfm_base = base
        yield pg
    assert not pg.msfm_errors, pg.msfm_errors


def test_real_slide_tiles_overlay_and_roi_maps(page: Any, tmp_path: Path) -> None:
    page.goto(f"{page.msfm_base}/?token={TOKEN}#slides")
    page.wait_for_function("window.msfmState && window.msfmState.slidesReady === true", timeout=20_000)
    slides = state(page, "index")["slides"]
    with_heat = next(s for s in slides if s["has_heatmap"])
    page.get_by_test_id("slide-select").select_option(with_heat["id"])
    page.wait_for_function(
        f"window.msfmState.slideOpen === {with_heat['id']!r} && window.msfmState.overlayDrawn", timeout=20_000
    )
    page.wait_for_function(
        "window.msfmTest.slideViewer().world.getItemAt(0)?.getFullyLoaded()", timeout=20_000
    )
    assert state(page, "tilesLoaded") > 0
    shot = save(page.get_by_test_id("slide-viewer").screenshot(), tmp_path, "real_slide.png")
    assert shot.std() > 10
    assert colourful(shot) > 0.02

    # (Pan and zoom loading deeper levels is checked on the larger synthetic slide of test_browser_views.py:
    # this 1536 x 1024 slide is already shown at full resolution.)
    at = page.evaluate("window.msfmTest.roiCentreOnPage(0)")
    page.mouse.click(at["x"], at["y"])
    page.wait_for_function(
        "window.msfmState.roiOpened === 0 && window.msfmState.roiMapsDrawn === 3", timeout=15_000
    )
    page.wait_for_function("window.msfmState.roiMapsPng === 0", timeout=10_000)
    maps = save(page.get_by_test_id("roi-maps").screenshot(), tmp_path, "real_roi_maps.png")
    assert colourful(maps) > 0.3
    assert "cmu" in page.get_by_test_id("roi-probabilities").inner_text()
    assert "cmu" in page.get_by_test_id("cascade").inner_text()


def test_real_cells_hover_shows_confidence(page: Any, tmp_path: Path) -> None:
    page.goto("about:blank")
    page.goto(f"{page.msfm_base}/?token={TOKEN}#cells")
    page.wait_for_function("window.msfmState && window.msfmState.cellsDrawn > 0", timeout=20_000)
    page.get_by_test_id("cells-color").select_option("scmulan_confidence")
    page.wait_for_function("window.msfmState.cellsColor === 'scmulan_confidence'")
    shot = save(page.get_by_test_id("cells-canvas").screenshot(), tmp_path, "real_cells.png")
    assert colourful(shot) > 0.005
    at = page.evaluate("window.msfmTest.pointOnPage(3)")
    page.mouse.move(at["x"], at["y"])
    page.wait_for_function("window.msfmState.hover !== null", timeout=10_000)
    assert "scmulan_confidence" in page.get_by_test_id("cells-tooltip").inner_text()


def test_real_spatial_without_checkpoint_disables_perturbation(page: Any, tmp_path: Path) -> None:
    page.goto("about:blank")
    page.goto(f"{page.msfm_base}/?token={TOKEN}#spatial")
    page.wait_for_function("window.msfmState && window.msfmState.spatialDrawn > 0", timeout=20_000)
    shot = save(page.get_by_test_id("spatial-canvas").screenshot(), tmp_path, "real_spatial.png")
    assert colourful(shot) > 0.002
    assert page.get_by_test_id("generate").is_disabled()
