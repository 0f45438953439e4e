"""ROI planning on a whole slide and the 84-patch multi-scale pyramid that ROAM reads per ROI.

Magnification is chosen from microns per pixel, never from the pyramid level: an ROI is ``roi_size`` pixels at
``target_mpp`` (2048 px at 0.5 µm/px = 1,024 µm, the ROAM setting), so it spans
``roi_size_level0 = round(roi_size * target_mpp / slide_mpp)`` level-0 pixels: 2048 on a 20x (0.5 µm/px) slide,
4096 on a 40x (0.25 µm/px) slide. Each ROI is read from the coarsest pyramid level that is still at least as fine
as the target and resized to ``roi_size`` with PIL.

Token order of :func:`roi_pyramid` (what ROAM's pyramid transformer assumes): tokens 0..63 are the 20x patches
(the ROI cut into 8x8 patches of 256 px, row-major), 64..79 the 10x patches (ROI halved, 4x4, row-major), 80..83
the 5x patches (ROI quartered, 2x2, row-major). 10x token ``j = R*4 + C`` covers 20x tokens ``(2R+a)*8 + 2C+b``
for ``a, b`` in {0, 1}.

Example:
    >>> slide = open_slide("slide.svs")  # doctest: +SKIP
    >>> thumb, ds = slide.thumbnail(2048)  # doctest: +SKIP
    >>> mask = segment_tissue(thumb, mpp_thumb=slide.mpp * ds)  # doctest: +SKIP
    >>> grid = plan_rois(slide, mask, ds, slide_mpp=slide.mpp)  # doctest: +SKIP
    >>> patches = roi_pyramid(read_roi(slide, grid, 0))  # uint8 [84, 256, 256, 3]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from msfm.data.slides import Slide
from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = [
    "TOKEN_SLICES",
    "NoTissueError",
    "RoiGrid",
    "SlideTooSmallError",
    "is_background_roi",
    "n_pyramid_tokens",
    "plan_rois",
    "read_roi",
    "roi_pyramid",
]

#: Token ranges of each magnification in a 2048-px ROI pyramid (patch 256, 3 scales).
TOKEN_SLICES = {"20x": slice(0, 64), "10x": slice(64, 80), "5x": slice(80, 84)}


class SlideTooSmallError(MsfmInputError):
    """The slide is smaller than one ROI at the requested magnification."""


class NoTissueError(MsfmInputError):
    """No ROI of the slide holds enough tissue."""


@dataclass
class RoiGrid:
    """The ROIs chosen on one slide.

    Attributes:
        coords: int64 ``[n, 2]`` level-0 ``(x, y)`` top-left corners, row-major scan order (y, then x).
        tissue_fraction: float32 ``[n]`` fraction of each ROI covered by the tissue mask.
        roi_size_level0: ROI side in level-0 pixels (``round(roi_size * target_mpp / slide_mpp)``).
        roi_size: ROI side at the target magnification.
        target_mpp: Microns per pixel of the ROIs as returned by :func:`read_roi`.
        slide_mpp: Microns per pixel of the slide's level 0.
        read_level: Pyramid level the ROIs are read from.
        grid_shape: ``(rows, cols)`` of the full candidate grid (with and without tissue), for heatmaps.
        grid_index: int64 ``[n, 2]`` ``(row, col)`` of each ROI in the candidate grid.
        origin: Level-0 ``(x, y)`` of the candidate grid's first cell (the grid is centred on the slide).
        step_level0: Distance between neighbouring candidates in level-0 pixels.
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    roi_size_level0: int
    roi_size: int
    target_mpp: float
    slide_mpp: float
    read_level: int
    grid_shape: tuple[int, int]
    grid_index: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    origin: tuple[int, int] = (0, 0)
    step_level0: int = 0

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _integral(mask: np.ndarray) -> np.ndarray:
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    out[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    return out


def plan_rois(
    slide: Slide,
    tissue_mask: np.ndarray,
    mask_downsample: float,
    *,
    slide_mpp: float,
    target_mpp: float = 0.5,
    roi_size: int = 2048,
    step: int | None = None,
    min_tissue: float = 0.1,
) -> RoiGrid:
    """Lay a grid of ROIs over level 0 and keep those with enough tissue.

    The grid covers whole ROIs only (no padding) and is centred on the slide, so the unused margin is split
    evenly between the sides.

    Args:
        slide: The open slide.
        tissue_mask: Boolean tissue mask of the whole slide (e.g. from :func:`msfm.data.tissue.segment_tissue`).
        mask_downsample: Level-0 pixels per mask pixel (the thumbnail's downsample).
        slide_mpp: Microns per level-0 pixel (see :func:`msfm.data.slides.require_mpp`).
        target_mpp: Microns per pixel of the ROIs (0.5 = 20x).
        roi_size: ROI side in pixels at ``target_mpp``.
        step: Distance between ROIs in pixels at ``target_mpp`` (default ``roi_size``: no overlap).
        min_tissue: Smallest tissue fraction an ROI needs.

    Returns:
        The :class:`RoiGrid` (``n = 0`` when no ROI has enough tissue; the pipeline reports that as
        :class:`NoTissueError`).

    Shape:
        tissue_mask ``[h, w]`` with ``h * mask_downsample ~ slide height``, ``w * mask_downsample ~ slide width``.

    Raises:
        SlideTooSmallError: The slide is smaller than one ROI.
        MsfmInputError: Invalid sizes, mpp values or a mask that does not match the slide.
    """
    for name, value in (
        ("slide_mpp", slide_mpp),
        ("target_mpp", target_mpp),
        ("mask_downsample", mask_downsample),
    ):
        if value is None or not (math.isfinite(float(value)) and float(value) > 0):
            msg = f"plan_rois: {name}={value!r} must be a positive number."
            raise MsfmInputError(msg)
    if int(roi_size) < 1 or (step is not None and int(step) < 1):
        msg = f"plan_rois: roi_size={roi_size!r} and step={step!r} must be positive pixel counts."
        raise MsfmInputError(msg)
    if not 0.0 <= min_tissue <= 1.0:
        msg = f"plan_rois: min_tissue={min_tissue!r} must be a fraction in [0, 1]."
        raise MsfmInputError(msg)
    mask = np.asarray(tissue_mask).astype(bool, copy=False)
    width, height = slide.dimensions
    if mask.ndim != 2:
        msg = f"plan_rois: tissue_mask must be a 2-D boolean array [h, w]; got shape {mask.shape}."
        raise MsfmInputError(msg)
    exp_w, exp_h = width / mask_downsample, height / mask_downsample
    if abs(mask.shape[1] - exp_w) > max(2.0, 0.02 * exp_w) or abs(mask.shape[0] - exp_h) > max(
        2.0, 0.02 * exp_h
    ):
        msg = (
            f"plan_rois: the tissue mask ({mask.shape[1]} x {mask.shape[0]} px at downsample {mask_downsample:.4g}) "
            f"does not cover the slide {slide.path.name} ({width} x {height} px; expected about "
            f"{exp_w:.0f} x {exp_h:.0f} mask px). Pass the mask and the downsample of this slide's thumbnail."
        )
        raise MsfmInputError(msg)

    ratio = float(target_mpp) / float(slide_mpp)
    roi0 = round(int(roi_size) * ratio)
    step0 = roi0 if step is None else max(1, round(int(step) * ratio))
    if roi0 < 1:
        msg = f"plan_rois: an ROI of {roi_size} px at {target_mpp} µm/px is below one pixel of this slide."
        raise MsfmInputError(msg)
    if ratio < 1.0:
        logger.warning(
            "%s: target %.3g µm/px is finer than the scan (%.3g µm/px); ROIs will be upsampled %.2fx.",
            slide.path.name,
            target_mpp,
            slide_mpp,
            1.0 / ratio,
        )
    if width < roi0 or height < roi0:
        roi_um = roi0 * slide_mpp
        msg = (
            f"Slide {slide.path.name} is {width * slide_mpp:,.0f} x {height * slide_mpp:,.0f} µm ({width} x {height} px "
            f"at {slide_mpp:.4g} µm/px), smaller than one ROI of {roi_um:,.0f} x {roi_um:,.0f} µm ({roi_size} px at "
            f"{target_mpp:.4g} µm/px). Use a smaller ROI size (e.g. roi_size={roi_size // 2}) or, if the slide's mpp "
            "is wrong, override it (--mpp)."
        )
        raise SlideTooSmallError(msg)

    cols = 1 + (width - roi0) // step0
    rows = 1 + (height - roi0) // step0
    ox = (width - ((cols - 1) * step0 + roi0)) // 2
    oy = (height - ((rows - 1) * step0 + roi0)) // 2
    ys = oy + np.arange(rows, dtype=np.int64) * step0
    xs = ox + np.arange(cols, dtype=np.int64) * step0

    # Tissue fraction of every candidate from the mask's summed-area table (mask pixels the ROI footprint covers).
    integral = _integral(mask)
    mh, mw = mask.shape

    def bounds(v0: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.clip(np.floor(v0 / mask_downsample).astype(np.int64), 0, limit)
        b = np.clip(np.ceil((v0 + roi0) / mask_downsample).astype(np.int64), 0, limit)
        return a, np.maximum(b, np.minimum(a + 1, limit))

    x_a, x_b = bounds(xs.astype(np.float64), mw)
    y_a, y_b = bounds(ys.astype(np.float64), mh)
    ya, xa = np.meshgrid(y_a, x_a, indexing="ij")
    yb, xb = np.meshgrid(y_b, x_b, indexing="ij")
    total = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
    area = np.maximum((yb - ya) * (xb - xa), 1)
    fraction = (total / area).astype(np.float32)

    keep_r, keep_c = np.nonzero(fraction >= min_tissue)  # row-major: y first, then x
    coords = np.stack([xs[keep_c], ys[keep_r]], axis=1).astype(np.int64).reshape(-1, 2)
    return RoiGrid(
        coords=coords,
        tissue_fraction=fraction[keep_r, keep_c].astype(np.float32),
        roi_size_level0=int(roi0),
        roi_size=int(roi_size),
        target_mpp=float(target_mpp),
        slide_mpp=float(slide_mpp),
        read_level=slide.best_level_for_downsample(roi0 / int(roi_size)),
        grid_shape=(int(rows), int(cols)),
        grid_index=np.stack([keep_r, keep_c], axis=1).astype(np.int64).reshape(-1, 2),
        origin=(int(ox), int(oy)),
        step_level0=int(step0),
    )


def read_roi(slide: Slide, grid: RoiGrid, i: int) -> np.ndarray:
    """Read ROI ``i`` of ``grid`` at the target magnification.

    Reads the ROI's footprint from ``grid.read_level`` and resizes it to ``roi_size`` with PIL (box filter when
    shrinking, bilinear when enlarging).

    Args:
        slide: The slide the grid was planned on.
        grid: From :func:`plan_rois`.
        i: ROI index in ``grid.coords``.

    Returns:
        uint8 RGB ROI.

    Shape:
        ``[roi_size, roi_size, 3]``.
    """
    n = len(grid)
    if not -n <= i < n:
        msg = f"read_roi: ROI index {i} is out of range; the grid has {n} ROIs."
        raise MsfmInputError(msg)
    x, y = (int(v) for v in grid.coords[i])
    level = grid.read_level
    ds = slide.level_downsamples[level]
    side = max(1, round(grid.roi_size_level0 / ds))
    region = slide.read_region((x, y), level, (side, side))
    if side == grid.roi_size:
        return region
    resample = Image.Resampling.BOX if side > grid.roi_size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(region).resize((grid.roi_size, grid.roi_size), resample))


def n_pyramid_tokens(roi_size: int = 2048, patch_size: int = 256, n_scales: int = 3) -> int:
    """Tokens per ROI: ``sum_s (roi_size / 2**s / patch_size)**2`` (84 for 2048/256/3; 21 for 1024/256/3)."""
    return sum((roi_size // (2**s) // patch_size) ** 2 for s in range(n_scales))


def roi_pyramid(roi: np.ndarray, *, patch_size: int = 256, n_scales: int = 3) -> np.ndarray:
    """Cut one ROI into the multi-scale patch stack, finest scale first, each scale row-major.

    Scale ``s`` is the ROI shrunk by ``2**s`` (exact ``2**s x 2**s`` pixel averages, PIL ``reduce``) and cut into
    ``patch_size`` patches. The ROI side must be divisible by ``patch_size * 2**(n_scales - 1)`` so that every
    scale tiles exactly (2048 with 256-px patches and 3 scales: 64 + 16 + 4 = 84 tokens; 1024: 16 + 4 + 1 = 21).

    Args:
        roi: uint8 RGB ROI.
        patch_size: Patch side in pixels.
        n_scales: Number of scales (3 = 20x, 10x, 5x for a 20x ROI).

    Returns:
        uint8 patch stack.

    Shape:
        roi ``[R, R, 3]`` -> ``[sum_s (R / 2**s / patch_size)**2, patch_size, patch_size, 3]``.
    """
    arr = np.asarray(roi)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] != arr.shape[1] or arr.dtype != np.uint8:
        msg = (
            f"roi_pyramid expects a square uint8 RGB ROI [R, R, 3]; got dtype {arr.dtype}, shape {arr.shape}."
        )
        raise MsfmInputError(msg)
    if patch_size < 1 or n_scales < 1:
        msg = f"roi_pyramid: patch_size={patch_size} and n_scales={n_scales} must be positive."
        raise MsfmInputError(msg)
    side = arr.shape[0]
    unit = patch_size * 2 ** (n_scales - 1)
    if side % unit:
        msg = (
            f"roi_pyramid: ROI side {side} is not divisible by patch_size * 2**(n_scales-1) = {unit}, so the "
            f"coarsest scale would not tile into whole patches. Use an ROI size that is a multiple of {unit} "
            f"(e.g. 2048 or 1024 for 256-px patches and 3 scales) or fewer scales."
        )
        raise MsfmInputError(msg)
    out = []
    img = Image.fromarray(arr)
    for s in range(n_scales):
        scaled = arr if s == 0 else np.asarray(img.reduce(2**s))
        g = scaled.shape[0] // patch_size
        # [g*p, g*p, 3] -> [g, p, g, p, 3] -> [g(row), g(col), p, p, 3]: row-major token order.
        out.append(
            scaled.reshape(g, patch_size, g, patch_size, 3)
            .transpose(0, 2, 1, 3, 4)
            .reshape(-1, patch_size, patch_size, 3)
        )
    return np.ascontiguousarray(np.concatenate(out, axis=0))


def is_background_roi(roi: np.ndarray, min_std: float = 5.0) -> bool:
    """True when the ROI's red channel is nearly flat (std below ``min_std``): blank glass, no tissue."""
    arr = np.asarray(roi)
    if arr.ndim != 3 or arr.shape[2] < 3:
        msg = f"is_background_roi expects an RGB image [h, w, 3]; got shape {arr.shape}."
        raise MsfmInputError(msg)
    return float(arr[:, :, 0].std()) < float(min_std)
