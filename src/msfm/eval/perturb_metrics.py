"""Perturbation-response metrics and the three baselines every perturbation model is compared with.

All profiles are mean log-normalised expression over one gene list. The delta of a profile is its difference to
the control mean of the same group. Top-20 DE genes are ranked by ``|true mean delta|`` (the absolute difference of
the perturbed and control means; GEARS ranks by a t-test, which for well-powered groups picks nearly the same
genes and needs no per-cell data here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from msfm.errors import MsfmInputError

__all__ = [
    "METRICS",
    "additive_linear",
    "mean_shift",
    "no_change",
    "pearson",
    "perturbation_metrics",
    "top_de_genes",
]

#: The metric columns of :func:`perturbation_metrics`, in table order.
METRICS = (
    "mse_top20_de",
    "pearson_top20_de",
    "pearson_delta",
    "pearson_delta_top20_de",
    "direction_acc_top20_de",
)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant (e.g. the zero delta of ``no_change``)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    den = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def top_de_genes(true_mean: np.ndarray, control_mean: np.ndarray, n: int = 20) -> np.ndarray:
    """Positions of the ``n`` genes with the largest ``|true_mean - control_mean|`` (ties by position)."""
    delta = np.abs(np.asarray(true_mean, dtype=np.float64) - np.asarray(control_mean, dtype=np.float64))
    return np.argsort(-delta, kind="stable")[: min(n, len(delta))]


def perturbation_metrics(
    pred_mean: np.ndarray, true_mean: np.ndarray, control_mean: np.ndarray, *, n_de: int = 20
) -> dict[str, float]:
    """The five metrics of one ``(condition, group)``.

    Returns:
        ``mse_top20_de`` and ``pearson_top20_de`` (predicted vs true mean on the top DE genes),
        ``pearson_delta`` (of the deltas over all genes), ``pearson_delta_top20_de`` (deltas on the top DE genes),
        ``direction_acc_top20_de`` (share of top DE genes whose delta has the true sign).

    Shape:
        pred_mean, true_mean, control_mean: ``[genes]``.
    """
    pred, true, ctrl = (np.asarray(v, dtype=np.float64) for v in (pred_mean, true_mean, control_mean))
    if not pred.shape == true.shape == ctrl.shape or pred.ndim != 1:
        msg = f"profiles must be 1-D of one length; got {pred.shape}, {true.shape}, {ctrl.shape}."
        raise MsfmInputError(msg)
    de = top_de_genes(true, ctrl, n_de)
    dp, dt = pred - ctrl, true - ctrl
    return {
        "mse_top20_de": float(np.mean((pred[de] - true[de]) ** 2)),
        "pearson_top20_de": pearson(pred[de], true[de]),
        "pearson_delta": pearson(dp, dt),
        "pearson_delta_top20_de": pearson(dp[de], dt[de]),
        "direction_acc_top20_de": float(np.mean(np.sign(dp[de]) == np.sign(dt[de]))),
    }


def no_change(control_mean: np.ndarray) -> np.ndarray:
    """Baseline: the perturbed profile equals the control mean."""
    return np.asarray(control_mean, dtype=np.float64).copy()


def mean_shift(control_mean: np.ndarray, train_deltas: np.ndarray) -> np.ndarray:
    """Baseline: the control mean plus the mean delta over all training perturbations.

    Shape:
        control_mean ``[genes]``, train_deltas ``[k, genes]`` -> ``[genes]``.
    """
    deltas = np.asarray(train_deltas, dtype=np.float64)
    if deltas.ndim != 2 or deltas.shape[0] == 0:
        msg = f"train_deltas must be [k >= 1, genes]; got shape {deltas.shape}."
        raise MsfmInputError(msg)
    return np.asarray(control_mean, dtype=np.float64) + deltas.mean(0)


def additive_linear(
    control_mean: np.ndarray,
    train_tokens: Sequence[Sequence[str]],
    train_deltas: np.ndarray,
    target_tokens: Sequence[str],
    *,
    ridge: float = 1e-3,
) -> np.ndarray:
    """Baseline: a delta is the sum of per-token effects, fit by ridge least squares on the training deltas.

    A token is a perturbed gene or a non-gene label. For a combination ``A+B`` whose singles were trained on this
    is about ``delta_A + delta_B``; for a label held out in one group it is the label's mean training delta.
    Tokens never trained on contribute nothing.

    Args:
        control_mean: ``[genes]`` control mean of the target's group.
        train_tokens: the tokens of each training perturbation.
        train_deltas: ``[k, genes]`` mean delta of each training perturbation.
        target_tokens: the tokens of the perturbation to predict.
        ridge: L2 penalty (small: only keeps the solve well-posed).

    Shape:
        ``[genes]``.
    """
    deltas = np.asarray(train_deltas, dtype=np.float64)
    if deltas.ndim != 2 or deltas.shape[0] != len(train_tokens):
        msg = f"train_deltas must be [{len(train_tokens)}, genes]; got shape {deltas.shape}."
        raise MsfmInputError(msg)
    vocab = sorted({t for toks in train_tokens for t in toks})
    index = {t: i for i, t in enumerate(vocab)}
    design = np.zeros((len(train_tokens), len(vocab)))
    for r, toks in enumerate(train_tokens):
        for t in toks:
            design[r, index[t]] = 1.0
    gram = design.T @ design + ridge * np.eye(len(vocab))
    effects = np.linalg.solve(gram, design.T @ deltas)
    x = np.zeros(len(vocab))
    for t in target_tokens:
        if t in index:
            x[index[t]] = 1.0
    return np.asarray(control_mean, dtype=np.float64) + x @ effects
