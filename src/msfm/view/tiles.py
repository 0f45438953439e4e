"""Deep-zoom tiles straight from a whole-slide image (OpenSlide's ``DeepZoomGenerator``, any msfm backend).

``DeepZoomGenerator`` only needs the OpenSlide reading API, so :class:`_OpenSlideAPI` presents an
:class:`msfm.data.slides.Slide` (OpenSlide, tiffslide or plain-image backend) that way. Each tile is read from the
pyramid level nearest its zoom, so a 100,000 x 100,000 slide costs one small region read per tile, never a level.
``limit_bounds`` is off so that deep-zoom pixel coordinates are level-0 pixel coordinates (the ROI boxes of
``rois.h5ad`` line up without an offset).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from msfm.errors import MsfmInputError

__all__ = ["TILE_FORMAT", "TILE_OVERLAP", "TILE_SIZE", "SlideTiles", "TileCache"]

TILE_SIZE = 254
TILE_OVERLAP = 1
TILE_FORMAT = "jpeg"
JPEG_QUALITY = 80


class _OpenSlideAPI:
    """The subset of ``openslide.OpenSlide`` that ``DeepZoomGenerator`` calls, over an msfm ``Slide``."""

    def __init__(self, slide: Any) -> None:
        self._slide = slide
        self.dimensions = tuple(slide.dimensions)
        self.level_count = slide.level_count
        self.level_dimensions = tuple(tuple(d) for d in slide.level_dimensions)
        self.level_downsamples = tuple(slide.level_downsamples)
        self.properties = dict(slide.properties)
        # Only one reader call at a time: tiffslide and PIL-backed readers are not documented as thread-safe.
        self._lock = threading.Lock()

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return int(self._slide.best_level_for_downsample(downsample))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        from PIL import Image

        with self._lock:
            rgb = self._slide.read_region(location, level, size)  # white outside the slide
        return Image.fromarray(rgb).convert("RGBA")


class SlideTiles:
    """Deep zoom of one slide file: the DZI description and JPEG tiles.

    Args:
        path: The slide file (opened lazily on first use and kept open).
        backend: ``auto`` or one backend of :data:`msfm.data.slides.BACKENDS`.
    """

    def __init__(self, path: Path, *, backend: str = "auto") -> None:
        self.path = Path(path)
        self.backend = backend
        self._dz: Any = None
        self._slide: Any = None
        self._open_lock = threading.Lock()

    def _generator(self) -> Any:
        with self._open_lock:
            if self._dz is None:
                from openslide.deepzoom import DeepZoomGenerator

                from msfm.data.slides import open_slide

                self._slide = open_slide(self.path, backend=self.backend)
                self._dz = DeepZoomGenerator(
                    _OpenSlideAPI(self._slide), tile_size=TILE_SIZE, overlap=TILE_OVERLAP, limit_bounds=False
                )
            return self._dz

    @property
    def slide(self) -> Any:
        """The open :class:`msfm.data.slides.Slide`."""
        self._generator()
        return self._slide

    def dzi(self) -> str:
        """The Deep Zoom XML OpenSeadragon reads."""
        return self._generator().get_dzi(TILE_FORMAT)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """One JPEG tile.

        Raises:
            MsfmInputError: ``level``/``col``/``row`` outside the pyramid.
        """
        dz = self._generator()
        if not 0 <= level < dz.level_count:
            msg = f"deep-zoom level {level} does not exist; levels are 0..{dz.level_count - 1}."
            raise MsfmInputError(msg)
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            msg = f"tile {col}_{row} is outside level {level}, which has {cols} x {rows} tiles."
            raise MsfmInputError(msg)
        img = dz.get_tile(level, (col, row))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def close(self) -> None:
        """Close the slide file."""
        if self._slide is not None:
            self._slide.close()
            self._slide, self._dz = None, None


class TileCache:
    """A thread-safe LRU of encoded tiles keyed by ``(slide id, level, col, row)``."""

    def __init__(self, max_tiles: int = 512) -> None:
        self.max_tiles = max_tiles
        self._items: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int, int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[str, int, int, int], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.max_tiles:
                self._items.popitem(last=False)
