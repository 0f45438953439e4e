"""The quality-control picture of a preprocessed slide: thumbnail, tissue tint and outline, ROI rectangles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from msfm.runtime.atomic import atomic_write

__all__ = ["render_qc", "save_png"]


def render_qc(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    roi_size_level0: int,
    *,
    background: np.ndarray | None = None,
    title: str = "",
    max_size: int = 1024,
) -> Any:
    """Quality-control picture of one slide: thumbnail, tissue tint and outline, ROI rectangles.

    Args:
        thumbnail: uint8 RGB thumbnail.
        mask: Boolean tissue mask (resized to the thumbnail if needed).
        downsample: Level-0 pixels per thumbnail pixel.
        coords: Level-0 ``(x, y)`` of the ROIs.
        roi_size_level0: ROI side in level-0 pixels.
        background: Boolean per ROI: skipped as background (drawn grey instead of blue).
        title: Text drawn in the top-left corner.
        max_size: Longest side of the result.

    Returns:
        A PIL RGB image.

    Shape:
        thumbnail ``[h, w, 3]``, mask ``[h, w]``, coords ``[n, 2]``, background ``[n]``.
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    img = np.asarray(thumbnail, dtype=np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape[:2]:
        m = np.asarray(Image.fromarray(m).resize((img.shape[1], img.shape[0]), Image.Resampling.NEAREST))
    img[m] = 0.75 * img[m] + 0.25 * np.array([40.0, 200.0, 40.0])
    edge = m & ~ndimage.binary_erosion(m, iterations=max(1, round(max(img.shape[:2]) / 500)))
    img[edge] = (0.0, 130.0, 0.0)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    scale = min(1.0, max_size / max(out.size))
    if scale < 1.0:
        out = out.resize(
            (max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.BOX
        )
    draw = ImageDraw.Draw(out)
    f = scale / float(downsample)
    bg = np.zeros(len(coords), bool) if background is None else np.asarray(background, bool)
    width = max(1, round(max(out.size) / 400))
    for (x, y), is_bg in zip(np.asarray(coords).reshape(-1, 2), bg, strict=False):
        box = (x * f, y * f, (x + roi_size_level0) * f - 1, (y + roi_size_level0) * f - 1)
        draw.rectangle(box, outline=(150, 150, 150) if is_bg else (20, 80, 255), width=width)
    if title:
        draw.rectangle((0, 0, min(out.width, 8 + 7 * len(title)), 16), fill=(255, 255, 255))
        draw.text((4, 3), title, fill=(0, 0, 0))
    return out


def save_png(img: Any, path: Path) -> None:
    with atomic_write(path, "wb") as fh:
        img.save(fh, format="PNG")
