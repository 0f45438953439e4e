"""Resizing small attention maps to the image they are drawn on (shared by plots and interpretation code)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from msfm.errors import MsfmInputError

__all__ = ["map_size", "resize_map"]


def map_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` from one side or a pair, checked positive."""
    if isinstance(size, int | np.integer):
        size = (int(size), int(size))
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        msg = f"size must be positive (height, width); got {size}."
        raise MsfmInputError(msg)
    return h, w


def resize_map(m: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a small map to ``size`` (``align_corners=False``, i.e. pixel centres, like
    ``cv2.resize(..., INTER_LINEAR)`` which the release uses for upsampling).

    Shape:
        m: ``[h, w]`` -> ``[H, W]`` float32 with ``size = H`` or ``(H, W)``.
    """
    h, w = map_size(size)
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
