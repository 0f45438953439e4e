"""Plots for spatial transcriptomics (matplotlib, headless): cells at their positions, GeST generation and
in-silico perturbation figures.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state) and rendered with the Agg
backend. Every function returns the ``Figure``; ``save=`` writes a PNG atomically (:func:`msfm.pl.slides.save_figure`).
Positions are drawn with equal aspect and, by default, the y axis pointing down (image coordinates, as scanpy and
squidpy draw spatial data).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError
from msfm.pl.slides import save_figure

__all__ = ["generation_figure", "perturbation_figure", "spatial_scatter"]

PathLike = str | os.PathLike[str]


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Constrained layout keeps colour bars and the bar chart's gene labels from overlapping neighbouring panels.
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _xy(xy: Any) -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        msg = f"xy must be an [n, 2] array of positions; got shape {arr.shape}."
        raise MsfmInputError(msg)
    return arr


def _mask(mask: Any, n: int, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != (n,):
        msg = f"{name} must be a boolean array with one entry per cell ({n}); got dtype {m.dtype}, shape {m.shape}."
        raise MsfmInputError(msg)
    return m


def _point_size(n: int, size: float | None) -> float:
    # Fill the panel roughly the same whatever the cell count: large dots for a few hundred spots, small for 1e5.
    return float(size) if size is not None else float(np.clip(1.5e4 / max(n, 1), 0.5, 40.0))


def _style(ax, title: str | None, invert_y: bool) -> None:
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    if invert_y and not ax.yaxis_inverted():
        ax.invert_yaxis()
    if title:
        ax.set_title(title, fontsize=9)


def _draw(
    ax,
    xy: np.ndarray,
    values: np.ndarray,
    *,
    cmap: str,
    size: float,
    vmin: float | None = None,
    vmax: float | None = None,
    highlight: np.ndarray | None = None,
    alpha: np.ndarray | float = 1.0,
):
    """Colour-mapped scatter; highlighted cells are drawn on top with a black outline."""
    sc = ax.scatter(
        xy[:, 0], xy[:, 1], c=values, s=size, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=0, alpha=alpha
    )
    if highlight is not None and highlight.any():
        ax.scatter(
            xy[highlight, 0],
            xy[highlight, 1],
            c=values[highlight],
            s=size * 1.3,
            cmap=cmap,
            vmin=sc.norm.vmin,
            vmax=sc.norm.vmax,
            edgecolors="black",
            linewidths=0.6,
        )
    return sc


def spatial_scatter(
    xy: Any,
    values: Any,
    *,
    ax=None,
    title: str | None = None,
    cmap: str = "viridis",
    size: float | None = None,
    categorical: bool = False,
    highlight: Any = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    invert_y: bool = True,
    save: PathLike | None = None,
):
    """Cells at their positions, coloured by a value (expression) or a category (niche, cell type).

    Args:
        xy: Positions (µm).
        values: One value or label per cell.
        ax: Draw into this axes (its figure is returned); None makes a new figure.
        title: Panel title.
        cmap: Colour map of continuous values.
        size: Marker size (points^2); default scales with the number of cells.
        categorical: Treat ``values`` as labels (one colour each, with a legend).
        highlight: Boolean mask of cells drawn with a black outline (e.g. a perturbed region).
        vmin: Bottom of the colour scale (continuous values).
        vmax: Top of the colour scale.
        colorbar: Add a colour bar (continuous values).
        invert_y: Point the y axis down (image coordinates).
        save: Write the figure as a PNG here.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        MsfmInputError: On misaligned inputs.

    Shape:
        xy: ``[n, 2]``; values, highlight: ``[n]``.
    """
    import matplotlib

    pos = _xy(xy)
    n = pos.shape[0]
    vals = np.asarray(values)
    if vals.shape != (n,):
        msg = f"values must have one entry per cell ({n}); got shape {vals.shape}."
        raise MsfmInputError(msg)
    hl = None if highlight is None else _mask(highlight, n, "highlight")
    s = _point_size(n, size)
    fig = _figure((5.2 if categorical else 4.8, 4.2)) if ax is None else ax.figure
    if ax is None:
        ax = fig.add_subplot(1, 1, 1)
    if categorical:
        labels = vals.astype(str)
        cats = sorted(set(labels.tolist()))
        cm = matplotlib.colormaps["tab20" if len(cats) > 10 else "tab10"]
        for i, c in enumerate(cats):
            m = labels == c
            ax.scatter(pos[m, 0], pos[m, 1], s=s, color=cm(i % cm.N), label=c, linewidths=0)
        if hl is not None and hl.any():
            ax.scatter(
                pos[hl, 0], pos[hl, 1], s=s * 1.3, facecolors="none", edgecolors="black", linewidths=0.6
            )
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=1.5, frameon=False)
    else:
        sc = _draw(ax, pos, vals.astype(np.float64), cmap=cmap, size=s, vmin=vmin, vmax=vmax, highlight=hl)
        if colorbar:
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    _style(ax, title, invert_y)
    if save is not None:
        save_figure(fig, save)
    return fig


def _top_genes_from_report(report, n: int) -> list[str]:
    cols = report.columns
    if "fdr" in cols:
        order = report.assign(_abs=report["log_fc"].abs()).sort_values(
            ["fdr", "_abs"], ascending=[True, False]
        )
    else:
        order = report.reindex(report["log_fc"].abs().sort_values(ascending=False).index)
    return [str(g) for g in order.index[:n]]


def perturbation_figure(
    xy: Any,
    control: Any,
    perturbed: Any,
    genes: Sequence[str] | None,
    gene_names: Sequence[str],
    *,
    region_mask: Any,
    target_mask: Any,
    report=None,
    n_genes: int = 3,
    n_bars: int = 15,
    cmap: str = "viridis",
    size: float | None = None,
    invert_y: bool = True,
    save: PathLike | None = None,
):
    """Control vs perturbed generation for a few genes, and the log fold changes of the top genes (GeST Fig. 4).

    One row per shown gene: control | perturbed (shared colour scale, one colour bar) | perturbed - control
    (diverging, symmetric scale, one colour bar). Region cells (the edited ROI) are outlined; cells that are
    neither region nor target (unchanged context) are drawn faded. With ``report`` a last column holds a
    horizontal bar chart of ``log_fc`` for the ``n_bars`` genes with the lowest FDR (ties: largest ``|log_fc|``),
    ``*`` marking FDR < 0.05.

    Axes: ``5 * n_rows`` (3 panels + 2 colour bars per row) plus 1 with ``report``.

    Args:
        xy: Positions of all drawn cells.
        control: Expression of every drawn cell in the control run (context cells as given, target cells
            generated).
        perturbed: The same cells in the perturbed run (region cells edited, target cells regenerated).
        genes: Genes to show (the first ``n_genes``); None picks the top genes of ``report``.
        gene_names: Names of the expression columns.
        region_mask: The perturbed region cells.
        target_mask: The regenerated cells.
        report: :func:`msfm.eval.spatial.perturbation_report` output for the bar chart.
        n_genes: Most gene rows.
        n_bars: Genes in the bar chart.
        cmap: Colour map of expression.
        size: Marker size; default scales with the number of cells.
        invert_y: Point the y axis down.
        save: Write the figure as a PNG here.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        MsfmInputError: On misaligned inputs, unknown genes or no genes to show.

    Shape:
        xy: ``[n, 2]``; control, perturbed: ``[n, T]``; region_mask, target_mask: ``[n]`` bool.
    """
    pos = _xy(xy)
    n = pos.shape[0]
    c = np.asarray(control, dtype=np.float64)
    p = np.asarray(perturbed, dtype=np.float64)
    names = [str(g) for g in gene_names]
    if c.shape != p.shape or c.ndim != 2 or c.shape[0] != n or c.shape[1] != len(names):
        msg = (
            f"control {c.shape} and perturbed {p.shape} must both be [n_cells={n}, n_genes={len(names)}] "
            "(rows aligned with xy, columns with gene_names)."
        )
        raise MsfmInputError(msg)
    region = _mask(region_mask, n, "region_mask")
    target = _mask(target_mask, n, "target_mask")
    if genes is None:
        if report is None:
            msg = "genes is None and no report was given; pass the genes to show or a perturbation_report."
            raise MsfmInputError(msg)
        genes = _top_genes_from_report(report, n_genes)
    shown = [str(g) for g in genes][: max(int(n_genes), 1)]
    lookup = {g: i for i, g in enumerate(names)}
    missing = [g for g in shown if g not in lookup]
    if missing or not shown:
        msg = f"Genes to show {missing or shown} are not in gene_names (or none were given)."
        raise MsfmInputError(msg)

    s = _point_size(n, size)
    context = ~(region | target)
    alpha = np.where(context, 0.35, 1.0)
    n_rows = len(shown)
    n_cols = 3 + (1 if report is not None else 0)
    fig = _figure((3.4 * n_cols + 0.6, 3.0 * n_rows + 0.4))
    grid = fig.add_gridspec(n_rows, n_cols)
    for r, g in enumerate(shown):
        j = lookup[g]
        lo = float(min(c[:, j].min(), p[:, j].min()))
        hi = float(max(c[:, j].max(), p[:, j].max()))
        axes = [fig.add_subplot(grid[r, k]) for k in range(3)]
        _draw(axes[0], pos, c[:, j], cmap=cmap, size=s, vmin=lo, vmax=hi, highlight=region, alpha=alpha)
        sc = _draw(axes[1], pos, p[:, j], cmap=cmap, size=s, vmin=lo, vmax=hi, highlight=region, alpha=alpha)
        fig.colorbar(sc, ax=axes[:2], fraction=0.046, pad=0.02)
        d = p[:, j] - c[:, j]
        lim = float(np.abs(d).max()) or 1.0
        sd = _draw(axes[2], pos, d, cmap="RdBu_r", size=s, vmin=-lim, vmax=lim, highlight=region, alpha=alpha)
        fig.colorbar(sd, ax=axes[2], fraction=0.046, pad=0.02)
        for ax, title in zip(axes, (f"{g}: control", f"{g}: perturbed", f"{g}: perturbed - control")):
            _style(ax, title, invert_y)
    if report is not None:
        if "log_fc" not in report.columns:
            msg = "report must be a perturbation_report DataFrame with a 'log_fc' column."
            raise MsfmInputError(msg)
        top = _top_genes_from_report(report, n_bars)[::-1]
        lfc = report.loc[top, "log_fc"].to_numpy(dtype=np.float64)
        ax = fig.add_subplot(grid[:, 3])
        ax.barh(np.arange(len(top)), lfc, color=np.where(lfc >= 0, "#c0392b", "#2e6db4"))
        labels = list(top)
        if "fdr" in report.columns:
            fdr = report.loc[top, "fdr"].to_numpy(dtype=np.float64)
            labels = [f"{g} *" if q < 0.05 else g for g, q in zip(top, fdr)]
        ax.set_yticks(np.arange(len(top)), labels, fontsize=7)
        ax.axvline(0.0, color="0.4", lw=0.8)
        ax.set_xlabel("log fold change (perturbed - control, log1p)", fontsize=8)
        ax.set_title("top genes", fontsize=9)
    if save is not None:
        save_figure(fig, save)
    return fig


def generation_figure(
    xy: Any,
    true: Any,
    preds: Mapping[str, Any],
    gene_idx: int,
    gene_name: str | None = None,
    *,
    query_mask: Any,
    cmap: str = "viridis",
    size: float | None = None,
    invert_y: bool = True,
    save: PathLike | None = None,
):
    """One gene at held-out positions: the truth next to every method's prediction (shared colour scale).

    Known (non-query) cells are drawn in light grey for context; each method's title carries its RMSE for this
    gene over the query cells.

    Axes: ``1 + len(preds)`` panels plus 1 colour bar.

    Args:
        xy: Positions of all cells.
        true: True expression of all cells.
        preds: ``{method: prediction}``, each ``[m, T]`` for the query cells (in mask order) or ``[n, T]``.
        gene_idx: Column of the gene to draw.
        gene_name: Its name for the titles (default ``gene <idx>``).
        query_mask: The held-out cells that were generated.
        cmap: Colour map.
        size: Marker size; default scales with the number of cells.
        invert_y: Point the y axis down.
        save: Write the figure as a PNG here.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        MsfmInputError: On misaligned inputs, an empty query or a gene index out of range.

    Shape:
        xy: ``[n, 2]``; true: ``[n, T]``; query_mask: ``[n]`` bool.
    """
    pos = _xy(xy)
    n = pos.shape[0]
    t = np.asarray(true, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != n:
        msg = f"true must be [n_cells={n}, n_genes]; got shape {t.shape}."
        raise MsfmInputError(msg)
    q = _mask(query_mask, n, "query_mask")
    m = int(q.sum())
    if m == 0:
        msg = "query_mask selects no cells; mark the held-out (generated) cells True."
        raise MsfmInputError(msg)
    j = int(gene_idx)
    if not 0 <= j < t.shape[1]:
        msg = f"gene_idx must be in [0, {t.shape[1]}); got {gene_idx}."
        raise MsfmInputError(msg)
    label = gene_name or f"gene {j}"
    panels: list[tuple[str, np.ndarray]] = [(f"{label}: true", t[q, j])]
    for name, pred in preds.items():
        arr = np.asarray(pred, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != t.shape[1] or arr.shape[0] not in (m, n):
            msg = (
                f"preds[{name!r}] has shape {arr.shape}; expected [{m}, {t.shape[1]}] (query cells) or "
                f"[{n}, {t.shape[1]}] (all cells)."
            )
            raise MsfmInputError(msg)
        v = arr[q, j] if arr.shape[0] == n and n != m else arr[:, j]
        rmse = float(np.sqrt(np.mean((v - t[q, j]) ** 2)))
        panels.append((f"{name} (RMSE {rmse:.3f})", v))
    lo = float(min(v.min() for _, v in panels))
    hi = float(max(v.max() for _, v in panels))
    s = _point_size(n, size)
    fig = _figure((3.3 * len(panels) + 0.8, 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    sc = None
    for ax, (title, v) in zip(axes, panels):
        ax.scatter(pos[~q, 0], pos[~q, 1], s=s, color="0.85", linewidths=0)
        sc = ax.scatter(pos[q, 0], pos[q, 1], c=v, s=s, cmap=cmap, vmin=lo, vmax=hi, linewidths=0)
        _style(ax, title, invert_y)
    fig.colorbar(sc, ax=list(axes), fraction=0.03, pad=0.02)
    if save is not None:
        save_figure(fig, save)
    return fig
