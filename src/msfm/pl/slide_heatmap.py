"""Slide heatmaps from an AnnData of ROIs (scverse spatial layout): ``msfm.pl.slide_heatmap``.

The AnnData holds one observation per ROI, laid out like a scanpy/squidpy Visium object so that
``sc.pl.spatial`` also draws it:

* ``obsm["spatial"]``: the ROI **centre** ``(x, y)`` in level-0 pixels (scanpy draws spots at their centres);
* ``obs``: per-ROI values such as ``score`` (attention), ``percentile``, ``rank``, ``x``/``y`` (top-left corner);
* ``uns["spatial"][library_id]``: ``{"images": {"hires": thumbnail uint8 [h, w, 3]}, "scalefactors":
  {"tissue_hires_scalef": thumbnail pixels per level-0 pixel, "roi_size_level0": ROI side,
  "spot_diameter_fullres": ROI side}}``;
* ``uns["roam_heatmap"]`` (optional): ``slide_id``, ``class_shown``, ``predicted_class``, ``probabilities``.

The generic drawing (ROI squares rasterised over a thumbnail, normalised Gaussian blur) lives here too, so model
code draws through this module (``pl`` knows no model family).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from msfm.errors import MsfmInputError

if TYPE_CHECKING:
    import anndata

__all__ = ["rasterize_rois", "slide_heatmap", "smooth_field"]

PathLike = str | os.PathLike[str]

# Ratio max/min of the raw scores under which the map is called "nearly uniform" on the figure.
NEAR_UNIFORM_RATIO = 1.1

_SCALE_LABELS = {
    "percentile": "percentile of attention within this slide",
    "rank": "rank of attention within this slide (1 = highest)",
}


def rasterize_rois(
    shape: tuple[int, int], corners: np.ndarray, side: float, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fill each ROI's square on a pixel grid with its value; overlapping ROIs are averaged.

    Args:
        shape: ``(h, w)`` of the grid (the thumbnail).
        corners: Top-left ``(x, y)`` of every ROI in grid pixels (may be fractional).
        side: ROI side in grid pixels.
        values: One value per ROI.

    Returns:
        ``(field, covered)``: the averaged values (0 where no ROI) and the mask of covered pixels.

    Shape:
        corners: ``[K, 2]``; values: ``[K]`` -> field ``[h, w]`` float64, covered ``[h, w]`` bool.
    """
    h, w = int(shape[0]), int(shape[1])
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    for (x, y), v in zip(np.asarray(corners, dtype=np.float64), np.asarray(values, dtype=np.float64)):
        x0, y0 = round(x), round(y)
        x1, y1 = round(x + side), round(y + side)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 > x0 and y1 > y0:
            total[y0:y1, x0:x1] += v
            count[y0:y1, x0:x1] += 1.0
    covered = count > 0
    field = np.divide(total, count, out=np.zeros_like(total), where=covered)
    return field, covered


def smooth_field(field: np.ndarray, covered: np.ndarray, side: float) -> np.ndarray:
    """Normalised Gaussian smoothing (sigma = side / 4) of ``field`` over the covered pixels.

    Blurring ``field * covered`` and ``covered`` and dividing keeps values from fading toward uncovered
    pixels. It runs on a grid where an ROI is ~16 pixels wide and is upsampled bilinearly, so the cost does not
    grow with the ROI size in thumbnail pixels.

    Shape:
        field, covered: ``[h, w]`` -> ``[h, w]``.
    """
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    h, w = field.shape
    f = max(1.0, side / 16.0)
    sh, sw = max(1, round(h / f)), max(1, round(w / f))
    cov = covered.astype(np.float32)

    def down(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a.astype(np.float32)).resize((sw, sh), Image.Resampling.BOX))

    def up(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))

    sigma = max(side / f / 4.0, 0.5)
    num = up(gaussian_filter(down(field * cov).astype(np.float64), sigma))
    den = up(gaussian_filter(down(cov).astype(np.float64), sigma))
    ok = covered & (den > 1e-6)
    out = field.copy()
    out[ok] = num[ok] / den[ok]
    return out


