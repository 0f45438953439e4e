"""Tissue segmentation on a slide thumbnail: HSV saturation and brightness thresholds plus morphology.

H&E tissue is coloured (high saturation) while glass is white or grey (low saturation, high brightness), so a
saturation threshold finds tissue on any stain intensity; the brightness bounds drop glare and black ink/borders.
The steps, all on the thumbnail:

1. saturation ``S = 255 * (max - min) / max`` and brightness ``V = max`` of the RGB channels;
2. tissue = ``S > threshold`` (fixed, or Otsu's threshold of ``S`` with the fixed value as a floor) and
   ``min_brightness < V < max_brightness``, each test taken on the median-filtered channel (``median_size``
   pixels, to remove speckle; computed exactly as a majority vote of the thresholded channel, which is fast);
3. binary closing (``close_iterations`` of a 3x3 square; the image border is extended) to join nearby fragments;
4. holes up to ``max_hole_area_um2`` are filled (larger ones, such as lumens or tears, stay);
5. connected pieces smaller than ``min_tissue_area_um2`` are dropped.

Areas are in µm², converted with the thumbnail's own mpp, so the same parameters work for any thumbnail size or
scanner magnification. Without an mpp the fractions ``min_tissue_fraction`` / ``max_hole_fraction`` of the
thumbnail area are used instead.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from msfm.errors import MsfmInputError

__all__ = ["TISSUE_PRESETS", "TissueParams", "otsu_threshold", "segment_tissue", "tissue_fraction"]


class TissueParams(BaseModel):
    """Parameters of :func:`segment_tissue` (frozen; build variants with ``model_copy(update=...)``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    saturation_threshold: float = Field(8.0, ge=0, le=255, description="S threshold (0-255); Otsu's floor")
    use_otsu: bool = Field(
        False, description="threshold S with Otsu's method (never below saturation_threshold)"
    )
    min_brightness: float = Field(
        15.0, ge=0, le=255, description="darker pixels (ink, black borders) are not tissue"
    )
    max_brightness: float = Field(
        250.0, ge=0, le=256, description="brighter pixels (glare, glass) are not tissue"
    )
    median_size: int = Field(7, ge=1, description="median filter width in thumbnail pixels (odd; 1 = off)")
    close_iterations: int = Field(2, ge=0, description="binary closing iterations (3x3 square)")
    min_tissue_area_um2: float = Field(50_000.0, ge=0, description="smaller tissue pieces are dropped")
    max_hole_area_um2: float = Field(20_000.0, ge=0, description="holes up to this area are filled")
    min_tissue_fraction: float = Field(
        1e-3, ge=0, le=1, description="min piece area / thumbnail area (no mpp)"
    )
    max_hole_fraction: float = Field(
        5e-4, ge=0, le=1, description="max filled hole area / thumbnail area (no mpp)"
    )


#: Named parameter sets. ``biopsy`` keeps small fragments; ``resection`` uses Otsu and drops debris;
#: ``permissive`` keeps faint and small tissue (a first try when the default finds none).
TISSUE_PRESETS: dict[str, TissueParams] = {
    "default": TissueParams(),
    "biopsy": TissueParams(
        saturation_threshold=6.0,
        median_size=5,
        min_tissue_area_um2=5_000.0,
        max_hole_area_um2=5_000.0,
        min_tissue_fraction=1e-4,
        max_hole_fraction=1e-4,
    ),
    "resection": TissueParams(
        use_otsu=True,
        median_size=9,
        close_iterations=3,
        min_tissue_area_um2=200_000.0,
        max_hole_area_um2=100_000.0,
        min_tissue_fraction=5e-3,
        max_hole_fraction=2e-3,
    ),
    "permissive": TissueParams(
        saturation_threshold=5.0,
        max_brightness=254.0,
        min_brightness=5.0,
        median_size=5,
        close_iterations=2,
        min_tissue_area_um2=1_000.0,
        max_hole_area_um2=100_000.0,
        min_tissue_fraction=2e-5,
        max_hole_fraction=2e-3,
    ),
}


def _resolve(params: TissueParams | str) -> TissueParams:
    if isinstance(params, TissueParams):
        return params
    if isinstance(params, str) and params in TISSUE_PRESETS:
        return TISSUE_PRESETS[params]
    msg = (
        f"Unknown tissue preset {params!r}; use one of {', '.join(TISSUE_PRESETS)} or a TissueParams object."
    )
    raise MsfmInputError(msg)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (the cut that maximises the between-class variance).

    Args:
        values: uint8 array of any shape.

    Returns:
        The threshold t: the two classes are ``values <= t`` and ``values > t``. A constant input returns its value.
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0 * total) ** 2 / (w0 * w1)
    between[(w0 == 0) | (w1 == 0)] = -1.0
    if between.max() < 0:
        return float(np.flatnonzero(hist)[0])
    return float(np.argmax(between))


