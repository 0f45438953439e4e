"""The demo's HTML report: one self-contained file (figures inlined, nothing remote), readable tables."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from msfm.errors import MsfmInputError
from msfm.pl.html_report import markdown_to_html, write_html_report


def _png(path):
    from PIL import Image

    Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8)).save(path)
    return path.read_bytes()


def test_figures_are_inlined_and_tables_rendered(tmp_path):
    (tmp_path / "figures").mkdir()
    raw = _png(tmp_path / "figures" / "a.png")
    md = tmp_path / "report.md"
    md.write_text(
        "# My report\n\nText with `code`.\n\n| method | ARI |\n|---|---|\n| PCA | 0.477 |\n\n"
        "![umap](figures/a.png)\n\n> **How to read this.** A note.\n",
        encoding="utf-8",
    )
    out = write_html_report(md)
    assert out == tmp_path / "report.html"
    html = out.read_text(encoding="utf-8")
    assert "<title>My report</title>" in html
    assert "<table>" in html
    assert "<td>0.477</td>" in html
    assert "<blockquote>" in html
    encoded = base64.b64encode(raw).decode("ascii")
    assert f'src="data:image/png;base64,{encoded}"' in html
    assert "figures/a.png" not in html  # nothing left that needs the folder


def test_missing_and_remote_images_are_named_not_fetched(tmp_path):
    html = markdown_to_html(
        "![a](figures/nope.png)\n\n![b](https://example.org/x.png)\n", base_dir=tmp_path, title="t"
    )
    assert "figure not found: figures/nope.png" in html
    assert "remote image left out: https://example.org/x.png" in html
    assert "<img" not in html


def test_missing_markdown_file_is_a_clear_error(tmp_path):
    with pytest.raises(MsfmInputError, match=r"does not exist; pass the path of a \.md file"):
        write_html_report(tmp_path / "absent.md")
