"""Plots for spatial transcriptomics (matplotlib, headless): cells at their positions, GeST generation and
in-silico perturbation figures.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state) and rendered with the Agg
backend. Every function returns the ``Figure``; ``save=`` writes a PNG atomically (:func:`msfm.pl.figure.save_figure`).
Positions are drawn with equal aspect and, by default, the y axis pointing down (image coordinates, as scanpy and
squidpy draw spatial data).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError
from msfm.pl.embedding import draw_categorical, legend_width_in, palette_for
from msfm.pl.figure import new_figure, save_figure

__all__ = ["generation_figure", "perturbation_figure", "spatial", "spatial_scatter"]

PathLike = str | os.PathLike[str]


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
    categories: Sequence[str] | None = None,
    palette: Any = None,
    colorbar_label: str | None = None,
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
        categories: Legend order of the categories (default: sorted labels).
        palette: Category colours (dict, list or colormap name); default tab10 / tab20.
        colorbar_label: Label of the colour bar (e.g. the gene and its scale).
        save: Write the figure as a PNG here.

    The categorical legend sits outside on the right; a new figure is widened to fit it. With ``ax=`` the
    caller's figure is not resized: use a constrained-layout figure (or :func:`spatial`) so it gets room.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        MsfmInputError: On misaligned inputs.

    Shape:
        xy: ``[n, 2]``; values, highlight: ``[n]``.
    """
    pos = _xy(xy)
    n = pos.shape[0]
    vals = np.asarray(values)
    if vals.shape != (n,):
        msg = f"values must have one entry per cell ({n}); got shape {vals.shape}."
        raise MsfmInputError(msg)
    hl = None if highlight is None else _mask(highlight, n, "highlight")
    s = _point_size(n, size)
    labels = vals.astype(str) if categorical else None
    if categorical and categories is None:
        categories = sorted(set(labels.tolist()))
    if ax is None:
        # Widened to the legend (longest label, several columns past 14 categories) so it is never cut.
        fig = new_figure((4.2 + legend_width_in(categories), 4.2) if categorical else (4.8, 4.2))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    if categorical:
        colors = palette_for(categories, palette)
        draw_categorical(ax, pos, labels, categories, colors, size=s)
        if hl is not None and hl.any():
            ax.scatter(
                pos[hl, 0], pos[hl, 1], s=s * 1.3, facecolors="none", edgecolors="black", linewidths=0.6
            )
    else:
        sc = _draw(ax, pos, vals.astype(np.float64), cmap=cmap, size=s, vmin=vmin, vmax=vmax, highlight=hl)
        if colorbar:
            cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
            if colorbar_label:
                cb.set_label(colorbar_label, fontsize=8)
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
    edit: str | None = None,
    save: PathLike | None = None,
):
    """Control vs perturbed generation for a few genes, and the log fold changes of the top genes (GeST Fig. 4).

    One row per shown gene: control | perturbed (shared colour scale, one colour bar) | perturbed - control
    (diverging, symmetric scale, one colour bar). Region cells (the edited ROI) are outlined; cells that are
    neither region nor target (unchanged context) are drawn faded. With ``report`` a last column holds a
    horizontal bar chart of ``log_fc`` for the ``n_bars`` genes with the lowest FDR (ties: largest ``|log_fc|``),
    ``*`` marking FDR < 0.05. The figure title names the edit (``edit``) and a legend below the panels says
    which spots are the edited region (outlined), the regenerated targets and the unchanged context (faded).

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
        edit: What was edited, for the title (e.g. "genes up: KRT10; down: SBSN (set to the 0.95 quantile)").
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
    fig = new_figure((3.4 * n_cols + 0.6, 3.0 * n_rows + 0.4))
    grid = fig.add_gridspec(n_rows, n_cols)
    for r, g in enumerate(shown):
        j = lookup[g]
        lo = float(min(c[:, j].min(), p[:, j].min()))
        hi = float(max(c[:, j].max(), p[:, j].max()))
        axes = [fig.add_subplot(grid[r, k]) for k in range(3)]
        _draw(axes[0], pos, c[:, j], cmap=cmap, size=s, vmin=lo, vmax=hi, highlight=region, alpha=alpha)
        sc = _draw(axes[1], pos, p[:, j], cmap=cmap, size=s, vmin=lo, vmax=hi, highlight=region, alpha=alpha)
        fig.colorbar(sc, ax=axes[:2], fraction=0.046, pad=0.02).set_label(f"{g} expression", fontsize=8)
        d = p[:, j] - c[:, j]
        lim = float(np.abs(d).max()) or 1.0
        sd = _draw(axes[2], pos, d, cmap="RdBu_r", size=s, vmin=-lim, vmax=lim, highlight=region, alpha=alpha)
        fig.colorbar(sd, ax=axes[2], fraction=0.046, pad=0.02).set_label("perturbed - control", fontsize=8)
        for ax, title in zip(axes, (f"{g}: control", f"{g}: perturbed", f"{g}: perturbed - control")):
            _style(ax, title, invert_y)
    if report is not None:
        if "log_fc" not in report.columns:
            msg = "report must be a perturbation_report DataFrame with a 'log_fc' column."
            raise MsfmInputError(msg)
        top = _top_genes_from_report(report, n_bars)[::-1]
        lfc = report.loc[top, "log_fc"].to_numpy(dtype=np.float64)
        ax = fig.add_subplot(grid[:, 3])
        # Tiny changes are drawn in units of a power of ten named in the axis label (no offset text that the
        # label would run into), so the tick labels stay short.
        peak = float(np.abs(lfc).max()) if lfc.size else 0.0
        exp10 = int(np.floor(np.log10(peak))) if 0.0 < peak < 0.01 else 0
        ax.barh(np.arange(len(top)), lfc / 10.0**exp10, color=np.where(lfc >= 0, "#c0392b", "#2e6db4"))
        labels = list(top)
        if "fdr" in report.columns:
            fdr = report.loc[top, "fdr"].to_numpy(dtype=np.float64)
            labels = [f"{g} *" if q < 0.05 else g for g, q in zip(top, fdr)]
        ax.set_yticks(np.arange(len(top)), labels, fontsize=7)
        ax.axvline(0.0, color="0.4", lw=0.8)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(axis="x", labelsize=7)
        unit = f", x 1e{exp10}" if exp10 else ""
        ax.set_xlabel(f"log fold change (perturbed - control, log1p{unit})", fontsize=8)
        ax.set_title("top genes", fontsize=9)
    fig.suptitle(f"In-silico perturbation: {edit}" if edit else "In-silico perturbation", fontsize=11)
    _edit_legend(fig, region, target, context)
    if save is not None:
        save_figure(fig, save)
    return fig


def _edit_legend(fig, region: np.ndarray, target: np.ndarray, context: np.ndarray) -> None:
    """Legend below the panels: which spots were edited (outlined), regenerated, and unchanged (faded)."""
    from matplotlib.lines import Line2D

    def marker(edge: str | None, alpha: float) -> Line2D:
        return Line2D(
            [],
            [],
            ls="",
            marker="o",
            ms=7,
            mfc="0.45",
            alpha=alpha,
            mec=edge or "none",
            mew=1.0 if edge else 0,
        )

    handles = [marker("black", 1.0)]
    labels = [f"outlined: the edited region ({int(region.sum())} spots)"]
    if target.any():
        handles.append(marker(None, 1.0))
        labels.append(f"regenerated: target spots ({int(target.sum())})")
    if context.any():
        handles.append(marker(None, 0.35))
        labels.append(f"faded: context, unchanged ({int(context.sum())} spots)")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)


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
    fig = new_figure((3.3 * len(panels) + 0.8, 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    sc = None
    for ax, (title, v) in zip(axes, panels):
        ax.scatter(pos[~q, 0], pos[~q, 1], s=s, color="0.85", linewidths=0)
        sc = ax.scatter(pos[q, 0], pos[q, 1], c=v, s=s, cmap=cmap, vmin=lo, vmax=hi, linewidths=0)
        _style(ax, title, invert_y)
    cb = fig.colorbar(sc, ax=list(axes), fraction=0.03, pad=0.02)
    cb.set_label(f"{label} expression (one scale, {lo:.2f} to {hi:.2f})", fontsize=8)
    fig.suptitle(
        f"Held-out generation of {label}: {m} generated spots coloured, {n - m} known spots grey", fontsize=10
    )
    if save is not None:
        save_figure(fig, save)
    return fig


def spatial(
    adata,
    color: str | Sequence[str] | None = None,
    *,
    basis: str = "spatial",
    layer: str | None = None,
    highlight: str | None = None,
    groups: Sequence[str] | None = None,
    title: str | Sequence[str] | None = None,
    size: float | None = None,
    cmap: str = "viridis",
    palette: Any = None,
    invert_y: bool = True,
    ax=None,
    save: PathLike | None = None,
):
    """Spots or cells of an AnnData at ``obsm[basis]``, coloured by obs columns or genes (one panel per key).

    Exported as ``msfm.pl.spatial``.

    Args:
        adata: AnnData with positions in ``obsm[basis]`` (the first two columns are drawn).
        color: An obs column (categorical -> legend, numeric -> colour bar), a gene in ``var_names``, a list of
            those (one panel each), or None (grey).
        basis: ``obsm`` key of the positions ("spatial"; "X_spatial" is also looked for).
        layer: Layer to read gene expression from (default ``.X``).
        highlight: A boolean obs column; those cells are outlined in black (e.g. an edited region).
        groups: For categorical keys, draw only these categories in colour (the rest light grey, "other").
        title: One title, or one per colour key (default: the key).
        size: Marker size (points^2); default scales with the number of cells.
        cmap: Colour map of numeric keys.
        palette: Category colours (dict, list or colormap name); default ``uns['<key>_colors']`` or tab10/20.
        invert_y: Point the y axis down (image coordinates, as scanpy/squidpy).
        ax: Draw into this axes (one colour key only); its figure is returned and not resized.
        save: Write the figure as a PNG here.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        MsfmInputError: Unknown basis (naming the obsm keys), colour key (naming obs columns and genes),
            highlight column (not boolean) or group.
    """
    from msfm.pl.embedding import as_keys, color_values, panel_titles, resolve_basis

    key, arr = resolve_basis(adata, basis)
    pos = arr[:, :2]
    keys = as_keys(color)
    titles = panel_titles(keys, title)
    if ax is not None and len(keys) > 1:
        msg = f"ax= draws one panel; got {len(keys)} colour keys. Pass one key or leave ax=None."
        raise MsfmInputError(msg)
    hl = None
    if highlight is not None:
        if highlight not in adata.obs.columns:
            msg = f"highlight={highlight!r} is not an obs column; obs columns: {list(map(str, adata.obs.columns))}."
            raise MsfmInputError(msg)
        hl = adata.obs[highlight].to_numpy()
        if hl.dtype != bool:
            msg = f"highlight column {highlight!r} must be boolean (True = outlined); got dtype {hl.dtype}."
            raise MsfmInputError(msg)
    panels = []
    for k in keys:
        if k is None:
            panels.append((np.full(adata.n_obs, "all cells"), True, ["all cells"], {"palette": ["#9e9e9e"]}))
            continue
        vals, cat, cats = color_values(adata, k, layer)
        extra: dict[str, Any] = {}
        if cat and groups is not None:
            unknown = [g for g in groups if g not in cats]
            if unknown:
                msg = f"groups {unknown} are not categories of {k!r}; categories: {cats}."
                raise MsfmInputError(msg)
            vals = np.where(np.isin(vals, list(groups)), vals, "other")
            cats = [g for g in cats if g in groups] + ["other"]
            extra["palette"] = {**palette_for(cats[:-1], palette), "other": "#d3d3d3"}
        elif cat:
            extra["palette"] = palette_for(cats, palette, adata.uns.get(f"{k}_colors"))
        panels.append((vals, cat, cats, extra))
    if ax is None:
        widths = [4.2 + (legend_width_in(c) if cat else 0.8) for _, cat, c, _ in panels]
        fig = new_figure((sum(widths), 4.2))
        axes = list(fig.subplots(1, len(keys), squeeze=False, gridspec_kw={"width_ratios": widths})[0])
    else:
        fig, axes = ax.figure, [ax]
    for a, k, t, (vals, cat, cats, extra) in zip(axes, keys, titles, panels):
        spatial_scatter(
            pos,
            vals,
            ax=a,
            title=t,
            cmap=cmap,
            size=size,
            categorical=cat,
            categories=cats,
            highlight=hl,
            invert_y=invert_y,
            colorbar_label=None if cat else k + (f" ({layer})" if layer and k in adata.var_names else ""),
            **extra,
        )
        a.set_xlabel(f"{key.removeprefix('X_')}1", fontsize=9)
        a.set_ylabel(f"{key.removeprefix('X_')}2", fontsize=9)
    if save is not None:
        save_figure(fig, save)
    return fig