def _majority(mask: np.ndarray, size: int) -> np.ndarray:
    """Median filter of a binary image (odd window; the image border is extended)."""
    if size <= 1:
        return mask
    size = size if size % 2 else size + 1
    votes = ndimage.uniform_filter(mask.astype(np.float32), size=size, mode="nearest")
    return votes > 0.5


def _label_areas(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # 8-connectivity: diagonal neighbours belong to the same piece, as in contour-based tools.
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    return labels, areas


def segment_tissue(
    thumbnail: np.ndarray, *, mpp_thumb: float | None, params: TissueParams | str = "default"
) -> np.ndarray:
    """Tissue mask of a slide thumbnail.

    Args:
        thumbnail: uint8 RGB (or RGBA, composited on white) thumbnail.
        mpp_thumb: Microns per thumbnail pixel (slide mpp x thumbnail downsample); ``None`` switches the area
            filters to fractions of the thumbnail area.
        params: A :class:`TissueParams` or a preset name from :data:`TISSUE_PRESETS`.

    Returns:
        Boolean tissue mask.

    Shape:
        thumbnail ``[h, w, 3]`` -> mask ``[h, w]``.

    Raises:
        MsfmInputError: Wrong array shape/dtype, bad ``mpp_thumb`` or an unknown preset.
    """
    p = _resolve(params)
    arr = np.asarray(thumbnail)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8 or min(arr.shape[:2]) < 1:
        msg = (
            f"segment_tissue expects a uint8 RGB image [h, w, 3]; got dtype {arr.dtype} and shape {arr.shape}. "
            "Use Slide.thumbnail() or convert the image to 8-bit RGB."
        )
        raise MsfmInputError(msg)
    if mpp_thumb is not None and not (np.isfinite(mpp_thumb) and mpp_thumb > 0):
        msg = f"mpp_thumb={mpp_thumb!r} must be a positive number of microns per thumbnail pixel, or None."
        raise MsfmInputError(msg)
    if arr.shape[2] == 4:
        a = arr[:, :, 3:].astype(np.float32) / 255.0
        arr = np.rint(arr[:, :, :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)

    rgb = arr.astype(np.int16)
    vmax = rgb.max(axis=2)
    vmin = rgb.min(axis=2)
    sat = np.where(vmax > 0, (255 * (vmax - vmin)) // np.maximum(vmax, 1), 0).astype(np.uint8)

    threshold = p.saturation_threshold
    if p.use_otsu:
        threshold = max(threshold, otsu_threshold(sat))
    conditions = (sat > threshold, vmax > p.min_brightness, vmax < p.max_brightness)
    # Thresholding a median-filtered channel equals a majority vote over the window of the thresholded channel
    # (median > t  <=>  more than half of the values > t), and the vote is a fast box filter.
    mask = np.ones(sat.shape, bool)
    for cond in conditions:
        mask &= _majority(cond, p.median_size)

    if p.close_iterations > 0 and mask.any():
        # k closings with a 3x3 square = one closing with a (2k+1) square, done with separable max/min filters.
        # "nearest" extends the border, so tissue touching the edge is not eroded.
        size = 2 * p.close_iterations + 1
        mask = ndimage.minimum_filter(
            ndimage.maximum_filter(mask, size=size, mode="nearest"), size=size, mode="nearest"
        )

    if mpp_thumb is not None:
        px_area = float(mpp_thumb) ** 2
        max_hole_px = p.max_hole_area_um2 / px_area
        min_tissue_px = p.min_tissue_area_um2 / px_area
    else:
        n_px = mask.size
        max_hole_px = p.max_hole_fraction * n_px
        min_tissue_px = p.min_tissue_fraction * n_px

    if max_hole_px > 0 and mask.any():
        # Holes of an 8-connected foreground are the 4-connected background pieces that do not touch the border.
        labels, n = ndimage.label(~mask)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        fill = areas <= max_hole_px
        fill[0] = False
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        fill[border] = False
        mask = mask | fill[labels]

    if min_tissue_px > 0 and mask.any():
        labels, areas = _label_areas(mask)
        keep = areas >= min_tissue_px
        keep[0] = False
        mask = keep[labels]
    return mask.astype(bool, copy=False)


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction of mask pixels that are tissue."""
    return float(np.count_nonzero(mask)) / max(1, mask.size)
