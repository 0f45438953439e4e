"""Regression metrics: Pearson (PCC), Spearman (SCC) correlation and root mean squared error (RMSE)."""

from __future__ import annotations

from typing import Any

import numpy as np

from msfm.errors import MsfmInputError

__all__ = ["regression_scores"]


def regression_scores(y_true: Any, y_pred: Any) -> dict[str, float]:
    """PCC, SCC and RMSE of predictions against the truth.

    A constant truth or prediction has no correlation: PCC/SCC are NaN then (RMSE is still defined).

    Args:
        y_true: ``[n]`` true values.
        y_pred: ``[n]`` predictions.

    Returns:
        ``{"pcc", "scc", "rmse", "n"}``.

    Raises:
        MsfmInputError: Different lengths, fewer than 2 values, or non-finite values.
    """
    from scipy.stats import pearsonr, spearmanr

    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        msg = f"y_true has {t.size} values and y_pred {p.size}; they must be paired."
        raise MsfmInputError(msg)
    if t.size < 2:
        msg = f"Regression scores need at least 2 values; got {t.size}."
        raise MsfmInputError(msg)
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        msg = "y_true and y_pred must be finite; drop NaN/inf values first."
        raise MsfmInputError(msg)
    constant = np.ptp(t) == 0 or np.ptp(p) == 0
    pcc = float("nan") if constant else float(pearsonr(t, p)[0])
    scc = float("nan") if constant else float(spearmanr(t, p)[0])
    rmse = float(np.sqrt(np.mean((t - p) ** 2)))
    return {"pcc": pcc, "scc": scc, "rmse": rmse, "n": int(t.size)}
