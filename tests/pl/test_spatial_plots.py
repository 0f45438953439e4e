"""Spatial plots: scatter, generation and perturbation figures build and save PNGs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from msfm.errors import MsfmInputError
from msfm.eval.spatial import perturbation_report
from msfm.pl.spatial import generation_figure, perturbation_figure, spatial_scatter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tissue(n_genes: int = 6):
    rng = np.random.default_rng(0)
    g = np.arange(10) * 15.0
    xx, yy = np.meshgrid(g, g)
    xy = np.column_stack([xx.ravel(), yy.ravel()])
    X = rng.uniform(0, 3, size=(xy.shape[0], n_genes))
    names = [f"g{i}" for i in range(n_genes)]
    return xy, X, names


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_spatial_scatter_continuous_categorical_and_axes(tmp_path) -> None:
    xy, X, _ = _tissue()
    out = tmp_path / "sub" / "scatter.png"
    fig = spatial_scatter(xy, X[:, 0], title="g0", highlight=xy[:, 0] < 40, save=out)
    assert _is_png(out)
    assert len(fig.axes) == 2  # panel + colour bar
    assert fig.axes[0].yaxis_inverted()
    labels = np.where(xy[:, 0] < 70, "left", "right")
    fig2 = spatial_scatter(xy, labels, categorical=True, invert_y=False)
    assert len(fig2.axes) == 1
    assert not fig2.axes[0].yaxis_inverted()
    assert {t.get_text() for t in fig2.axes[0].get_legend().get_texts()} == {"left", "right"}
    # Drawing into a given axes returns its figure.
    from matplotlib.figure import Figure

    host = Figure()
    ax = host.add_subplot(1, 2, 1)
    assert spatial_scatter(xy, X[:, 1], ax=ax, colorbar=False) is host
    with pytest.raises(MsfmInputError, match="one entry per cell"):
        spatial_scatter(xy, X[:-1, 0])


def test_perturbation_figure(tmp_path) -> None:
    xy, X, names = _tissue()
    centre = np.linalg.norm(xy - xy.mean(0), axis=1)
    region = centre < 25
    target = (centre >= 25) & (centre < 60)
    perturbed = X.copy()
    perturbed[region, 0] += 2.0
    perturbed[target, 0] += 0.5
    perturbed[target, 1] -= 0.3
    rep = perturbation_report(X[target], perturbed[target], names)
    out = tmp_path / "pert.png"
    fig = perturbation_figure(
        xy, X, perturbed, ["g0", "g1"], names, region_mask=region, target_mask=target, report=rep, save=out
    )
    assert _is_png(out)
    assert len(fig.axes) == 5 * 2 + 1  # per gene: 3 panels + 2 colour bars; plus the bar chart
    bars = fig.axes[-1]
    assert len(bars.patches) == len(names)
    # Without a report the genes are required; with one, the top genes are picked from it.
    fig2 = perturbation_figure(
        xy, X, perturbed, None, names, region_mask=region, target_mask=target, report=rep, n_genes=1
    )
    assert len(fig2.axes) == 5 + 1
    assert fig2.axes[0].get_title().startswith(("g0", "g1"))
    fig3 = perturbation_figure(xy, X, perturbed, ["g2"], names, region_mask=region, target_mask=target)
    assert len(fig3.axes) == 5
    with pytest.raises(MsfmInputError, match="no report"):
        perturbation_figure(xy, X, perturbed, None, names, region_mask=region, target_mask=target)
    with pytest.raises(MsfmInputError, match="not in gene_names"):
        perturbation_figure(xy, X, perturbed, ["nope"], names, region_mask=region, target_mask=target)
    with pytest.raises(MsfmInputError, match="boolean"):
        perturbation_figure(
            xy, X, perturbed, ["g0"], names, region_mask=region.astype(int), target_mask=target
        )


def test_generation_figure(tmp_path) -> None:
    xy, X, _ = _tissue()
    query = np.zeros(xy.shape[0], dtype=bool)
    query[::4] = True
    preds = {"knn": X[query] + 0.1, "mean": np.tile(X.mean(0), (xy.shape[0], 1))}
    out = tmp_path / "gen.png"
    fig = generation_figure(xy, X, preds, 2, "g2", query_mask=query, save=out)
    assert _is_png(out)
    assert len(fig.axes) == 1 + 2 + 1
    assert "RMSE 0.100" in fig.axes[1].get_title()
    with pytest.raises(MsfmInputError, match="preds"):
        generation_figure(xy, X, {"bad": X[:3]}, 0, query_mask=query)
    with pytest.raises(MsfmInputError, match="selects no cells"):
        generation_figure(xy, X, preds, 0, query_mask=np.zeros(xy.shape[0], dtype=bool))
