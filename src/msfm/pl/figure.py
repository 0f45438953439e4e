"""Figures without pyplot state, and their atomic PNG writer: the one place every ``msfm.pl`` plot builds and saves.

Figures are :class:`matplotlib.figure.Figure` objects with an Agg canvas, never registered with pyplot, so
nothing accumulates when a loop draws many of them (pyplot keeps every open figure until it is closed).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from msfm.runtime.atomic import atomic_write_bytes

__all__ = ["new_figure", "save_figure"]


def new_figure(figsize: tuple[float, float], *, constrained: bool = True):
    """A figure with an Agg canvas; ``constrained`` layout gives outside legends and colour bars their room."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike[str], *, dpi: int = 130, tight: bool = True) -> Path:
    """Render ``fig`` to PNG and write it atomically (the parent folder is created).

    ``tight=False`` skips the tight bounding box (an extra layout pass that is slow for grids of many axes).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return atomic_write_bytes(target, buf.getvalue())
