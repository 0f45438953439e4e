"""Whole-slide image reading with one API whatever the backend: OpenSlide, tiffslide or a plain image.

:func:`open_slide` tries, in order, OpenSlide (the widest format support: Aperio SVS, Hamamatsu, MIRAX, Leica,
Philips, Ventana, DICOM, generic tiled TIFF), tiffslide (TIFF-based formats, also SubIFD pyramids that OpenSlide
ignores) and a plain-image backend (PNG/JPEG through PIL, non-pyramidal TIFF through tifffile). Every backend is
wrapped by the same :class:`Slide`, which returns numpy RGB arrays with transparent and out-of-slide areas white.

Microns per pixel (mpp) is the only reliable way to choose a magnification (pyramid levels are not magnifications).
It comes from ``openslide.mpp-x`` / ``tiffslide.mpp-x`` (which both derive it from the vendor metadata or the TIFF
resolution tags), then ``aperio.MPP``, then the TIFF ``XResolution``/``ResolutionUnit`` tags; a value given by the
user (``open_slide(path, mpp=...)``) always wins. PNG/JPEG files carry no usable mpp (their dpi is a screen
setting), so their mpp is ``None`` and :func:`require_mpp` asks for an override.

Example:
    >>> from msfm.data.slides import open_slide
    >>> with open_slide("slide.svs") as slide:  # doctest: +SKIP
    ...     tile = slide.read_region((1000, 2000), 0, (512, 512))  # uint8 [512, 512, 3]
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "SLIDE_EXTENSIONS", "Slide", "SlideReadError", "open_slide", "require_mpp"]

#: File extensions of whole-slide images and plain images msfm looks for in folders (lower case).
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
)

#: Backends in the order ``backend="auto"`` tries them.
BACKENDS = ("openslide", "tiffslide", "image")

#: mpp values outside this range are treated as absent: a 72-dpi TIFF tag means 352.8 µm/px, not a scan.
_MPP_RANGE = (0.01, 100.0)
#: Largest number of pixels read at once when a thumbnail is made from a single-level (non-pyramidal) image.
_THUMB_BAND_PIXELS = 32_000_000
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_TIFF_SUFFIXES = {".tif", ".tiff"}

PathLike = str | os.PathLike[str]


class SlideReadError(MsfmInputError):
    """A slide that is missing, unreadable, truncated or in an unsupported format (the message names the file)."""


# --------------------------------------------------------------------------------------------------------- readers
def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] from grey, RGB or RGBA input; alpha is composited on white (transparent = background)."""
    if arr.dtype != np.uint8:
        msg = f"expected 8-bit pixels, got dtype {arr.dtype}; convert the image to 8-bit RGB first."
        raise ValueError(msg)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 3:
        return arr
    if channels == 4:
        rgb, alpha = arr[:, :, :3], arr[:, :, 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        a = alpha.astype(np.float32) / 255.0
        out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    msg = f"expected 1, 3 or 4 channels, got {channels}."
    raise ValueError(msg)


class _OpenSlideReader:
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide  # lazy: the C library is only loaded when a slide is opened

        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {str(k): str(v) for k, v in self._slide.properties.items()}

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # OpenSlide pads outside the slide with transparent pixels: compositing on white handles both.
        img = self._slide.read_region(location, level, size)
        return _to_rgb(np.asarray(img))

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self.read_region((round(x * ds), round(y * ds)), level, (w, h))

    def close(self) -> None:
        self._slide.close()


class _TiffSlideReader:
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {str(k): str(v) for k, v in self._slide.properties.items() if v is not None}

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # In-bounds read in level coordinates. tiffslide maps a level-0 location to int(x0 / downsample): find the
        # level-0 value that lands exactly on x (float rounding can be one off either way).
        ds = self.level_downsamples[level]
        loc = []
        for v in (x, y):
            v0 = math.ceil(v * ds)
            for cand in (v0, v0 - 1, v0 + 1):
                if int(cand / ds) == v:
                    v0 = cand
                    break
            loc.append(v0)
        arr = self._slide.read_region((loc[0], loc[1]), level, (w, h), as_array=True, padding=False)
        return _to_rgb(np.asarray(arr))

    def close(self) -> None:
        self._slide.close()


class _ImageReader:
    """PNG/JPEG (PIL) or a plain TIFF page (tifffile), held in memory as one level."""

    name = "image"

    def __init__(self, path: Path) -> None:
        self.properties: dict[str, str] = {}
        if _is_tiff(path):
            self._arr = self._read_tiff(path)
        else:
            with Image.open(path) as img:
                img.load()  # decode now: a truncated PNG/JPEG fails here, not at the first read
                if img.mode not in ("RGB", "RGBA", "L", "LA"):
                    img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
                arr = np.asarray(img)
                if img.mode == "LA":
                    arr = np.concatenate([np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1:]], axis=2)
                self._arr = _to_rgb(arr)
                self.properties["image.format"] = str(img.format)
        h, w = self._arr.shape[:2]
        self.level_dimensions = ((int(w), int(h)),)
        self.level_downsamples = (1.0,)

    def _read_tiff(self, path: Path) -> np.ndarray:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            arr = page.asarray()
            if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
                arr = np.moveaxis(arr, 0, 2)  # planar (CYX) storage
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                per_unit = num / den if den else 0.0
                # mpp = length of the unit in microns / pixels per unit; unit 1 means "no absolute unit".
                um = {2: 25_400.0, 3: 10_000.0}.get(unit)
                if um is not None and per_unit > 0:
                    self.properties["tiff.mpp-x"] = repr(um / per_unit)
        return _to_rgb(np.asarray(arr))

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._arr[y : y + h, x : x + w]

    def close(self) -> None:
        self._arr = np.zeros((0, 0, 3), np.uint8)


