"""Random training windows: :class:`WindowSampler`, a pure function of ``(seed, k)``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from msfm.errors import MsfmInputError
from msfm.tokenizers.spatial._inputs import (
    Bounds,
    _as_sections,
    _as_xy,
    _positive_float,
    _positive_int,
    _seed_int,
)
from msfm.tokenizers.spatial.windows import ORDERS, Order, Window, serialize

__all__ = ["Subsample", "WindowSampler"]

Subsample = Literal["random", "nearest"]


class _GridIndex:
    """Bucket cells by (section, grid cell of size ``side``) so a window query touches only ~4 buckets."""

    def __init__(self, xy: np.ndarray, sections: np.ndarray, cell: float):
        self.xy = xy
        self.cell = cell
        self.origin = xy.min(axis=0) if xy.shape[0] else np.zeros(2)
        g = np.floor((xy - self.origin) / cell).astype(np.int64)
        self.ny = int(g[:, 1].max()) + 1 if xy.shape[0] else 1
        self.nx = int(g[:, 0].max()) + 1 if xy.shape[0] else 1
        keys = (sections * self.nx + g[:, 0]) * self.ny + g[:, 1]
        self.order = np.argsort(keys, kind="stable")
        self.keys, self.starts = np.unique(keys[self.order], return_index=True)
        self.ends = np.append(self.starts[1:], keys.shape[0])

    def query(self, section: int, bounds: Bounds) -> np.ndarray:
        x0, y0, x1, y1 = bounds
        gx0, gy0 = np.floor((np.array([x0, y0]) - self.origin) / self.cell).astype(np.int64)
        gx1, gy1 = np.floor((np.array([x1, y1]) - self.origin) / self.cell).astype(np.int64)
        parts = []
        for gx in range(max(int(gx0), 0), min(int(gx1), self.nx - 1) + 1):
            for gy in range(max(int(gy0), 0), min(int(gy1), self.ny - 1) + 1):
                key = (section * self.nx + gx) * self.ny + gy
                pos = np.searchsorted(self.keys, key)
                if pos < self.keys.shape[0] and self.keys[pos] == key:
                    parts.append(self.order[self.starts[pos] : self.ends[pos]])
        if not parts:
            return np.zeros(0, dtype=np.int64)
        cand = np.concatenate(parts)
        p = self.xy[cand]
        inside = (p[:, 0] >= x0) & (p[:, 0] < x1) & (p[:, 1] >= y0) & (p[:, 1] < y1)
        return np.sort(cand[inside]).astype(np.int64)


class WindowSampler:
    """Random square windows for GeST training: a pure function of ``(seed, k)``.

    ``window(k)`` draws an anchor cell uniformly from the allowed ``cells``, places a square of side ``side_um``
    around it with the anchor uniformly inside (the window is not clipped to the tissue), keeps the cells of the
    anchor's section inside it, subsamples to ``max_cells`` if denser, and serialises them. A window with fewer
    than ``min_cells`` cells (a lone cell gives no (context, target) pair) is discarded and another anchor is drawn,
    up to ``max_tries`` times; then a :class:`~msfm.errors.MsfmInputError` says the data is too sparse.

    ``cells`` restricts the anchors only: a window may contain any cell of the anchor's section. To keep cells out
    of every window (a held-out region), subset ``xy``/``section`` before building the sampler.

    Args:
        xy: Cell positions in micrometres. Shape: ``[n, 2]``.
        section: Section code (or label) of each cell; None = one section. Shape: ``[n]``.
        side_um: Window side in micrometres (GeST default 600).
        max_cells: Most cells per window.
        order: Serialisation order (see :func:`serialize`).
        jitter_um: Corner-sweep jitter; None = 5 % of ``side_um``.
        subsample: ``"random"`` keeps a random subset that always includes the anchor; ``"nearest"`` keeps the
            ``max_cells`` cells nearest to the window centre (ties by index; the anchor may be dropped).
        min_cells: Smallest usable window.
        seed: Base seed; window ``k`` uses ``np.random.default_rng([seed, k])``.
        cells: Allowed anchor cells: indices or a boolean mask over the ``n`` cells; None = all.
        max_tries: Anchors tried per window before giving up.

    Raises:
        MsfmInputError: Malformed positions, sections or options.
    """

    def __init__(
        self,
        xy: Any,
        section: Any = None,
        *,
        side_um: float = 600.0,
        max_cells: int = 1024,
        order: Order = "corner_sweep",
        jitter_um: float | None = None,
        subsample: Subsample = "random",
        min_cells: int = 2,
        seed: int = 0,
        cells: Any = None,
        max_tries: int = 64,
    ):
        self.xy = _as_xy(xy)
        n = self.xy.shape[0]
        self.section = _as_sections(section, n)
        self.side_um = _positive_float(side_um, "side_um")
        self.max_cells = _positive_int(max_cells, "max_cells")
        self.min_cells = _positive_int(min_cells, "min_cells")
        if self.max_cells < self.min_cells:
            msg = f"max_cells={max_cells} is below min_cells={min_cells}; no window could be kept."
            raise MsfmInputError(msg)
        if order not in ORDERS:
            msg = f"order={order!r}; expected one of {ORDERS}."
            raise MsfmInputError(msg)
        self.order = order
        if subsample not in ("random", "nearest"):
            msg = f"subsample={subsample!r}; expected 'random' or 'nearest'."
            raise MsfmInputError(msg)
        self.subsample = subsample
        if jitter_um is not None and (not math.isfinite(float(jitter_um)) or float(jitter_um) < 0):
            msg = f"jitter_um={jitter_um!r}; expected a non-negative number of micrometres or None (5 % of side)."
            raise MsfmInputError(msg)
        self.jitter_um = 0.05 * self.side_um if jitter_um is None else float(jitter_um)
        self.seed = _seed_int(seed)
        self.max_tries = _positive_int(max_tries, "max_tries")
        self.cells = self._allowed(cells, n)
        self._index = _GridIndex(self.xy, self.section, self.side_um)

    @classmethod
    def from_coords(cls, coords: Any, **kwargs: Any) -> WindowSampler:
        """Build from a :class:`~msfm.data.spatial.SpatialCoords`-like object (``.xy`` µm, ``.section`` codes)."""
        return cls(coords.xy, getattr(coords, "section", None), **kwargs)

    @staticmethod
    def _allowed(cells: Any, n: int) -> np.ndarray:
        if cells is None:
            out = np.arange(n, dtype=np.int64)
        else:
            arr = np.asarray(cells)
            if arr.dtype == bool:
                if arr.shape != (n,):
                    msg = f"cells is a boolean mask of shape {arr.shape}; expected ({n},), one flag per cell."
                    raise MsfmInputError(msg)
                out = np.flatnonzero(arr).astype(np.int64)
            elif arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
                out = np.unique(arr.astype(np.int64))
                if out.size and (out[0] < 0 or out[-1] >= n):
                    msg = f"cells has indices outside 0..{n - 1} (min {out[0]}, max {out[-1]})."
                    raise MsfmInputError(msg)
            else:
                msg = f"cells has dtype {arr.dtype} and shape {arr.shape}; expected integer indices or a bool mask."
                raise MsfmInputError(msg)
        if out.size == 0:
            msg = "WindowSampler has no anchor cells (empty data or an empty `cells` selection)."
            raise MsfmInputError(msg)
        return out

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    def __iter__(self) -> Iterator[Window]:
        k = 0
        while True:
            yield self.window(k)
            k += 1

    def window(self, k: int) -> Window:
        """The ``k``-th window (deterministic in ``(seed, k)``).

        Raises:
            MsfmInputError: ``k`` is negative, or no anchor in ``max_tries`` gave ``min_cells`` cells.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 0:
            msg = f"window index k={k!r}; expected a non-negative integer."
            raise MsfmInputError(msg)
        rng = np.random.default_rng([self.seed, int(k)])
        side = self.side_um
        for _ in range(self.max_tries):
            anchor = int(self.cells[rng.integers(self.cells.shape[0])])
            ax, ay = self.xy[anchor]
            ux, uy = rng.random(2)
            x0, y0 = ax - ux * side, ay - uy * side
            bounds = (float(x0), float(y0), float(x0 + side), float(y0 + side))
            sec = int(self.section[anchor])
            members = self._index.query(sec, bounds)
            if not np.any(members == anchor):
                # Float rounding at the upper edge can drop the anchor; the anchor always belongs to its window.
                members = np.sort(np.append(members, anchor))
            if members.shape[0] < self.min_cells:
                continue
            if members.shape[0] > self.max_cells:
                members = self._subsample(members, anchor, bounds, rng)
            perm = serialize(
                self.xy[members], order=self.order, jitter_um=self.jitter_um, bounds=bounds, rng=rng
            )
            return Window(section=sec, bounds=bounds, cells=members[perm], anchor=anchor)
        msg = (
            f"WindowSampler found no window with at least {self.min_cells} cells after {self.max_tries} anchors "
            f"(side_um={side:g}): the data is too sparse for this window size. Use a larger side_um (for example "
            f"{2 * side:g}), check the coordinate unit (obsm positions must be in micrometres), or lower min_cells."
        )
        raise MsfmInputError(msg)

    def _subsample(
        self, members: np.ndarray, anchor: int, bounds: Bounds, rng: np.random.Generator
    ) -> np.ndarray:
        if self.subsample == "random":
            others = members[members != anchor]
            keep = rng.choice(others, size=self.max_cells - 1, replace=False)
            return np.sort(np.append(keep, anchor)).astype(np.int64)
        centre = np.array([(bounds[0] + bounds[2]) / 2.0, (bounds[1] + bounds[3]) / 2.0])
        d = ((self.xy[members] - centre) ** 2).sum(axis=1)
        return np.sort(members[np.argsort(d, kind="stable")[: self.max_cells]]).astype(np.int64)
