"""Plots (matplotlib, headless): embeddings coloured by label, metric bars, training curves.

Functions take arrays or AnnData and return the matplotlib ``Figure``; ``save=`` writes a PNG atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, save: str | os.PathLike[str] | None) -> None:
    if save is None:
        return
    from msfm.runtime.atomic import atomic_path

    path = Path(save)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An unpredictable, exclusively created temporary (a planted link is never followed), renamed into place.
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")


def embedding_panels(
    coords: Sequence[np.ndarray],
    titles: Sequence[str],
    labels: Sequence[str] | np.ndarray,
    *,
    save: str | os.PathLike[str] | None = None,
    point_size: float = 6.0,
    legend: bool = True,
):
    """Side-by-side 2-D scatter plots (e.g. UMAPs) coloured by the same categorical labels.

    Shape:
        coords: each ``[n, 2]``; labels: ``[n]``.
    """
    plt = _pyplot()
    labels = np.asarray(labels).astype(str)
    cats = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    fig, axes = plt.subplots(
        1, len(coords), figsize=(4.6 * len(coords) + (2.8 if legend else 0), 4.4), squeeze=False
    )
    for ax, xy, title in zip(axes[0], coords, titles):
        for i, c in enumerate(cats):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=point_size, color=cmap(i % cmap.N), label=c, linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if legend:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(
            handles,
            names,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=8,
            markerscale=2.5,
            frameon=False,
        )
    fig.tight_layout()
    _save(fig, save)
    return fig


def metric_bars(
    table: dict[str, dict[str, float]],
    *,
    metrics: Sequence[str] = ("ari", "nmi"),
    title: str = "",
    ylabel: str = "score",
    save: str | os.PathLike[str] | None = None,
):
    """Grouped bars: one group per method (rows of ``table``), one bar per metric.

    The y axis spans 0 to 1 and extends below 0 when a value is negative (a negative correlation is shown, not cut).
    """
    plt = _pyplot()
    methods = list(table)
    x = np.arange(len(methods))
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2.5, 3.6))
    for j, m in enumerate(metrics):
        vals = [table[k].get(m, np.nan) for k in methods]
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * width, vals, width, label=m.upper())
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
    _save(fig, save)
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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(steps, values, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, save)
    return fig


__all__ = ["embedding_panels", "metric_bars", "training_curve"]


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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", ms=3, label=name)
    ax.axhline(0.0, color="0.7", lw=0.8, zorder=0)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    _save(fig, save)
    return fig
