"""Spatial plots: scatter, generation and perturbation figures build and save PNGs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from figure_checks import legend_problems
from msfm.errors import MsfmInputError
from msfm.eval.spatial import perturbation_report
from msfm.pl.spatial_figures import generation_figure, perturbation_figure, spatial_scatter

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


def test_perturbation_figure_says_what_was_edited(tmp_path) -> None:
    xy, X, names = _tissue()
    centre = np.linalg.norm(xy - xy.mean(0), axis=1)
    region = centre < 25
    target = (centre >= 25) & (centre < 60)
    fig = perturbation_figure(
        xy, X, X + 0.1, ["g0"], names, region_mask=region, target_mask=target, edit="genes set up: g0"
    )
    assert fig.get_suptitle() == "In-silico perturbation: genes set up: g0"
    texts = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert texts == [
        f"outlined: the edited region ({int(region.sum())} spots)",
        f"regenerated: target spots ({int(target.sum())})",
        f"faded: context, unchanged ({int((~(region | target)).sum())} spots)",
    ]
    assert legend_problems(fig) == []


def _spatial_adata():
    import anndata as ad
    import pandas as pd

    xy, X, names = _tissue()
    n = xy.shape[0]
    long = [f"CD4+/CD45RA+/CD25- Naive T {i}" for i in range(12)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([long[i % 12] for i in range(n)]),
            "edited": xy[:, 0] < 40,
            "depth": X[:, 0],
        },
        index=[f"s{i}" for i in range(n)],
    )
    a = ad.AnnData(X=X.astype(np.float32), obs=obs)
    a.var_names = names
    a.obsm["spatial"] = xy
    return a


def test_spatial_anndata_keys_highlight_groups_and_fit(tmp_path) -> None:
    import msfm.pl

    a = _spatial_adata()
    out = tmp_path / "sp.png"
    fig = msfm.pl.spatial(a, ["cell_type", "g1", "depth"], highlight="edited", save=out)
    assert _is_png(out)
    panel = fig.axes[0]
    assert panel.yaxis_inverted()
    assert panel.get_xlabel() == "spatial1"
    assert {t.get_text() for t in panel.get_legend().get_texts()} == set(a.obs["cell_type"])
    # Colour bars carry the key; the gene's range is its expression range.
    bars = [ax for ax in fig.axes if ax.get_ylabel() in ("g1", "depth")]
    assert len(bars) == 2
    assert bars[0].get_ylim() == pytest.approx((a.X[:, 1].min(), a.X[:, 1].max()), rel=1e-5)
    # highlighted cells are drawn again with a black outline
    outlined = [
        c
        for c in panel.collections
        if len(c.get_edgecolors()) and c.get_offsets().shape[0] == a.obs["edited"].sum()
    ]
    assert outlined
    assert legend_problems(fig) == []
    fig2 = msfm.pl.spatial(a, "cell_type", groups=["CD4+/CD45RA+/CD25- Naive T 0"])
    assert [t.get_text() for t in fig2.axes[0].get_legend().get_texts()] == [
        "CD4+/CD45RA+/CD25- Naive T 0",
        "other",
    ]
    with pytest.raises(MsfmInputError, match=r"obsm has \['spatial'\]"):
        msfm.pl.spatial(a, "g1", basis="xy")
    with pytest.raises(MsfmInputError, match="neither an obs column nor a gene"):
        msfm.pl.spatial(a, "nope")
    with pytest.raises(MsfmInputError, match="must be boolean"):
        msfm.pl.spatial(a, "g1", highlight="depth")
