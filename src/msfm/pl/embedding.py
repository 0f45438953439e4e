"""Embeddings of an AnnData (UMAP, PCA, any ``obsm`` key) coloured by obs columns or genes, scanpy style.

``embedding(adata, basis="umap", color="cell_type")`` draws one panel per colour key. Categorical keys get a
legend outside the panel (the figure is widened to the longest label, several columns when there are many
categories), numeric keys and genes a colour bar. The helpers here (key lookup, palettes, legends) are shared
with :func:`msfm.pl.spatial`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError
from msfm.pl.figure import new_figure, save_figure

__all__ = ["embedding", "embedding_panels"]

PathLike = str | os.PathLike[str]

# Legend text size (points) and the widths used to size the figure so the legend fits beside the panel.
LEGEND_FONTSIZE = 8.0
_CHAR_WIDTH_IN = 0.5 * LEGEND_FONTSIZE / 72.0  # mean glyph width of DejaVu Sans, about 0.45 em, plus slack
_MARKER_WIDTH_IN = 0.35
_ROWS_PER_COLUMN = 14
NA_COLOR = "#d3d3d3"


# ----------------------------------------------------------------------------------------------------------------
# Keys of an AnnData


def resolve_basis(adata, basis: str) -> tuple[str, np.ndarray]:
    """The ``obsm`` key and array of ``basis`` ("umap" and "X_umap" both name ``obsm["X_umap"]``).

    Shape:
        returns: ``[n_obs, d]``.
    """
    keys = [str(k) for k in adata.obsm.keys()]
    for key in (basis, f"X_{basis}"):
        if key in adata.obsm:
            arr = np.asarray(adata.obsm[key], dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] < 2:
                msg = f"obsm[{key!r}] has shape {arr.shape}; a 2-D basis needs at least 2 columns."
                raise MsfmInputError(msg)
            return key, arr
    msg = (
        f"basis={basis!r} is not in adata.obsm (looked for {basis!r} and 'X_{basis}'); obsm has {keys or 'no keys'}. "
        "Compute it first (e.g. sc.tl.umap) or pass one of these keys."
    )
    raise MsfmInputError(msg)


def basis_axis_labels(key: str, components: Sequence[int]) -> tuple[str, str]:
    """Axis labels such as ("UMAP1", "UMAP2") or ("PC1", "PC2") for an ``obsm`` key and 0-based components."""
    name = key[2:] if key.startswith("X_") else key
    # "X_umap_scfoundation" is a UMAP too: match the leading word.
    stems = {"pca": "PC", "umap": "UMAP", "tsne": "tSNE", "draw_graph_fa": "FA"}
    stem = next((v for k, v in stems.items() if name.lower().split("_")[0] == k.split("_")[0]), name)
    return f"{stem}{components[0] + 1}", f"{stem}{components[1] + 1}"


def color_values(adata, key: str, layer: str | None = None) -> tuple[np.ndarray, bool, list[str] | None]:
    """The values of one colour key: an obs column or a gene in ``var_names`` (from ``.X`` or ``layers[layer]``).

    Returns:
        ``(values, categorical, categories)``; categories are the obs column's category order (or sorted labels)
        for categorical keys, None for numeric ones. Missing labels become "NA".

    Raises:
        MsfmInputError: The key is neither an obs column nor a gene, or ``layer`` is unknown.

    Shape:
        values: ``[n_obs]``.
    """
    import pandas as pd

    if key in adata.obs.columns:
        col = adata.obs[key]
        if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
            if isinstance(col.dtype, pd.CategoricalDtype):
                present = set(col.dropna().astype(str))
                cats = [str(c) for c in col.cat.categories if str(c) in present]
            else:
                cats = sorted(set(col.dropna().astype(str)))
            labels = col.astype(object).where(col.notna(), "NA").astype(str).to_numpy()
            if (labels == "NA").any() and "NA" not in cats:
                cats.append("NA")
            return labels, True, cats
        return col.to_numpy(dtype=np.float64), False, None
    if key in adata.var_names:
        if layer is not None and layer not in adata.layers:
            msg = f"layer={layer!r} is not in adata.layers; layers are {list(adata.layers.keys()) or 'none'}."
            raise MsfmInputError(msg)
        j = int(adata.var_names.get_loc(key))
        mat = adata.X if layer is None else adata.layers[layer]
        col = mat[:, j]
        col = col.toarray() if hasattr(col, "toarray") else np.asarray(col)
        return np.asarray(col, dtype=np.float64).ravel(), False, None
    obs = [str(c) for c in adata.obs.columns]
    genes = [str(g) for g in adata.var_names[:5]]
    msg = (
        f"color={key!r} is neither an obs column nor a gene in var_names. obs columns: {obs or 'none'}; "
        f"var_names ({adata.n_vars} genes) start {genes}. Pass one of these."
    )
    raise MsfmInputError(msg)


def palette_for(categories: Sequence[str], palette: Any = None, uns_colors: Any = None) -> dict[str, Any]:
    """One colour per category: ``palette`` (dict, list or colormap name), else ``uns['<key>_colors']``, else
    tab10 / tab20 / turbo by the number of categories. "NA" is light grey unless named."""
    import matplotlib

    cats = list(categories)
    real = [c for c in cats if c != "NA"]
    out: dict[str, Any] = {}
    if isinstance(palette, Mapping):
        missing = [c for c in real if c not in palette]
        if missing:
            msg = f"palette has no colour for categories {missing}; give one for each of {real}."
            raise MsfmInputError(msg)
        out = {c: palette[c] for c in real}
    elif isinstance(palette, Sequence) and not isinstance(palette, str):
        if len(palette) < len(real):
            msg = f"palette has {len(palette)} colours for {len(real)} categories; give at least {len(real)}."
            raise MsfmInputError(msg)
        out = dict(zip(real, palette))
    elif palette is None and uns_colors is not None and len(uns_colors) == len(real):
        out = dict(zip(real, list(uns_colors)))
    else:
        name = palette or ("tab10" if len(real) <= 10 else "tab20" if len(real) <= 20 else "turbo")
        cmap = matplotlib.colormaps[name]
        if getattr(cmap, "N", 256) >= 256:  # a continuous map: spread the categories over it
            out = {c: cmap(i / max(len(real) - 1, 1)) for i, c in enumerate(real)}
        else:
            out = {c: cmap(i % cmap.N) for i, c in enumerate(real)}
    if "NA" in cats:
        out.setdefault("NA", NA_COLOR)
    return out


def legend_columns(categories: Sequence[str]) -> int:
    """Legend columns: one up to 14 entries, more so no column grows taller than the panel."""
    return max(1, math.ceil(len(categories) / _ROWS_PER_COLUMN))


def legend_width_in(categories: Sequence[str]) -> float:
    """Estimated width (inches) of the outside legend of these categories, used to widen the figure."""
    if not categories:
        return 0.0
    ncol = legend_columns(categories)
    longest = max(len(str(c)) for c in categories)
    return ncol * (longest * _CHAR_WIDTH_IN + _MARKER_WIDTH_IN) + 0.2


def draw_categorical(
    ax,
    xy: np.ndarray,
    labels: np.ndarray,
    categories: Sequence[str],
    colors: Mapping[str, Any],
    *,
    size: float,
    legend_loc: str | None = "right margin",
    legend_title: str | None = None,
) -> None:
    """Scatter one colour per category; legend outside on the right (or labels on the data, or none).

    Shape:
        xy: ``[n, 2]``; labels: ``[n]``.
    """
    for c in categories:
        m = labels == c
        ax.scatter(
            xy[m, 0], xy[m, 1], s=size, color=colors[c], label=c, linewidths=0, rasterized=len(xy) > 5000
        )
    if legend_loc == "right margin":
        ax.legend(
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=LEGEND_FONTSIZE,
            markerscale=max(1.0, 5.0 / math.sqrt(max(size, 1e-3))),
            frameon=False,
            ncol=legend_columns(categories),
            title=legend_title,
            title_fontsize=LEGEND_FONTSIZE + 1,
            handletextpad=0.2,
            columnspacing=0.8,
        )
    elif legend_loc == "on data":
        for c in categories:
            m = labels == c
            if m.any():
                mx, my = np.median(xy[m, 0]), np.median(xy[m, 1])
                ax.text(mx, my, c, fontsize=LEGEND_FONTSIZE, weight="bold", ha="center", va="center")


def check_legend_loc(legend_loc: str | None) -> str | None:
    if legend_loc in (None, "none"):
        return None
    if legend_loc not in ("right margin", "on data"):
        msg = f"legend_loc must be 'right margin', 'on data' or None; got {legend_loc!r}."
        raise MsfmInputError(msg)
    return legend_loc


def as_keys(color: str | Sequence[str] | None) -> list[str | None]:
    if color is None or isinstance(color, str):
        return [color]
    keys = list(color)
    if not keys:
        msg = "color is an empty list; pass an obs column, a gene, or a list of them."
        raise MsfmInputError(msg)
    return keys


def panel_titles(keys: Sequence[str | None], title: str | Sequence[str] | None) -> list[str]:
    if title is None:
        return [k or "" for k in keys]
    if isinstance(title, str):
        return [title] * len(keys) if len(keys) == 1 else [f"{title}: {k}" for k in keys]
    titles = list(title)
    if len(titles) != len(keys):
        msg = f"title has {len(titles)} entries for {len(keys)} colour keys; give one per key."
        raise MsfmInputError(msg)
    return titles


def default_size(n: int, size: float | None) -> float:
    # scanpy's rule: 120000 / n points^2, kept within readable bounds.
    return float(size) if size is not None else float(np.clip(1.2e5 / max(n, 1), 0.5, 60.0))


def save_if(fig, save: PathLike | None) -> None:
    if save is not None:
        save_figure(fig, save)


# ----------------------------------------------------------------------------------------------------------------
# Public functions


def embedding(
    adata,
    basis: str | Sequence[str] = "X_umap",
    color: str | Sequence[str] | None = "cell_type",
    *,
    components: tuple[int, int] = (0, 1),
    layer: str | None = None,
    title: str | Sequence[str] | None = None,
    legend_loc: str | None = "right margin",
    size: float | None = None,
    palette: Any = None,
    cmap: str = "viridis",
    ax=None,
    save: PathLike | None = None,
):
    """Cells in a 2-D embedding, coloured by obs columns or genes (one panel per colour key, as ``sc.pl.umap``).

    Args:
        adata: The AnnData.
        basis: ``obsm`` key of the embedding; "umap" and "X_umap" both name ``obsm["X_umap"]``. A list of
            keys draws one panel per basis with the same colour key (e.g. two methods' UMAPs side by side).
        color: An obs column (categorical -> legend, numeric -> colour bar), a gene in ``var_names``
            (expression from ``.X`` or ``layers[layer]``), a list of those (one panel each), or None (grey).
        components: The two 0-based columns of the basis to draw.
        layer: Layer to read gene expression from (default ``.X``).
        title: One title, or one per colour key (default: the key).
        legend_loc: "right margin" (outside, the figure widened to fit), "on data" (labels at the group
            medians) or None.
        size: Marker size (points^2); default ``120000 / n_obs`` as scanpy.
        palette: Category colours: a dict, a list or a colormap name; default ``uns['<key>_colors']`` when it
            has one colour per category, else tab10 / tab20.
        cmap: Colour map of numeric keys.
        ax: Draw into this axes (one colour key only); its figure is returned and not resized.
        save: Write the figure as a PNG here (tight bounding box: legends and colour bars are kept).

    Returns:
        The matplotlib ``Figure``.

    Raises:
        MsfmInputError: Unknown basis (naming the obsm keys), unknown colour key (naming the obs columns and
            genes), a bad component or legend_loc, or ``ax`` with several keys.
    """
    comps = tuple(int(c) for c in components)
    if isinstance(basis, str):
        bases = [basis]
    else:
        bases = list(basis)
        if len(bases) > 1 and not (isinstance(color, str) or color is None):
            msg = "Several bases are drawn with one colour key; pass color as one key (or one basis)."
            raise MsfmInputError(msg)
    drawn = []
    for b in bases:
        key, arr = resolve_basis(adata, b)
        if len(comps) != 2 or not all(0 <= c < arr.shape[1] for c in comps):
            msg = f"components must be two column indices in [0, {arr.shape[1]}) of obsm[{key!r}]; got {components}."
            raise MsfmInputError(msg)
        drawn.append((key, arr[:, list(comps)]))
    keys = as_keys(color)
    loc = check_legend_loc(legend_loc)
    if len(drawn) > 1:
        # One colour key over several bases (e.g. two methods' UMAPs): the legend only beside the last panel.
        keys = keys * len(drawn)
        titles = panel_titles([k for k, _ in drawn], title) if title is not None else [k for k, _ in drawn]
        locs = [None] * (len(drawn) - 1) + [loc]
    else:
        drawn = drawn * len(keys)
        titles = panel_titles(keys, title)
        locs = [loc] * len(keys)
    if ax is not None and len(keys) > 1:
        msg = f"ax= draws one panel; got {len(keys)} panels. Pass one key and one basis or leave ax=None."
        raise MsfmInputError(msg)
    resolved = [
        (k, *color_values(adata, k, layer)) if k is not None else (None, None, False, None) for k in keys
    ]
    s = default_size(adata.n_obs, size)
    fig = ax.figure if ax is not None else None
    if fig is None:
        widths = [
            4.0 + (legend_width_in(c) if cat and lc == "right margin" else 0.7)
            for (_, _, cat, c), lc in zip(resolved, locs)
        ]
        fig = new_figure((sum(widths), 4.0))
        # Each column as wide as its panel plus its legend or colour bar, so panels keep the same size.
        axes = fig.subplots(1, len(keys), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    else:
        axes = [ax]
    for a, (k, vals, cat, cats), t, (key, xy), lc in zip(axes, resolved, titles, drawn, locs):
        xlabel, ylabel = basis_axis_labels(key, comps)
        if vals is None:
            a.scatter(xy[:, 0], xy[:, 1], s=s, color=NA_COLOR, linewidths=0)
        elif cat:
            colors = palette_for(cats, palette, adata.uns.get(f"{k}_colors"))
            draw_categorical(a, xy, vals, cats, colors, size=s, legend_loc=lc, legend_title=k)
        else:
            # NaN (e.g. an unmeasured value) is drawn grey underneath, not dropped silently.
            ok = np.isfinite(vals)
            a.scatter(xy[~ok, 0], xy[~ok, 1], s=s, color=NA_COLOR, linewidths=0)
            order = np.argsort(vals[ok], kind="stable")  # high values on top, as scanpy
            sc = a.scatter(
                xy[ok][order, 0], xy[ok][order, 1], c=vals[ok][order], s=s, cmap=cmap, linewidths=0
            )
            cb = fig.colorbar(sc, ax=a, fraction=0.046, pad=0.02)
            cb.set_label(f"{k}" + (f" ({layer})" if layer and k in adata.var_names else ""), fontsize=8)
        a.set_title(t, fontsize=10)
        a.set_box_aspect(1.0)  # square panels as scanpy; a wide legend does not stretch the scatter
        a.set_xticks([])
        a.set_yticks([])
        a.set_xlabel(xlabel, fontsize=9)
        a.set_ylabel(ylabel, fontsize=9)
    save_if(fig, save)
    return fig


def embedding_panels(
    coords: Sequence[np.ndarray],
    titles: Sequence[str],
    labels: Sequence[str] | np.ndarray,
    *,
    save: PathLike | None = None,
    point_size: float = 6.0,
    legend: bool = True,
    axis_label: str = "UMAP",
):
    """Side-by-side 2-D scatter plots (e.g. UMAPs of two methods) coloured by the same categorical labels.

    One legend for all panels, outside on the right (the figure is widened to fit the longest label).

    Shape:
        coords: each ``[n, 2]``; labels: ``[n]``.
    """
    labs = np.asarray(labels).astype(str)
    cats = sorted(set(labs.tolist()))
    colors = palette_for(cats)
    extra = legend_width_in(cats) if legend else 0.0
    fig = new_figure((4.2 * len(coords) + extra, 4.2))
    axes = fig.subplots(1, len(coords), squeeze=False)[0]
    for a, xy, t in zip(axes, coords, titles):
        arr = np.asarray(xy, dtype=np.float64)
        if arr.ndim != 2 or arr.shape != (labs.shape[0], 2):
            msg = f"each coords entry must be [n={labs.shape[0]}, 2]; got {arr.shape}."
            raise MsfmInputError(msg)
        draw_categorical(a, arr, labs, cats, colors, size=point_size, legend_loc=None)
        a.set_title(t, fontsize=10)
        a.set_xticks([])
        a.set_yticks([])
        a.set_xlabel(f"{axis_label}1", fontsize=9)
        a.set_ylabel(f"{axis_label}2", fontsize=9)
    if legend:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(
            handles,
            names,
            loc="outside right center",
            fontsize=LEGEND_FONTSIZE,
            markerscale=max(1.0, 5.0 / math.sqrt(point_size)),
            frameon=False,
            ncol=legend_columns(cats),
        )
    save_if(fig, save)
    return fig
