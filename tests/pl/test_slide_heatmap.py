"""msfm.pl.slide_heatmap and the rois.h5ad AnnData that `msfm roam heatmap` writes."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest

import msfm.pl
from msfm.errors import MsfmInputError
from msfm.models.roam.heatmaps import HeatmapResult, rois_anndata
from msfm.runtime.h5ad import write_h5ad_atomic

COORDS = np.array([[0, 0], [100, 0], [200, 0], [0, 100], [100, 100], [200, 100]])


def _rois(scores: np.ndarray) -> anndata.AnnData:
    thumb = np.full((50, 75, 3), 230, np.uint8)  # a 300 x 200 level-0 slide at downsample 4
    pct = 100.0 * np.argsort(np.argsort(scores)) / (len(scores) - 1)
    meta = {"slide_id": "s1", "class_shown": "tumour", "predicted_class": "tumour",
            "probabilities": {"normal": 0.3, "tumour": 0.7}}  # fmt: skip
    return rois_anndata("s1", COORDS, 100, scores, pct, thumb, 4.0, meta)


def _texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.texts)


def test_rois_h5ad_round_trip(tmp_path: Path) -> None:
    scores = np.array([0.05, 0.1, 0.4, 0.15, 0.2, 0.1])
    a = _rois(scores)
    (tmp_path / "s1").mkdir()
    write_h5ad_atomic(a, tmp_path / "s1" / "rois.h5ad", compression="gzip")
    b = HeatmapResult(table=__import__("pandas").DataFrame({"slide_id": ["s1"]}), out=tmp_path).rois("s1")
    np.testing.assert_allclose(b.obs["score"], scores)
    np.testing.assert_array_equal(b.obs["rank"], [6, 4, 1, 3, 2, 5])
    np.testing.assert_array_equal(b.obs[["x", "y"]].to_numpy(), COORDS)
    # obsm["spatial"] holds ROI centres (scanpy's spot convention).
    np.testing.assert_allclose(b.obsm["spatial"], COORDS + 50)
    lib = b.uns["spatial"]["s1"]
    assert lib["images"]["hires"].shape == (50, 75, 3)
    assert lib["images"]["hires"].dtype == np.uint8
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.25)
    assert int(lib["scalefactors"]["roi_size_level0"]) == 100
    assert b.uns["roam_heatmap"]["class_shown"] == "tumour"
    assert float(b.uns["roam_heatmap"]["probabilities"]["tumour"]) == pytest.approx(0.7)
    with pytest.raises(MsfmInputError, match="slides drawn are"):
        HeatmapResult(table=__import__("pandas").DataFrame({"slide_id": ["s1"]}), out=tmp_path).rois("s2")


def test_figure_has_scale_title_and_raw_range(tmp_path: Path) -> None:
    scores = np.array([0.05, 0.1, 0.4, 0.15, 0.2, 0.1])
    a = _rois(scores)
    fig = msfm.pl.slide_heatmap(a, save=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 2000
    assert len(fig.axes) == 3  # thumbnail, overlay, colour bar
    assert fig.axes[2].get_ylabel() == "percentile of attention within this slide"
    assert fig.axes[2].get_ylim() == (0.0, 100.0)
    title = fig._suptitle.get_text()
    assert "tumour" in title
    assert "s1" in title
    assert "0.70" in title
    text = _texts(fig)
    assert "raw attention 0.05 to 0.4 over 6 ROIs" in text
    assert "nearly uniform" not in text
    fig = msfm.pl.slide_heatmap(a, "score", blur=False)
    assert fig.axes[2].get_ylabel() == "attention (softmax over 6 ROIs)"
    assert fig.axes[2].get_ylim() == pytest.approx((0.05, 0.4))


def test_near_uniform_note() -> None:
    scores = np.array([0.1665, 0.1668, 0.1667, 0.1666, 0.1667, 0.1667])
    text = _texts(msfm.pl.slide_heatmap(_rois(scores / scores.sum()), blur=False))
    assert "nearly uniform" in text
    assert "exaggerate" in text
    assert "a uniform split would be 0.1667 each" in text
    # A 1.2x spread is not called uniform.
    spread = np.array([1.0, 1.2, 1.1, 1.05, 1.15, 1.1])
    assert "nearly uniform" not in _texts(msfm.pl.slide_heatmap(_rois(spread / spread.sum()), blur=False))


def test_missing_keys_are_clear_errors() -> None:
    a = _rois(np.array([0.05, 0.1, 0.4, 0.15, 0.2, 0.1]))
    with pytest.raises(MsfmInputError, match=r"'attention' is not a column of adata.obs.*percentile"):
        msfm.pl.slide_heatmap(a, "attention")
    with pytest.raises(MsfmInputError, match=r"library_id 'other'.*\['s1'\]"):
        msfm.pl.slide_heatmap(a, library_id="other")
    b = a.copy()
    del b.uns["spatial"]
    with pytest.raises(MsfmInputError, match="uns\\['spatial'\\]"):
        msfm.pl.slide_heatmap(b)
