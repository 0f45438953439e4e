"""Confusion matrix of two label columns of an AnnData: ``msfm.pl.confusion_matrix``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import numpy as np

from msfm.errors import MsfmInputError

if TYPE_CHECKING:
    import anndata

__all__ = ["confusion_matrix", "confusion_table"]

PathLike = str | os.PathLike[str]
Normalize = Literal["true", "pred", "all"] | None


def confusion_table(
    true: np.ndarray, pred: np.ndarray, *, normalize: Normalize = "true"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Counts and normalised fractions of (true, predicted) label pairs.

    The labels are the sorted union of both columns, so a label seen in only one of them still gets its row and
    column (a predicted label no cell truly has is an all-zero row).

    Args:
        true: True label of each observation.
        pred: Predicted label of each observation.
        normalize: ``"true"``: each row sums to 1 (fraction of the cells of that true label); ``"pred"``: each
            column sums to 1; ``"all"``: the whole table sums to 1; None: the counts themselves. A row (column)
            without any cell is NaN.

    Returns:
        ``(labels, counts, fractions)``.

    Shape:
        true, pred: ``[n]`` -> counts ``[L, L]`` int64 (rows true, columns predicted), fractions ``[L, L]``.
    """
    t = np.asarray(true).astype(str)
    p = np.asarray(pred).astype(str)
    if t.shape != p.shape or t.ndim != 1:
        msg = f"true and pred must be 1-D of the same length; got shapes {t.shape} and {p.shape}."
        raise MsfmInputError(msg)
    if normalize not in ("true", "pred", "all", None):
        msg = f"normalize={normalize!r} is not supported; use 'true', 'pred', 'all' or None."
        raise MsfmInputError(msg)
    labels = sorted(set(t.tolist()) | set(p.tolist()))
    index = {lab: i for i, lab in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(counts, ([index[x] for x in t], [index[x] for x in p]), 1)
    c = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "true":
            frac = c / c.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            frac = c / c.sum(axis=0, keepdims=True)
        elif normalize == "all":
            frac = c / c.sum() if c.sum() else np.full_like(c, np.nan)
        else:
            frac = c
    return labels, counts, frac


def _column(adata: anndata.AnnData, key: str, role: str) -> np.ndarray:
    if key not in adata.obs.columns:
        msg = f"{role}={key!r} is not a column of adata.obs; the columns are {list(map(str, adata.obs.columns))}."
        raise MsfmInputError(msg)
    return adata.obs[key].astype(str).to_numpy()


_BAR_LABELS = {
    "true": "fraction of the cells of each true {t} (rows sum to 1)",
    "pred": "fraction of the cells of each predicted {p} (columns sum to 1)",
    "all": "fraction of all cells",
    None: "number of cells",
}


def confusion_matrix(
    adata: anndata.AnnData,
    true_key: str,
    pred_key: str,
    *,
    normalize: Normalize = "true",
    title: str | None = None,
    save: PathLike | None = None,
):
    """Heatmap of true against predicted labels: colours normalised, counts written in the cells.

    Args:
        adata: Observations with both label columns in ``obs``.
        true_key: Column of the true labels (rows).
        pred_key: Column of the predicted labels (columns).
        normalize: ``"true"`` (rows sum to 1, the default: per-class recall on the diagonal), ``"pred"``
            (columns sum to 1: precision), ``"all"`` or None (colours = counts).
        title: Figure title (default: accuracy and number of cells).
        save: Write the PNG here (atomically).

    Returns:
        The matplotlib ``Figure`` (axes: matrix, colour bar).

    Raises:
        MsfmInputError: A key is not a column of ``adata.obs`` or ``normalize`` is unknown.
    """
    import matplotlib

    from msfm.pl.figure import new_figure, save_figure

    true = _column(adata, true_key, "true_key")
    pred = _column(adata, pred_key, "pred_key")
    labels, counts, frac = confusion_table(true, pred, normalize=normalize)
    n = len(labels)
    longest = max((len(lab) for lab in labels), default=1)
    cell = 0.42 if n <= 12 else 0.3
    # Room for rotated tick labels: roughly 0.065 inch per character at fontsize 8.
    margin = min(0.4 + 0.065 * longest, 3.0)
    width = n * cell + margin + 1.6
    height = n * cell + margin + 0.9
    fig = new_figure((width, height), constrained=False)
    ax = fig.add_axes((margin / width, margin / height, n * cell / width, n * cell / height))
    cax = fig.add_axes(((margin + n * cell + 0.15) / width, margin / height, 0.15 / width, n * cell / height))
    # A row or column without cells is light grey, not "0 %".
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.92")
    vmax = 1.0 if normalize is not None else max(float(counts.max()), 1.0)
    im = ax.imshow(np.ma.masked_invalid(frac), cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal")
    fontsize = 8 if n <= 12 else 6
    for i in range(n):
        for j in range(n):
            v = frac[i, j]
            dark = np.isfinite(v) and v > 0.55 * vmax
            ax.text(
                j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=fontsize,
                color="white" if dark else "0.1",
            )  # fmt: skip
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel(f"predicted {pred_key}", fontsize=9)
    ax.set_ylabel(f"true {true_key}", fontsize=9)
    bar = fig.colorbar(im, cax=cax)
    bar.set_label(_BAR_LABELS[normalize].format(t=true_key, p=pred_key), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title is None:
        acc = float(np.mean(true == pred)) if len(true) else float("nan")
        title = f"{pred_key} vs {true_key}: accuracy {acc:.2f} over {len(true)} cells (numbers = cells)"
    ax.set_title(title, fontsize=9)
    if save is not None:
        save_figure(fig, save)
    return fig
