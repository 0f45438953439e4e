"""msfm.pl.embedding: AnnData keys in scanpy's style, legends and colour bars that fit in the saved PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import msfm.pl as pl
from figure_checks import legend_problems
from msfm.errors import MsfmInputError

LONG = [f"CD4+/CD45RA+/CD25- Naive T {i}" for i in range(20)]


def _adata(n: int = 200) -> ad.AnnData:
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(LONG, n)),
            "batch": rng.choice(["a", "b"], n),
            "score": rng.normal(size=n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    a = ad.AnnData(X=rng.poisson(1.0, (n, 4)).astype(np.float32), obs=obs)
    a.var_names = ["CD3E", "MS4A1", "LYZ", "NKG7"]
    a.layers["counts"] = a.X * 10
    a.obsm["X_umap"] = rng.normal(size=(n, 2))
    a.obsm["X_pca"] = rng.normal(size=(n, 5))
    a.obsm["spatial"] = rng.uniform(0, 500, (n, 2))
    return a


def test_basis_with_and_without_prefix_and_axis_labels() -> None:
    a = _adata()
    for basis in ("umap", "X_umap"):
        fig = pl.embedding(a, basis, "batch")
        assert fig.axes[0].get_xlabel() == "UMAP1"
        assert fig.axes[0].get_ylabel() == "UMAP2"
    fig = pl.embedding(a, "pca", "batch", components=(1, 2))
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("PC2", "PC3")


def test_categorical_legend_numeric_colorbar_and_gene(tmp_path) -> None:
    a = _adata()
    out = tmp_path / "umap.png"
    fig = pl.embedding(a, "umap", ["cell_type", "score", "LYZ"], save=out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["cell_type", "score", "LYZ"]
    legend = panels[0].get_legend()
    present = set(a.obs["cell_type"].astype(str))
    assert {t.get_text() for t in legend.get_texts()} == present
    assert len(fig.axes) == 3 + 2  # two colour bars: score and the gene
    # The gene's colours are its expression: colour-bar range = the column's range (from X or a layer).
    x = np.asarray(a[:, "LYZ"].X).ravel()
    assert fig.axes[-1].get_ylim() == pytest.approx((x.min(), x.max()))
    fig2 = pl.embedding(a, "umap", "LYZ", layer="counts")
    assert fig2.axes[-1].get_ylim() == pytest.approx((10 * x.min(), 10 * x.max()))


def test_missing_keys_name_what_exists() -> None:
    a = _adata()
    with pytest.raises(MsfmInputError, match=r"obsm has \['X_umap', 'X_pca', 'spatial'\]"):
        pl.embedding(a, "tsne", "batch")
    with pytest.raises(MsfmInputError, match=r"obs columns: \['cell_type', 'batch', 'score'\].*CD3E"):
        pl.embedding(a, "umap", "leiden")
    with pytest.raises(MsfmInputError, match="layers are"):
        pl.embedding(a, "umap", "LYZ", layer="raw")


def test_long_labels_fit_in_saved_png(tmp_path) -> None:
    # 20 long PBMC-style labels next to two more panels: no legend text is cut or hidden under a neighbour.
    a = _adata(400)
    fig = pl.embedding(a, "umap", ["cell_type", "batch", "score"], save=tmp_path / "u.png")
    assert legend_problems(fig) == []
    assert fig.axes[0].get_legend()._ncols == 2  # 20 categories: two columns
    fig2 = pl.embedding_panels(
        [a.obsm["X_umap"], a.obsm["X_pca"][:, :2]], ["A", "B"], a.obs["cell_type"].to_numpy()
    )
    assert legend_problems(fig2) == []
    assert fig2.axes[0].get_xlabel() == "UMAP1"


def test_legend_check_detects_a_cut_legend() -> None:
    # The old demo layout (plain subplots, legend beside the first panel) is flagged by the check above.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for i, lab in enumerate(LONG[:5]):
        axes[0].scatter([i], [i], label=lab)
    axes[0].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    assert legend_problems(fig)


def test_several_bases_one_key_share_one_legend() -> None:
    a = _adata()
    a.obsm["X_umap_other"] = a.obsm["X_umap"] * 2
    fig = pl.embedding(a, ["umap", "X_umap_other"], "batch", title=["first", "second"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["first", "second"]
    assert panels[0].get_legend() is None
    assert {t.get_text() for t in panels[1].get_legend().get_texts()} == {"a", "b"}
    assert panels[1].get_xlabel() == "UMAP1"
    with pytest.raises(MsfmInputError, match="one colour key"):
        pl.embedding(a, ["umap", "X_umap_other"], ["batch", "score"])
