"""Plots for whole-slide images (matplotlib, headless): heatmap overlays, ROI galleries, ROI attention maps.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, so nothing leaks when many
slides are drawn in one process) and rendered with the Agg backend. Every function returns the ``Figure`` (or an
array for the pure drawing helpers); ``save=`` writes a PNG atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from msfm.errors import MsfmInputError
from msfm.pl.figure import new_figure, save_figure
from msfm.runtime.atomic import atomic_write_bytes

__all__ = [
    "colorize",
    "overlay_heatmap",
    "roi_gallery",
    "roi_maps_figure",
    "save_figure",
    "save_png",
    "slide_heatmap_figure",
]

PathLike = str | os.PathLike[str]


def save_png(image: np.ndarray, path: PathLike) -> Path:
    """Write an RGB(A) ``uint8`` image as a PNG atomically (the parent folder is created).

    Shape:
        image: ``[h, w, 3]`` or ``[h, w, 4]`` uint8.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        msg = f"save_png expects a uint8 [h, w, 3|4] image; got dtype {arr.dtype} and shape {arr.shape}."
        raise MsfmInputError(msg)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(target, buf.getvalue())


def colorize(
    values: np.ndarray, *, cmap: str = "jet", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Map scalar values to RGB colours with a matplotlib colour map.

    ``vmin``/``vmax`` default to the finite minimum and maximum of ``values``; a constant input maps to the
    middle of the colour map.

    Shape:
        values: ``[...]`` -> ``[..., 3]`` uint8.
    """
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin if vmin is not None else 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
    norm = np.full_like(v, 0.5) if hi <= lo else np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    norm = np.nan_to_num(norm, nan=0.0)
    rgba = matplotlib.colormaps[cmap](norm)
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay_heatmap(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    cmap: str = "jet",
    alpha: float = 0.4,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a colour-mapped heat map over an image: ``(1 - alpha) * image + alpha * colour`` where ``mask``.

    Args:
        image: The background (slide thumbnail or ROI).
        heat: Scalar values on the same pixel grid.
        mask: Where to draw (e.g. pixels covered by a scored ROI); None draws everywhere.
        cmap: matplotlib colour map name (``jet`` as in the ROAM/CLAM heatmaps).
        alpha: Opacity of the colour layer.
        vmin: Value mapped to the bottom of the colour map (default: minimum of ``heat`` inside ``mask``).
        vmax: Value mapped to the top (default: maximum inside ``mask``).

    Shape:
        image: ``[h, w, 3]`` uint8; heat, mask: ``[h, w]`` -> ``[h, w, 3]`` uint8.
    """
    img = np.asarray(image)
    h = np.asarray(heat, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != h.shape:
        msg = f"overlay_heatmap needs image [h, w, 3] and heat [h, w] of the same size; got {img.shape} and {h.shape}."
        raise MsfmInputError(msg)
    if not 0.0 <= alpha <= 1.0:
        msg = f"alpha must be in [0, 1]; got {alpha}."
        raise MsfmInputError(msg)
    m = np.ones(h.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    inside = h[m]
    if vmin is None:
        vmin = float(inside.min()) if inside.size else 0.0
    if vmax is None:
        vmax = float(inside.max()) if inside.size else 1.0
    colour = colorize(h, cmap=cmap, vmin=vmin, vmax=vmax).astype(np.float64)
    out = img.astype(np.float64)
    out[m] = (1.0 - alpha) * out[m] + alpha * colour[m]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def slide_heatmap_figure(
    overlay: np.ndarray,
    *,
    thumbnail: np.ndarray | None = None,
    title: str = "",
    cmap: str = "jet",
    vmin: float = 0.0,
    vmax: float = 1.0,
    label: str = "attention",
    save: PathLike | None = None,
):
    """The heatmap overlay with a colour bar, optionally next to the plain thumbnail.

    Shape:
        overlay, thumbnail: ``[h, w, 3]`` uint8.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    panels = [overlay] if thumbnail is None else [thumbnail, overlay]
    h, w = overlay.shape[:2]
    side = 5.0
    fig = new_figure((side * w / max(h, 1) * len(panels) + 1.2, side), constrained=False)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, img, name in zip(axes, panels, (["slide", "attention"] if len(panels) == 2 else ["attention"])):
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    sm = ScalarMappable(norm=Normalize(vmin, vmax), cmap=matplotlib.colormaps[cmap])
    fig.colorbar(sm, ax=list(axes), fraction=0.03, pad=0.02, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    if save is not None:
        save_figure(fig, save)
    return fig


def roi_gallery(
    images: Sequence[Sequence[np.ndarray]],
    titles: Sequence[Sequence[str]],
    *,
    row_labels: Sequence[str] | None = None,
    tile_inches: float = 1.9,
    title: str = "",
    save: PathLike | None = None,
):
    """A grid of ROI images: one row per group (top-k, bottom-k, one class ...), titles under each tile.

    Shape:
        images: rows of ``[h, w, 3]`` uint8 tiles (rows may differ in length).
    """
    if len(images) == 0 or all(len(r) == 0 for r in images):
        msg = "roi_gallery got no images; pass at least one row with one ROI image."
        raise MsfmInputError(msg)
    n_rows = len(images)
    n_cols = max(len(r) for r in images)
    # A fixed layout (no tight_layout pass, which is slow for many axes): margins in inches, then fractions.
    left_in, top_in, title_in = (0.35 if row_labels else 0.1), (0.45 if title else 0.15), 0.3
    width = tile_inches * n_cols + left_in + 0.1
    height = (tile_inches + title_in) * n_rows + top_in + 0.1
    fig = new_figure((width, height), constrained=False)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(
        left=left_in / width,
        right=1 - 0.1 / width,
        top=1 - top_in / height,
        bottom=0.1 / height,
        wspace=0.05,
        hspace=title_in / tile_inches,
    )
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images[i]):
                ax.imshow(images[i][j])
                ax.set_title(titles[i][j], fontsize=7)
            else:
                ax.set_axis_off()
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    if save is not None:
        save_figure(fig, save, tight=False)
    return fig


def roi_maps_figure(
    roi_image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    fused: np.ndarray,
    *,
    cmap: str = "jet",
    alpha: float = 0.3,
    title: str = "",
    save: PathLike | None = None,
):
    """An ROI next to its per-scale attention maps and the fused map, each drawn over the ROI.

    The coarse maps are resized to the ROI with bilinear interpolation for display; the fused map is drawn as
    given, normalised by its maximum (as the released ROI figures).

    Shape:
        roi_image: ``[h, w, 3]`` uint8; maps: ``{"20x": [8, 8], "10x": [4, 4], "5x": [2, 2]}``; fused: ``[h, w]``.
    """
    from msfm.pl.maps import resize_map

    img = np.asarray(roi_image)
    size = img.shape[:2]
    panels: list[tuple[str, np.ndarray]] = [("ROI", img)]
    for scale, m in maps.items():
        up = resize_map(m, size)
        panels.append(
            (f"{scale} ({m.shape[0]}x{m.shape[1]})", overlay_heatmap(img, up, cmap=cmap, alpha=alpha))
        )
    f = np.asarray(fused, dtype=np.float64)
    if f.shape != size:
        msg = f"fused map {f.shape} must have the ROI image size {size}."
        raise MsfmInputError(msg)
    peak = float(f.max()) if f.size else 0.0
    f = f / peak if peak > 0 else f
    panels.append(("fused", overlay_heatmap(img, f, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)))
    fig = new_figure((2.2 * len(panels) + 0.2, 2.9), constrained=False)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.78, wspace=0.06)
    for ax, (name, p) in zip(axes, panels):
        ax.imshow(p)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9, y=0.97, va="top")
    if save is not None:
        save_figure(fig, save, tight=False)
    return fig
