"""Randomized PCA with implicit centring: sparse expression is never densified, dense input is upcast in chunks."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from msfm.tokenizers.spatial._inputs import _row_chunks


def _column_sums(X: np.ndarray | sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Float64 column sums and column sums of squares."""
    if sp.issparse(X):
        s = np.asarray(X.sum(axis=0, dtype=np.float64)).ravel()
        sq = np.asarray(X.multiply(X).sum(axis=0, dtype=np.float64)).ravel()
        return s, sq
    s = np.zeros(X.shape[1])
    sq = np.zeros(X.shape[1])
    for rows in _row_chunks(X.shape[0]):
        block = X[rows].astype(np.float64)
        s += block.sum(axis=0)
        sq += (block * block).sum(axis=0)
    return s, sq


def _centered_matmul(X: np.ndarray | sp.csr_matrix, mean: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``(X - mean) @ M`` in float64 without forming the centred (dense) matrix.

    Shape:
        X ``[n, T]``, mean ``[T]``, M ``[T, l]`` -> ``[n, l]``.
    """
    shift = mean @ M
    if sp.issparse(X):
        return np.asarray(X @ M, dtype=np.float64) - shift[None, :]
    out = np.empty((X.shape[0], M.shape[1]))
    for rows in _row_chunks(X.shape[0]):
        out[rows] = X[rows].astype(np.float64) @ M - shift[None, :]
    return out


def _centered_rmatmul(X: np.ndarray | sp.csr_matrix, mean: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``(X - mean).T @ Q`` in float64 without forming the centred matrix.

    Shape:
        X ``[n, T]``, mean ``[T]``, Q ``[n, l]`` -> ``[T, l]``.
    """
    shift = np.outer(mean, Q.sum(axis=0))
    if sp.issparse(X):
        return np.asarray(X.T @ Q, dtype=np.float64) - shift
    out = np.zeros((X.shape[1], Q.shape[1]))
    for rows in _row_chunks(X.shape[0]):
        out += X[rows].astype(np.float64).T @ Q[rows]
    return out - shift


def _randomized_pca(
    X: np.ndarray | sp.csr_matrix, n_components: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Randomized PCA (Halko et al. 2011) with implicit centring, so sparse input is never densified.

    Only products of ``X`` with thin matrices are formed; dense input is upcast to float64 in row chunks. With
    ``n_components + 10 >= min(n, T)`` the range finder spans the whole space and the result is exact.

    Returns:
        ``(mean [T], components [p, T], explained_variance [p], total_variance)``, all float64. Component signs are
        fixed so that each component's largest-magnitude loading is positive (deterministic output).
    """
    n, T = X.shape
    col_sum, col_sq = _column_sums(X)
    mean = col_sum / n
    total_var = float(max((col_sq - n * mean * mean).sum(), 0.0) / max(n - 1, 1))
    width = min(n_components + 10, n, T)
    # sklearn's heuristic: more power iterations when few components are asked for (slow spectral decay).
    n_iter = 7 if n_components < 0.1 * min(n, T) else 4
    Y = _centered_matmul(X, mean, rng.standard_normal((T, width)))
    for _ in range(n_iter):
        # LU (not QR) keeps the power iterations well conditioned at a fraction of the cost on tall matrices
        # (sklearn's randomized_svd does the same); only the final basis must be orthonormal.
        Y = scipy.linalg.lu(Y, permute_l=True)[0]
        Z = scipy.linalg.lu(_centered_rmatmul(X, mean, Y), permute_l=True)[0]
        Y = _centered_matmul(X, mean, Z)
    Q = scipy.linalg.qr(Y, mode="economic")[0]
    B = _centered_rmatmul(X, mean, Q).T  # [width, T]
    _, s, vt = np.linalg.svd(B, full_matrices=False)
    comps = vt[:n_components]
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    comps = comps * signs[:, None]
    explained = s[:n_components] ** 2 / max(n - 1, 1)
    return mean, comps, explained, total_var


def _project64(X: np.ndarray | sp.csr_matrix, mean32: np.ndarray, comps32: np.ndarray) -> np.ndarray:
    """``(X - mean) @ comps.T`` in float64 (one formula for dense and sparse input)."""
    return _centered_matmul(X, mean32.astype(np.float64), comps32.astype(np.float64).T)
