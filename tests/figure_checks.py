"""Checks on rendered matplotlib figures shared by the plot tests (legends that fit in the saved PNG)."""

from __future__ import annotations


def legend_problems(fig) -> list[str]:
    """Legend texts outside the saved (tight) image or lying on another axes (the cut-label symptom)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    saved = fig.get_tightbbox(r).transformed(fig.dpi_scale_trans)  # inches -> pixels
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    legends += [(None, lg) for lg in fig.legends]
    problems = []
    for owner, lg in legends:
        for text in lg.get_texts():
            box = text.get_window_extent(r)
            if not (saved.x0 - 1 <= box.x0 and box.x1 <= saved.x1 + 1 and saved.y0 - 1 <= box.y0):
                problems.append(f"{text.get_text()!r} outside the saved image")
            for other in fig.axes:
                if other is not owner and other.get_window_extent(r).overlaps(box):
                    problems.append(f"{text.get_text()!r} under another panel")
    return problems
