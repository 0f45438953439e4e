"""Plots (matplotlib, headless): embeddings and spatial maps of an AnnData, metric bars, training curves.

Functions take arrays or AnnData and return the matplotlib ``Figure``; ``save=`` writes a PNG atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from msfm.pl.embedding import embedding, embedding_panels
from msfm.pl.figure import new_figure, save_figure
from msfm.pl.spatial_figures import spatial


def metric_bars(
    table: dict[str, dict[str, float]],
    *,
    metrics: Sequence[str] = ("ari", "nmi"),
    title: str = "",
    ylabel: str = "score",
    metric_labels: dict[str, str] | None = None,
    save: str | os.PathLike[str] | None = None,
):
    """Grouped bars: one group per method (rows of ``table``), one bar per metric.

    The y axis spans 0 to 1 and extends below 0 when a value is negative (a negative correlation is shown, not cut).
    ``metric_labels`` names the metrics in the legend (default: the metric key in capitals).
    """
    methods = list(table)
    x = np.arange(len(methods))
    width = 0.8 / max(len(metrics), 1)
    fig = new_figure((1.3 * len(methods) + 2.5, 3.6), constrained=False)
    ax = fig.subplots()
    for j, m in enumerate(metrics):
        vals = [table[k].get(m, np.nan) for k in methods]
        name = (metric_labels or {}).get(m, m.upper())
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, vals, width, label=name)
        for b, v in zip(bars, vals):
            ax.text(
                b.get_x() + b.get_width() / 2,
                b.get_height(),
                f"{v:.2f}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(x, methods, rotation=20, ha="right", fontsize=8)
    values = np.array([table[k].get(m, np.nan) for k in methods for m in metrics], dtype=float)
    low = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    ax.set_ylim(min(0.0, low - 0.1), 1.05)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    # Outside the axes, so the legend never covers a bar.
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    if save is not None:
        save_figure(fig, save)
    return fig


def training_curve(
    steps: np.ndarray,
    values: np.ndarray,
    *,
    ylabel: str = "loss",
    title: str = "",
    save: str | os.PathLike[str] | None = None,
):
    """Line plot of a logged training metric."""
    fig = new_figure((4.8, 3.2), constrained=False)
    ax = fig.subplots()
    ax.plot(steps, values, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if save is not None:
        save_figure(fig, save)
    return fig


__all__ = [
    "embedding",
    "embedding_panels",
    "line_plot",
    "metric_bars",
    "spatial",
    "training_curve",
]

from msfm.pl.confusion import confusion_matrix  # noqa: E402
from msfm.pl.slide_heatmap import slide_heatmap  # noqa: E402

__all__ += ["confusion_matrix", "slide_heatmap"]


def line_plot(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    save: str | os.PathLike[str] | None = None,
):
    """One line per named series over a shared x axis (e.g. a perturbation score against the forced level)."""
    fig = new_figure((4.8, 3.4), constrained=False)
    ax = fig.subplots()
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", ms=3, label=name)
    ax.axhline(0.0, color="0.7", lw=0.8, zorder=0)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    if save is not None:
        save_figure(fig, save)
    return fig
