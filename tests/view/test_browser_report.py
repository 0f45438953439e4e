"""The demo's HTML report in a real headless Chromium: one file, opened from disk, every figure shown, no network."""

from __future__ import annotations

import numpy as np
from tests.view._browser import browser_page, colourful, save

from msfm.pl import metric_bars
from msfm.pl.html_report import write_html_report


def test_report_html_opens_offline_with_every_figure_drawn(tmp_path):
    figures = tmp_path / "run" / "figures"
    metric_bars(
        {"PCA": {"ari": 0.48, "nmi": 0.62}, "model": {"ari": 0.17, "nmi": 0.36}}, save=figures / "a.png"
    )
    md = tmp_path / "run" / "report.md"
    md.write_text(
        "# Demo\n\n| method | ARI |\n|---|---|\n| PCA | 0.477 |\n\n![bars](figures/a.png)\n\n"
        "> **How to read this.** PCA is better here.\n",
        encoding="utf-8",
    )
    html = write_html_report(md)
    # Moved away from its figures folder: a self-contained file still shows everything.
    moved = tmp_path / "elsewhere.html"
    moved.write_bytes(html.read_bytes())
    requests: list[str] = []
    with browser_page(900, 900) as page:
        page.on("request", lambda r: requests.append(r.url))
        page.goto(moved.as_uri())
        loaded = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth > 0])")
        assert loaded == [[True, True]]
        assert page.inner_text("td") == "PCA"
        img = save(page.locator("img").screenshot(), tmp_path, "figure.png")
        assert page.msfm_errors == []
    assert colourful(img) > 0.02  # the bars are drawn (blue and orange), not a blank box
    assert np.unique(img.reshape(-1, 3), axis=0).shape[0] > 20
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