def _library(adata: anndata.AnnData, library_id: str | None) -> tuple[str, dict[str, Any]]:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        msg = (
            "slide_heatmap needs adata.uns['spatial'][library_id] with the slide thumbnail (images/hires) and "
            "scalefactors; this AnnData has none. Use the rois.h5ad written by `msfm roam heatmap`."
        )
        raise MsfmInputError(msg)
    if library_id is None:
        if len(spatial) != 1:
            msg = (
                f"adata.uns['spatial'] holds several slides {sorted(spatial)}; pass library_id= one of them."
            )
            raise MsfmInputError(msg)
        library_id = next(iter(spatial))
    if library_id not in spatial:
        msg = f"library_id {library_id!r} is not in adata.uns['spatial']; it holds {sorted(spatial)}."
        raise MsfmInputError(msg)
    lib = spatial[library_id]
    image = (lib.get("images") or {}).get("hires")
    scale = lib.get("scalefactors") or {}
    if image is None or "tissue_hires_scalef" not in scale or "roi_size_level0" not in scale:
        msg = (
            f"adata.uns['spatial'][{library_id!r}] needs images/hires and scalefactors tissue_hires_scalef and "
            f"roi_size_level0; it has images {sorted(lib.get('images') or {})} and scalefactors {sorted(scale)}."
        )
        raise MsfmInputError(msg)
    return str(library_id), lib


def _obs_values(adata: anndata.AnnData, key: str) -> np.ndarray:
    if key not in adata.obs.columns:
        msg = f"color={key!r} is not a column of adata.obs; the columns are {list(map(str, adata.obs.columns))}."
        raise MsfmInputError(msg)
    try:
        return np.asarray(adata.obs[key], dtype=np.float64)
    except (TypeError, ValueError) as err:
        msg = f"adata.obs[{key!r}] must hold numbers to be drawn as a heatmap; got dtype {adata.obs[key].dtype}."
        raise MsfmInputError(msg) from err


def _raw_note(raw: np.ndarray) -> tuple[str, bool]:
    """The sentence stating the raw attention range, and whether the scores are nearly uniform."""
    raw = raw[np.isfinite(raw)]
    if raw.size == 0:
        return "", False
    lo, hi = float(raw.min()), float(raw.max())
    text = f"raw attention {lo:.4g} to {hi:.4g} over {raw.size} ROIs"
    if abs(float(raw.sum()) - 1.0) < 1e-3:
        text += f"; a uniform split would be {1.0 / raw.size:.4g} each"
    uniform = raw.size > 1 and lo > 0 and hi / lo < NEAR_UNIFORM_RATIO
    if uniform:
        text += (
            f"\nnearly uniform (max/min = {hi / lo:.3f}): the model weighs all ROIs about the same; "
            "colours exaggerate tiny differences"
        )
    return text, uniform


def _default_title(meta: dict[str, Any], library_id: str) -> str:
    slide = meta.get("slide_id", library_id)
    shown = meta.get("class_shown")
    if shown is None:
        return str(slide)
    predicted = meta.get("predicted_class")
    probs = meta.get("probabilities") or {}
    title = f"{slide}: attention for class {shown}"
    if predicted is not None:
        p = probs.get(predicted) if isinstance(probs, dict) else None
        title += f" (predicted {predicted}" + (f", p = {float(p):.2f})" if p is not None else ")")
    return title


