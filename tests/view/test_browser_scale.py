"""The spatial view with 100,000 spots stays interactive: one-pass canvas drawing from typed arrays."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.view._browser import browser_page, require_browser, serve_in_thread, state


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    require_browser()
    from tests.view.fake_server import create_fake_app

    with serve_in_thread(create_fake_app(n_spots=100_000, n_cells=10)) as base, browser_page() as pg:
        pg.msfm_base = base
        yield pg
    assert not pg.msfm_errors, pg.msfm_errors


def test_100k_spots_draw_and_select_quickly(page: Any) -> None:
    page.goto(f"{page.msfm_base}/#spatial")
    page.wait_for_function("window.msfmState && window.msfmState.spatialDrawn > 0", timeout=30_000)
    assert page.evaluate("window.msfmState.index.spatial[0].n_obs") == 100_000
    # One full redraw of 100,000 points (colour lookup + pixel writes) in well under a frame budget of a few.
    assert state(page, "timings")["spatialDrawMs"] < 400
    a = page.evaluate("window.msfmTest.spotOnPage(0)")
    b = page.evaluate("window.msfmTest.spotOnPage(317 * 50 + 50)")  # the fake lays 317 spots a row
    page.mouse.move(a["x"] - 1, a["y"] - 1)
    page.mouse.down()
    page.mouse.move(b["x"] + 1, b["y"] + 1, steps=5)
    page.mouse.up()
    assert 2000 < state(page, "selectionCount") < 4000
    assert state(page, "timings")["spatialDrawMs"] < 400
