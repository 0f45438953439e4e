"""The viewer's page in headless Chromium against a stand-in of the HTTP API (tests/view/fake_server.py).

Each view is driven as a user would (pan, zoom, click, drag, hover), and screenshots saved under the test's
temporary folder are checked on their pixels. The real server is driven by test_browser_real.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.view._browser import browser_page, colourful, require_browser, save, serve_in_thread, state

TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    require_browser()
    from tests.view.fake_server import create_fake_app

    with serve_in_thread(create_fake_app(token=TOKEN, job_seconds=0.8)) as base, browser_page() as pg:
        pg.msfm_base = base
        yield pg
    assert not pg.msfm_errors, pg.msfm_errors


def goto(page: Any, view: str) -> None:
    page.goto("about:blank")  # a fresh page (and msfmState) for each test, not a same-document hash change
    page.goto(f"{page.msfm_base}/?token={TOKEN}#{view}")
    page.wait_for_function(f"window.msfmState && window.msfmState.{view}Ready === true", timeout=15_000)


def test_slides_tiles_overlay_pan_zoom_and_roi_click(page: Any, tmp_path: Path) -> None:
    goto(page, "slides")
    page.wait_for_function(
        "window.msfmState.overlayDrawn && window.msfmState.tilesLoaded > 0", timeout=15_000
    )
    page.wait_for_function(
        "window.msfmTest.slideViewer().world.getItemAt(0)?.getFullyLoaded()", timeout=15_000
    )
    viewer = page.get_by_test_id("slide-viewer")
    with_overlay = save(viewer.screenshot(), tmp_path, "slide_overlay.png")
    page.get_by_test_id("overlay-toggle").uncheck()
    page.wait_for_timeout(150)
    without = save(viewer.screenshot(), tmp_path, "slide_plain.png")
    page.get_by_test_id("overlay-toggle").check()
    assert with_overlay.std() > 10, "the slide viewer screenshot is blank"
    # The synthetic ROI with the highest score is near (900, 800) of 3000 x 2000: the overlay recolours it.
    h, w = with_overlay.shape[:2]
    changed = np.abs(with_overlay - without).sum(axis=2) > 30
    assert changed.mean() > 0.05, "the attention overlay did not change the picture"
    assert changed[: h // 2, : w // 2].mean() > changed[h // 2 :, w // 2 :].mean() * 0.5
    assert "raw score range" in page.get_by_test_id("colorbar").inner_text()

    # ROI grid outlines: dark lines over the tissue.
    page.get_by_test_id("roi-grid").check()
    page.wait_for_timeout(100)
    grid = save(viewer.screenshot(), tmp_path, "slide_grid.png")
    assert (grid.sum(axis=2) < 150).mean() > (with_overlay.sum(axis=2) < 150).mean() + 0.003
    page.get_by_test_id("roi-grid").uncheck()

    # Pan and zoom: new tiles load for the deeper level.
    before = state(page, "tilesLoaded")
    box = viewer.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    for _ in range(4):
        page.mouse.wheel(0, -300)
        page.wait_for_timeout(80)
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx - 150, cy - 80, steps=6)
    page.mouse.up()
    page.wait_for_function(f"window.msfmState.tilesLoaded > {before}", timeout=10_000)
    assert page.evaluate("window.msfmTest.slideViewer().viewport.getZoom()") > 1.5

    # Click the best ROI: its scores, class probabilities and three per-scale maps appear.
    page.evaluate("window.msfmTest.slideViewer().viewport.goHome(true)")
    page.wait_for_timeout(200)
    rois = page.evaluate("fetch('/api/slides/s1/rois?token=" + TOKEN + "').then(r => r.json())")
    best = max(rois["rois"], key=lambda r: r["score"])["index"]
    at = page.evaluate(f"window.msfmTest.roiCentreOnPage({best})")
    page.mouse.click(at["x"], at["y"])
    page.wait_for_function(
        f"window.msfmState.roiOpened === {best} && window.msfmState.roiMapsDrawn === 3", timeout=10_000
    )
    panel = page.get_by_test_id("roi-panel")
    assert "tumour" in page.get_by_test_id("roi-probabilities").inner_text()
    maps = save(page.get_by_test_id("roi-maps").screenshot(), tmp_path, "roi_maps.png")
    assert colourful(maps) > 0.3, "the per-scale maps are not drawn"
    save(panel.screenshot(), tmp_path, "roi_panel.png")
    assert "subtype B" in page.get_by_test_id("cascade").inner_text()


def drag(page: Any, a: dict, b: dict, *, shift: bool = False) -> None:
    if shift:
        page.keyboard.down("Shift")
    page.mouse.move(a["x"], a["y"])
    page.mouse.down()
    page.mouse.move(b["x"], a["y"], steps=4)
    page.mouse.move(b["x"], b["y"], steps=4)
    page.mouse.move(a["x"], b["y"], steps=4)
    page.mouse.move(a["x"] + 1, a["y"] + 1, steps=4)
    page.mouse.up()
    if shift:
        page.keyboard.up("Shift")


def test_spatial_select_perturb_and_difference(page: Any, tmp_path: Path) -> None:
    goto(page, "spatial")
    page.wait_for_function("window.msfmState.spatialDrawn > 0", timeout=10_000)
    plot = save(page.get_by_test_id("spatial-canvas").screenshot(), tmp_path, "spatial.png")
    assert colourful(plot) > 0.02, "the spots are not drawn"

    # Lasso (shift+drag) around spots 0..12 x 0..12 of the 50 x 50 grid, then a box over the same corner.
    a = page.evaluate("window.msfmTest.spotOnPage(0)")
    b = page.evaluate("window.msfmTest.spotOnPage(612)")
    a = {"x": a["x"] - 4, "y": a["y"] - 4}
    b = {"x": b["x"] + 4, "y": b["y"] + 4}
    drag(page, a, b, shift=True)
    lasso = state(page, "selectionCount")
    assert 100 < lasso < 250, lasso
    page.get_by_test_id("selection-clear").click()
    assert state(page, "selectionCount") == 0
    page.mouse.move(a["x"], a["y"])
    page.mouse.down()
    page.mouse.move(b["x"], b["y"], steps=5)
    page.mouse.up()
    assert state(page, "selectionCount") == 169  # 13 x 13 spots

    # Colour by a gene through the picker (datalist input).
    page.get_by_test_id("spatial-color").fill("EPCAM")
    page.get_by_test_id("spatial-color").dispatch_event("change")
    page.wait_for_function("window.msfmState.spatialColor === 'EPCAM'")
    assert page.get_by_test_id("spatial-colorbar").is_visible()

    page.get_by_test_id("gene-pick").fill("EPCAM")
    page.get_by_test_id("add-up").click()
    assert "EPCAM" in page.get_by_test_id("up-list").inner_text()
    assert page.get_by_test_id("amount").input_value() == "0.95"
    page.get_by_test_id("generate").click()
    page.wait_for_function(
        "window.msfmState.lastJob && window.msfmState.lastJob.state === 'running'", timeout=5000
    )
    page.wait_for_function("window.msfmState.resultDrawn === true", timeout=15_000)
    assert state(page, "lastJob")["state"] == "done"
    diff = save(page.get_by_test_id("result-diff").screenshot(), tmp_path, "diff.png")
    control = save(page.get_by_test_id("result-control").screenshot(), tmp_path, "control.png")
    # Red (activation) where the edited spots are; the background is grey (225) and unchanged spots white.
    red = (diff[..., 0] - diff[..., 2] > 60).mean()
    assert red > 0.005, "the difference panel shows no change"
    assert colourful(control) > 0.02
    href = page.get_by_test_id("download-h5ad").get_attribute("href")
    assert href.endswith(f"/result.h5ad?token={TOKEN}")
    save(page.screenshot(full_page=True), tmp_path, "spatial_page.png")


def test_spatial_no_op_edit_is_said_in_the_page(page: Any) -> None:
    goto(page, "spatial")
    page.wait_for_function("window.msfmState.spatialDrawn > 0", timeout=10_000)
    a = page.evaluate("window.msfmTest.spotOnPage(0)")
    b = page.evaluate("window.msfmTest.spotOnPage(306)")
    page.mouse.move(a["x"] - 3, a["y"] - 3)
    page.mouse.down()
    page.mouse.move(b["x"] + 3, b["y"] + 3, steps=5)
    page.mouse.up()
    page.get_by_test_id("gene-pick").fill("EPCAM")
    page.get_by_test_id("add-up").click()
    page.get_by_test_id("gene-pick").fill("NOOP")
    page.get_by_test_id("add-down").click()
    page.get_by_test_id("generate").click()
    page.wait_for_function("window.msfmState.resultDrawn === true", timeout=15_000)
    note = page.get_by_test_id("result-note")
    assert state(page, "resultSummary")["no_op"] is True
    assert note.is_visible()
    assert "changed nothing the model reads" in note.inner_text()


def test_spatial_failed_job_shows_its_error(page: Any) -> None:
    goto(page, "spatial")
    page.wait_for_function("window.msfmState.spatialDrawn > 0", timeout=10_000)
    a = page.evaluate("window.msfmTest.spotOnPage(0)")
    b = page.evaluate("window.msfmTest.spotOnPage(306)")
    page.mouse.move(a["x"] - 3, a["y"] - 3)
    page.mouse.down()
    page.mouse.move(b["x"] + 3, b["y"] + 3, steps=5)
    page.mouse.up()
    page.get_by_test_id("gene-pick").fill("FAIL")
    page.get_by_test_id("add-up").click()
    page.get_by_test_id("generate").click()
    page.wait_for_function(
        "window.msfmState.lastJob && window.msfmState.lastJob.state === 'failed'", timeout=15_000
    )
    error = page.get_by_test_id("job-error")
    assert error.is_visible()
    assert "made the fake model fail" in error.inner_text()
    assert not page.get_by_test_id("perturb-result").is_visible()


def test_spatial_job_can_be_cancelled(page: Any) -> None:
    goto(page, "spatial")
    page.wait_for_function("window.msfmState.spatialDrawn > 0", timeout=10_000)
    a = page.evaluate("window.msfmTest.spotOnPage(0)")
    b = page.evaluate("window.msfmTest.spotOnPage(102)")
    page.mouse.move(a["x"] - 3, a["y"] - 3)
    page.mouse.down()
    page.mouse.move(b["x"] + 3, b["y"] + 3, steps=5)
    page.mouse.up()
    page.get_by_test_id("gene-pick").fill("KRT5")
    page.get_by_test_id("add-down").click()
    page.get_by_test_id("perturb-mode").select_option("continuous")
    page.get_by_test_id("generate").click()
    page.wait_for_function(
        "window.msfmState.lastJob && window.msfmState.lastJob.state === 'running'", timeout=5000
    )
    page.get_by_test_id("job-cancel").click()
    page.wait_for_function("window.msfmState.lastJob.state === 'cancelled'", timeout=10_000)
    assert page.get_by_test_id("job-message").inner_text() == "cancelled"
    assert page.get_by_test_id("generate").is_enabled()


def test_cells_colour_by_column_and_hover(page: Any, tmp_path: Path) -> None:
    goto(page, "cells")
    page.wait_for_function("window.msfmState.cellsDrawn > 0", timeout=10_000)
    canvas = page.get_by_test_id("cells-canvas")
    by_type = save(canvas.screenshot(), tmp_path, "cells_type.png")
    assert colourful(by_type) > 0.01
    assert "type 0" in page.get_by_test_id("cells-legend").inner_text()
    page.get_by_test_id("cells-color").select_option("cell_type_confidence")
    page.wait_for_function("window.msfmState.cellsColor === 'cell_type_confidence'")
    by_conf = save(canvas.screenshot(), tmp_path, "cells_conf.png")
    assert np.abs(by_conf - by_type).sum(axis=2).astype(bool).mean() > 0.005, "recolouring changed nothing"
    assert page.get_by_test_id("cells-colorbar").is_visible()

    at = page.evaluate("window.msfmTest.pointOnPage(10)")
    page.mouse.move(at["x"], at["y"])
    page.wait_for_function("window.msfmState.hover !== null", timeout=5000)
    tip = page.get_by_test_id("cells-tooltip")
    assert tip.is_visible()
    assert "cell_type_confidence" in tip.inner_text()
    save(page.screenshot(), tmp_path, "cells_hover.png")