def slide_heatmap(
    adata: anndata.AnnData,
    color: str = "percentile",
    *,
    library_id: str | None = None,
    alpha: float = 0.4,
    blur: bool = True,
    cmap: str = "jet",
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    save: PathLike | None = None,
):
    """Slide thumbnail and attention overlay side by side, with a labelled colour bar and the raw score range.

    Each ROI's square (``obsm["spatial"]`` centre, side ``roi_size_level0``) is filled with ``obs[color]`` over
    the thumbnail; overlaps are averaged, and ``blur`` smooths the field over covered pixels only. Under the
    panels the figure states the raw attention range (``obs["score"]``) and, when max/min < 1.1, that the
    attention is nearly uniform, so a full red-to-blue map does not pass for a strong signal.

    Args:
        adata: One observation per ROI in the layout of the module docstring (``rois.h5ad`` of ``msfm roam
            heatmap``).
        color: Column of ``obs`` to colour by (``percentile``, ``score`` or any numeric column).
        library_id: Key of ``uns["spatial"]`` (default: the only one).
        alpha: Opacity of the colours.
        blur: Smooth the field between ROIs.
        cmap: matplotlib colour map.
        vmin: Value at the bottom of the colour map (default 0 for percentiles, else the minimum).
        vmax: Value at the top (default 100 for percentiles, else the maximum).
        title: Figure title (default: slide, class shown, predicted class and its probability).
        save: Write the PNG here (atomically).

    Returns:
        The matplotlib ``Figure`` (axes: thumbnail, overlay, colour bar).
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from msfm.pl.figure import new_figure, save_figure
    from msfm.pl.slides import overlay_heatmap

    lib_id, lib = _library(adata, library_id)
    values = _obs_values(adata, color)
    if "spatial" not in adata.obsm:
        msg = "slide_heatmap needs adata.obsm['spatial'] (ROI centres in level-0 pixels); this AnnData has none."
        raise MsfmInputError(msg)
    centres = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if centres.ndim != 2 or centres.shape != (adata.n_obs, 2):
        msg = f"adata.obsm['spatial'] must be [n_obs, 2] = [{adata.n_obs}, 2]; got {centres.shape}."
        raise MsfmInputError(msg)
    if not 0.0 <= alpha <= 1.0:
        msg = f"alpha must be in [0, 1]; got {alpha}."
        raise MsfmInputError(msg)
    thumb = np.asarray(lib["images"]["hires"])
    if thumb.dtype != np.uint8:
        thumb = np.clip(thumb * (255.0 if thumb.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    thumb = thumb[..., :3]
    scalef = float(lib["scalefactors"]["tissue_hires_scalef"])
    size0 = float(lib["scalefactors"]["roi_size_level0"])
    side = size0 * scalef
    field, covered = rasterize_rois(thumb.shape[:2], (centres - size0 / 2.0) * scalef, side, values)
    if blur and covered.any():
        field = smooth_field(field, covered, side)
    finite = values[np.isfinite(values)]
    if color == "percentile":
        lo = 0.0 if vmin is None else float(vmin)
        hi = 100.0 if vmax is None else float(vmax)
    else:
        lo = float(finite.min()) if vmin is None and finite.size else float(vmin or 0.0)
        hi = float(finite.max()) if vmax is None and finite.size else float(vmax if vmax is not None else 1.0)
    overlay = overlay_heatmap(thumb, field, mask=covered, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)

    meta = dict(adata.uns.get("roam_heatmap") or {})
    n = adata.n_obs
    label = _SCALE_LABELS.get(color) or (
        f"attention (softmax over {n} ROIs)" if color == "score" else str(color)
    )
    raw = np.asarray(adata.obs["score"], dtype=np.float64) if "score" in adata.obs.columns else values
    note, uniform = _raw_note(raw)

    # Show the part of the thumbnail the ROIs cover (plus half an ROI), not the empty glass around it.
    h, w = thumb.shape[:2]
    ys, xs = np.nonzero(covered)
    pad = side / 2.0
    if xs.size:
        x0, x1 = max(xs.min() - pad, 0.0), min(xs.max() + 1 + pad, float(w))
        y0, y1 = max(ys.min() - pad, 0.0), min(ys.max() + 1 + pad, float(h))
    else:
        x0, x1, y0, y1 = 0.0, float(w), 0.0, float(h)
    vw, vh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    panel_h = 4.2
    panel_w = min(panel_h * vw / vh, 7.0)
    # Constrained layout keeps the title, colour bar label and note inside the saved PNG.
    fig = new_figure((2 * panel_w + 1.4, panel_w * vh / vw + 1.5))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, img, name in zip(axes, (thumb, overlay), ("slide", f"coloured by {color}")):
        ax.imshow(img)
        ax.set_xlim(x0 - 0.5, x1 - 0.5)
        ax.set_ylim(y1 - 0.5, y0 - 0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("0.75")
    sm = ScalarMappable(norm=Normalize(lo, hi), cmap=matplotlib.colormaps[cmap])
    bar = fig.colorbar(sm, ax=list(axes), fraction=0.03, pad=0.01, shrink=0.9)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title if title is not None else _default_title(meta, lib_id), fontsize=10)
    if note:
        fig.supxlabel(note, fontsize=8, x=0.01, ha="left", color="darkred" if uniform else "0.15")
    if save is not None:
        save_figure(fig, save, tight=False)  # constrained layout already fits everything
    return fig
