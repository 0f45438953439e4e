"""Windows of a section and the order of their cells: corner-sweep serialisation, tiles, window-relative positions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from msfm.errors import MsfmInputError
from msfm.tokenizers.spatial._inputs import (
    Bounds,
    _as_bounds,
    _as_rng,
    _as_sections,
    _as_xy,
    _positive_float,
    _positive_int,
)

__all__ = ["ORDERS", "Order", "Window", "normalize_positions", "serialize", "tile_windows", "window_cells"]

Order = Literal["corner_sweep", "random", "raster"]
ORDERS = ("corner_sweep", "random", "raster")
#: Corner id -> (use x1 instead of x0, use y1 instead of y0); counter-clockwise from (x0, y0).
_CORNERS = ((False, False), (True, False), (True, True), (False, True))


def serialize(
    xy: Any,
    *,
    order: Order = "corner_sweep",
    corner: int | None = None,
    jitter_um: float | None = None,
    bounds: Any = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Order the cells of a window into a sequence.

    ``corner_sweep`` (GeST's default): pick a corner of ``bounds`` (0 = (x0, y0), 1 = (x1, y0), 2 = (x1, y1),
    3 = (x0, y1); drawn from ``rng`` unless given), then sort the cells by ``d_i - jitter_um * G_i`` with ``d_i``
    the distance to the corner and ``G_i ~ Gumbel(0, 1)``. This draws the order without replacement with
    probabilities proportional to ``exp(-d_i / jitter_um)`` (Plackett-Luce via the Gumbel trick): a diagonal
    wavefront from the corner, with local shuffling. ``jitter_um=0`` is a pure distance sort (ties by index).
    ``random`` is a uniform permutation; ``raster`` sorts by y, then x, then index.

    Args:
        xy: Cell positions in micrometres.
        order: ``"corner_sweep"``, ``"random"`` or ``"raster"``.
        corner: Corner id 0..3 for ``corner_sweep``; None draws one.
        jitter_um: Gumbel scale in µm; None = 5 % of the window side (the longer side of ``bounds``).
        bounds: ``(x0, y0, x1, y1)`` of the window; default the bounding box of ``xy``.
        rng: A numpy Generator (advanced in place), a seed, or None (= seed 0, deterministic).

    Returns:
        The permutation: ``xy[perm]`` is the sequence.

    Raises:
        MsfmInputError: Unknown order, bad corner, negative jitter or malformed input.

    Shape:
        xy ``[n, 2]`` -> ``[n]`` int64.
    """
    xy = _as_xy(xy)
    if order not in ORDERS:
        msg = f"order={order!r}; expected one of {ORDERS}."
        raise MsfmInputError(msg)
    gen = _as_rng(rng)
    n = xy.shape[0]
    if order == "random":
        return gen.permutation(n).astype(np.int64)
    if order == "raster":
        return np.lexsort((np.arange(n), xy[:, 0], xy[:, 1])).astype(np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if bounds is None:
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        box = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    else:
        box = _as_bounds(bounds)
    if corner is None:
        corner = int(gen.integers(4))
    elif isinstance(corner, bool) or not isinstance(corner, int | np.integer) or not 0 <= int(corner) <= 3:
        msg = f"corner={corner!r}; expected 0 (x0, y0), 1 (x1, y0), 2 (x1, y1), 3 (x0, y1) or None (random)."
        raise MsfmInputError(msg)
    use_x1, use_y1 = _CORNERS[int(corner)]
    origin = np.array([box[2] if use_x1 else box[0], box[3] if use_y1 else box[1]])
    d = np.sqrt(((xy - origin) ** 2).sum(axis=1))
    jitter = 0.05 * max(box[2] - box[0], box[3] - box[1]) if jitter_um is None else float(jitter_um)
    if not math.isfinite(jitter) or jitter < 0:
        msg = f"jitter_um={jitter_um!r}; expected a non-negative number of micrometres (0 = no jitter)."
        raise MsfmInputError(msg)
    key = d - jitter * gen.gumbel(size=n) if jitter > 0 else d
    return np.argsort(key, kind="stable").astype(np.int64)


@dataclass(eq=False)
class Window:
    """A square crop of one section.

    Attributes:
        section: Section code of the window.
        bounds: ``(x0, y0, x1, y1)`` in micrometres; cells with ``x0 <= x < x1`` and ``y0 <= y < y1`` belong.
        cells: Indices into the full data, in serialised order (ascending for :func:`tile_windows`). Shape:
            ``[m]`` int64.
        anchor: The anchor cell a :class:`WindowSampler` drew the window around (-1 for tiles). With
            ``subsample="nearest"`` the anchor may have been dropped from ``cells``.
    """

    section: int
    bounds: Bounds
    cells: np.ndarray
    anchor: int = -1

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    @property
    def side(self) -> float:
        """The longer side of the window in micrometres."""
        return max(self.bounds[2] - self.bounds[0], self.bounds[3] - self.bounds[1])


def window_cells(xy: Any, bounds: Any) -> np.ndarray:
    """Indices of the cells inside ``bounds`` (half-open: ``x0 <= x < x1``, ``y0 <= y < y1``), ascending.

    Shape:
        xy ``[n, 2]`` -> ``[m]`` int64.
    """
    xy = _as_xy(xy)
    x0, y0, x1, y1 = _as_bounds(bounds)
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    return np.flatnonzero(inside).astype(np.int64)


def normalize_positions(xy: Any, bounds: Any) -> np.ndarray:
    """Window-relative positions: ``(xy - window centre) / side``, so the window maps to ``[-0.5, 0.5]^2``.

    The side is the longer side of ``bounds``, used for both axes (aspect ratio kept). Positions outside the
    window map outside ``[-0.5, 0.5]``.

    Raises:
        MsfmInputError: A window of zero size or malformed input.

    Shape:
        xy ``[n, 2]`` -> ``[n, 2]`` float32.
    """
    xy = _as_xy(xy)
    x0, y0, x1, y1 = _as_bounds(bounds)
    side = max(x1 - x0, y1 - y0)
    if side <= 0:
        msg = f"bounds={bounds!r} has zero size; positions cannot be normalised by a zero side."
        raise MsfmInputError(msg)
    centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    return ((xy - centre) / side).astype(np.float32)


def _edges(lo: float, hi: float, side: float, stride: float) -> tuple[np.ndarray, np.ndarray]:
    """Tile starts and ends along one axis so that ``[lo, hi]`` is covered.

    With ``stride == side`` each tile ends exactly where the next starts (same float), so half-open tiles
    partition the axis and every cell falls in exactly one tile.
    """
    count = math.floor((hi - lo) / stride) + 1
    while True:
        starts = lo + np.arange(count + 1) * stride
        ends = starts[1:] if stride == side else starts[:-1] + side
        if ends[-1] > hi:  # the last tile must contain the maximum (guards rounding in the division)
            return starts[:-1], ends
        count += 1


def tile_windows(
    coords: Any,
    side_um: float,
    *,
    stride_um: float | None = None,
    min_cells: int = 2,
    section: Any = None,
) -> list[Window]:
    """Cover every section with a grid of square windows (for evaluation and embedding).

    Each section's bounding box is tiled from its lower-left corner with the given stride; tiles with fewer than
    ``min_cells`` cells are dropped. With ``stride_um = side_um`` (default) every cell lies in exactly one tile
    (before dropping); a smaller stride gives overlapping tiles, a larger one leaves gaps.

    Args:
        coords: A :class:`~msfm.data.spatial.SpatialCoords`-like object (``.xy`` in µm and ``.section`` codes) or
            an ``[n, 2]`` array of positions in µm (then ``section`` gives the sections, default one).
        side_um: Tile side in micrometres.
        stride_um: Distance between tile starts; default ``side_um``.
        min_cells: Smallest number of cells a kept tile has.
        section: Section of each cell when ``coords`` is an array.

    Returns:
        Windows ordered by section, then row (y), then column (x); ``cells`` ascending.

    Raises:
        MsfmInputError: Non-positive side or stride, bad ``min_cells`` or malformed coordinates.
    """
    if hasattr(coords, "xy"):
        xy = _as_xy(coords.xy, "coords.xy")
        sections = _as_sections(getattr(coords, "section", None), xy.shape[0])
    else:
        xy = _as_xy(coords, "coords")
        sections = _as_sections(section, xy.shape[0])
    side = _positive_float(side_um, "side_um")
    stride = side if stride_um is None else _positive_float(stride_um, "stride_um")
    min_cells = _positive_int(min_cells, "min_cells")
    out: list[Window] = []
    for s in np.unique(sections):
        idx = np.flatnonzero(sections == s)
        sx, sy = xy[idx, 0], xy[idx, 1]
        x_starts, x_ends = _edges(float(sx.min()), float(sx.max()), side, stride)
        y_starts, y_ends = _edges(float(sy.min()), float(sy.max()), side, stride)
        # Sort by x once, then by y inside each column: every tile is a pair of searchsorted ranges, which matches
        # window_cells' half-open test exactly (side='left' on both ends).
        by_x = idx[np.argsort(sx, kind="stable")]
        xs = xy[by_x, 0]
        tiles: list[tuple[int, int, Window]] = []
        for ci, (xa, xb) in enumerate(zip(x_starts, x_ends)):
            col = by_x[np.searchsorted(xs, xa, "left") : np.searchsorted(xs, xb, "left")]
            if col.size < min_cells:
                continue
            col = col[np.argsort(xy[col, 1], kind="stable")]
            ys = xy[col, 1]
            for ri, (ya, yb) in enumerate(zip(y_starts, y_ends)):
                cells = col[np.searchsorted(ys, ya, "left") : np.searchsorted(ys, yb, "left")]
                if cells.size >= min_cells:
                    bounds = (float(xa), float(ya), float(xb), float(yb))
                    tiles.append((ri, ci, Window(int(s), bounds, np.sort(cells).astype(np.int64))))
        tiles.sort(key=lambda t: (t[0], t[1]))
        out.extend(t[2] for t in tiles)
    return out