_READERS: dict[str, type] = {
    "openslide": _OpenSlideReader,
    "tiffslide": _TiffSlideReader,
    "image": _ImageReader,
}


# --------------------------------------------------------------------------------------------------- the wrapper
@dataclass(eq=False)
class Slide:
    """An open slide; same API for every backend.

    Attributes:
        path: The slide file.
        backend: ``"openslide"``, ``"tiffslide"`` or ``"image"``.
        dimensions: ``(width, height)`` at level 0.
        level_count: Number of pyramid levels.
        level_dimensions: ``(width, height)`` of each level.
        level_downsamples: Downsample of each level relative to level 0.
        mpp: Microns per pixel at level 0 (``None`` when the file does not say and no override was given).
        objective_power: Scanner objective magnification when the file records it.
        mpp_source: Where ``mpp`` came from (a property name, ``"override"`` or ``None``).
        properties: The backend's metadata as strings.
    """

    path: Path
    backend: str
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    objective_power: float | None
    mpp_source: str | None = None
    properties: dict[str, str] = field(default_factory=dict, repr=False)
    _reader: Any = field(default=None, repr=False)

    def _check_level(self, level: int) -> None:
        if not isinstance(level, int | np.integer) or not 0 <= level < self.level_count:
            msg = f"level={level!r} is not a level of {self.path.name}; it has levels 0..{self.level_count - 1}."
            raise MsfmInputError(msg)

    def _read_level_clipped(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Region in level coordinates; the part outside the level is white."""
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        part = self._call("read_level", level, x0, y0, x1 - x0, y1 - y0)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = part
        return out

    def _call(self, method: str, *args: Any) -> np.ndarray:
        if self._reader is None:
            msg = f"The slide {self.path} is closed; open it again with msfm.data.slides.open_slide()."
            raise SlideReadError(msg)
        try:
            return getattr(self._reader, method)(*args)
        except SlideReadError:
            raise
        except (
            Exception
        ) as err:  # backend errors (corrupt tiles, I/O) become one error type that names the file
            msg = (
                f"Reading {self.path} with the {self.backend} backend failed ({type(err).__name__}: {err}); "
                f"request {args}. The file may be truncated or corrupt: check its size and copy it again."
            )
            raise SlideReadError(msg) from err

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region (OpenSlide convention).

        Args:
            location: ``(x, y)`` top-left in level-0 pixels (may lie outside the slide).
            level: Pyramid level to read from.
            size: ``(width, height)`` in pixels of that level.

        Returns:
            uint8 RGB array; transparent and out-of-slide areas are white.

        Shape:
            ``[height, width, 3]``.
        """
        self._check_level(level)
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            msg = f"size={size!r} must be two positive integers (width, height)."
            raise MsfmInputError(msg)
        x, y = (int(v) for v in location)
        if self.backend == "openslide":
            return self._call("read_region", (x, y), level, (w, h))
        ds = self.level_downsamples[level]
        return self._read_level_clipped(level, math.floor(x / ds), math.floor(y / ds), w, h)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The largest (coarsest) level whose downsample is <= ``downsample`` (0 if none is)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """Downsampled view of the whole slide whose longer side is ``max_size`` pixels (never upsampled).

        Read from the coarsest level that is still at least as fine as the thumbnail, in row bands, so a huge
        single-level image is never loaded at once.

        Args:
            max_size: Longest side of the thumbnail in pixels.

        Returns:
            ``(image, downsample)``: uint8 RGB ``[h, w, 3]`` and its downsample relative to level 0 (level-0
            coordinate = thumbnail coordinate * downsample).
        """
        if max_size < 1:
            msg = f"max_size={max_size} must be a positive number of pixels."
            raise MsfmInputError(msg)
        width, height = self.dimensions
        ds = max(1.0, max(width, height) / max_size)
        out_w, out_h = max(1, round(width / ds)), max(1, round(height / ds))
        level = self.best_level_for_downsample(ds)
        lw, lh = self.level_dimensions[level]
        if (lw, lh) == (out_w, out_h):
            return self._read_level_clipped(level, 0, 0, lw, lh), ds
        sy = lh / out_h
        band = max(1, int(_THUMB_BAND_PIXELS / max(1.0, lw * sy)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for o0 in range(0, out_h, band):
            o1 = min(out_h, o0 + band)
            r0, r1 = math.floor(o0 * sy), min(lh, math.ceil(o1 * sy))
            src = Image.fromarray(self._read_level_clipped(level, 0, r0, lw, r1 - r0))
            # The fractional box keeps band edges exact, so bands join without seams.
            part = src.resize((out_w, o1 - o0), Image.Resampling.BOX, box=(0, o0 * sy - r0, lw, o1 * sy - r0))
            out[o0:o1] = np.asarray(part)
        return out, ds

    def close(self) -> None:
        """Release the backend handle (reads afterwards raise :class:`SlideReadError`)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- metadata
def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _mpp_from_properties(props: dict[str, str], path: Path) -> tuple[float | None, str | None]:
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP", "tiff.mpp-x"):
        value = _float(props.get(key))
        if value is None:
            continue
        if not _MPP_RANGE[0] <= value <= _MPP_RANGE[1]:
            logger.warning(
                "%s: ignoring %s=%s (outside %s..%s µm/px, probably a screen-dpi tag); pass mpp= to set it.",
                path.name,
                key,
                value,
                *_MPP_RANGE,
            )
            continue
        y_key = key.replace("-x", "-y")
        y_value = _float(props.get(y_key)) if y_key != key else None
        if y_value is not None and abs(y_value - value) > 0.01 * value:
            logger.warning(
                "%s: non-square pixels (%s=%s, %s=%s); using the x value.",
                path.name,
                key,
                value,
                y_key,
                y_value,
            )
        return value, key
    return None, None


def _objective_from_properties(props: dict[str, str]) -> float | None:
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        value = _float(props.get(key))
        if value is not None:
            return value
    return None


# ---------------------------------------------------------------------------------------------- TIFF integrity
def _is_tiff(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_problem(path: Path) -> str | None:
    """Why a TIFF file is truncated or corrupt (IFD chain or image data past the end of the file), or None.

    Cheap: reads only the directory structure, never pixel data. It catches truncated copies that a backend may
    still open (tiffslide opens an SVS cut after its first directory and silently loses the others).
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
            bo = "<" if head[:2] == b"II" else ">"
            big = struct.unpack(bo + "H", head[2:4])[0] == 43
            # Classic TIFF: 4-byte offsets, 2-byte entry count, 12-byte entries. BigTIFF: 8, 8 and 20.
            count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
            count_size = struct.calcsize(count_fmt)
            (offset,) = struct.unpack(bo + "Q", head[8:16]) if big else struct.unpack(bo + "I", head[4:8])
            seen: set[int] = set()
            index = 0
            while offset:
                if offset in seen or index > 1_000_000:
                    return f"the directory chain loops (directory {index} at offset {offset})"
                seen.add(offset)
                if offset + count_size > size:
                    return (
                        f"directory {index} starts at byte {offset}, past the end of the file ({size} bytes)"
                    )
                fh.seek(offset)
                (n,) = struct.unpack(bo + count_fmt, fh.read(count_size))
                end = offset + count_size + n * entry_size + struct.calcsize(next_fmt)
                if end > size:
                    return f"directory {index} ends at byte {end}, past the end of the file ({size} bytes)"
                fh.seek(offset + count_size + n * entry_size)
                (offset,) = struct.unpack(bo + next_fmt, fh.read(struct.calcsize(next_fmt)))
                index += 1
    except (OSError, struct.error) as err:
        return f"its header cannot be parsed ({err})"
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if len(offsets):
                    end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False))
                    if end > size:
                        return f"image data of page {page.index} ends at byte {end}, past the end of the file ({size} bytes)"
    except Exception as err:  # tifffile may reject what the chain walk accepted
        return f"tifffile cannot parse it ({type(err).__name__}: {err})"
    return None


# --------------------------------------------------------------------------------------------------------- open
def open_slide(path: PathLike, *, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image or a plain image.

    Args:
        path: Slide file (SVS, NDPI, MRXS, SCN, tiled TIFF, ... or PNG/JPEG/TIFF).
        backend: ``"auto"`` (OpenSlide, then tiffslide, then the image backend), or one of :data:`BACKENDS`.
        mpp: Microns per pixel at level 0; overrides what the file says (use it for files without mpp).

    Returns:
        The open :class:`Slide` (use it as a context manager, or call :meth:`Slide.close`).

    Raises:
        SlideReadError: The file is missing, truncated, corrupt or no backend reads it; the message lists each
            backend tried and its error.
        MsfmInputError: Unknown backend or a non-positive ``mpp``.
    """
    path = Path(path)
    if backend != "auto" and backend not in BACKENDS:
        msg = f"backend={backend!r} is not supported; use 'auto' or one of {', '.join(BACKENDS)}."
        raise MsfmInputError(msg)
    if mpp is not None and not (_float(str(mpp)) and math.isfinite(float(mpp))):
        msg = f"mpp={mpp!r} must be a positive number of microns per pixel (e.g. 0.5 for a 20x scan)."
        raise MsfmInputError(msg)
    if not path.exists():
        msg = f"Slide file {path} does not exist. Check the path (relative paths start at {Path.cwd()})."
        raise SlideReadError(msg)
    if not path.is_file():
        msg = f"Slide path {path} is not a file. Pass a slide file, e.g. slide.svs or slide.tif."
        raise SlideReadError(msg)

    order = BACKENDS if backend == "auto" else (backend,)
    problem = _tiff_problem(path) if _is_tiff(path) else None
    errors: list[str] = []
    for name in order:
        try:
            reader = _READERS[name](path)
        except ImportError as err:
            errors.append(f"{name}: not installed ({err})")
            continue
        except Exception as err:  # each backend raises its own types; all mean "cannot read this file"
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if problem is not None:
            reader.close()
            errors.append(f"{name}: opened it, but the file is truncated or corrupt: {problem}")
            continue
        return _wrap(path, reader, mpp)
    size = path.stat().st_size
    kinds = "whole-slide formats (SVS, NDPI, MRXS, SCN, tiled pyramid TIFF, ...) or PNG/JPEG/TIFF images"
    structure = f" TIFF structure check: {problem}." if problem is not None else ""
    msg = (
        f"Cannot read the slide {path} ({size:,} bytes). Backends tried: {'; '.join(errors)}.{structure} Expected "
        f"one of the {kinds}. If the file was copied or downloaded, it may be incomplete: compare its size and "
        "checksum with the original."
    )
    raise SlideReadError(msg)


def _wrap(path: Path, reader: Any, mpp: float | None) -> Slide:
    props = dict(reader.properties)
    if mpp is not None:
        slide_mpp, source = float(mpp), "override"
    else:
        slide_mpp, source = _mpp_from_properties(props, path)
    dims = reader.level_dimensions
    return Slide(
        path=path,
        backend=reader.name,
        dimensions=dims[0],
        level_count=len(dims),
        level_dimensions=dims,
        level_downsamples=reader.level_downsamples,
        mpp=slide_mpp,
        objective_power=_objective_from_properties(props),
        mpp_source=source,
        properties=props,
        _reader=reader,
    )


def require_mpp(slide: Slide, override: float | None = None) -> float:
    """The slide's microns per pixel, or a clear error telling how to supply it.

    Args:
        slide: An open slide.
        override: A user value; wins over the slide's own metadata.

    Returns:
        Microns per pixel at level 0.

    Raises:
        MsfmInputError: Neither the slide nor ``override`` gives a positive mpp.
    """
    if override is not None:
        value = _float(str(override))
        if value is None:
            msg = f"mpp override {override!r} must be a positive number of microns per pixel (e.g. 0.5 for 20x)."
            raise MsfmInputError(msg)
        return value
    if slide.mpp is not None:
        return float(slide.mpp)
    msg = (
        f"The slide {slide.path} has no microns-per-pixel (mpp) metadata (backend {slide.backend}; PNG/JPEG files "
        "and many converted TIFFs carry none), so its magnification is unknown. Give the scan resolution: "
        "`--mpp 0.5` on the command line (0.5 for 20x, 0.25 for 40x scans), or open_slide(path, mpp=0.5) / "
        "require_mpp(slide, override=0.5) in Python."
    )
    raise MsfmInputError(msg)
