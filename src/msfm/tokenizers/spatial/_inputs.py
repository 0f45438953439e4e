"""Input checks shared by the spatial tokenizer modules: matrices, coordinates, bounds, sections and numbers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from msfm.errors import MsfmInputError

Bounds = tuple[float, float, float, float]

#: Rows per chunk when dense input is upcast to float64 (bounds the temporary copy to ~chunk x T x 8 bytes).
_ROW_CHUNK = 8192


def _as_matrix(X: Any, what: str = "X") -> np.ndarray | sp.csr_matrix:
    """Dense float array or CSR matrix, 2-D; other sparse formats become CSR, integers become float32."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if not np.issubdtype(X.dtype, np.floating):
            X = X.astype(np.float32)
    else:
        if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor, without importing torch
            X = X.detach().cpu().numpy()
        X = np.asarray(X)
        if not np.issubdtype(X.dtype, np.floating):
            if not np.issubdtype(X.dtype, np.number) and X.dtype != bool:
                msg = f"{what} has dtype {X.dtype}; expected a numeric expression matrix (float, cells x genes)."
                raise MsfmInputError(msg)
            X = X.astype(np.float32)
    if X.ndim != 2:
        msg = f"{what} has shape {X.shape}; expected a 2-D matrix [cells, genes]."
        raise MsfmInputError(msg)
    return X


def _row_chunks(n: int, chunk: int = _ROW_CHUNK) -> Iterator[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _check_model_space(X: np.ndarray | sp.csr_matrix, what: str = "X") -> None:
    """Finite and non-negative, as ``log1p(normalize_total(counts))`` always is."""
    if sp.issparse(X):
        blocks: Iterator[np.ndarray] = iter([X.data])
    else:
        blocks = (X[s] for s in _row_chunks(X.shape[0]))
    for block in blocks:
        if block.size == 0:
            continue
        if not np.isfinite(block).all():
            msg = (
                f"{what} contains NaN or infinite values; expected finite model-space expression "
                "(log1p(normalize_total(counts))). Remove or fix those cells first."
            )
            raise MsfmInputError(msg)
        low = float(block.min())
        if low < 0:
            msg = (
                f"{what} has negative values (minimum {low:.4g}); expected model-space expression "
                "log1p(normalize_total(counts, 1e4)), which is >= 0. Scaled or centred data (for example after "
                "sc.pp.scale) cannot be used: pass the log-normalised layer instead."
            )
            raise MsfmInputError(msg)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        msg = f"{name}={value!r}; expected a positive integer."
        raise MsfmInputError(msg)
    return int(value)


def _seed_int(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or int(seed) < 0:
        msg = f"seed={seed!r}; expected a non-negative integer."
        raise MsfmInputError(msg)
    return int(seed)


def _positive_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or v <= 0:
        msg = f"{name}={value!r}; expected a positive number of micrometres."
        raise MsfmInputError(msg)
    return v


def _as_xy(xy: Any, what: str = "xy") -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        msg = f"{what} has shape {arr.shape}; expected [n, 2] coordinates in micrometres."
        raise MsfmInputError(msg)
    if not np.isfinite(arr).all():
        msg = f"{what} contains NaN or infinite coordinates; remove those cells first."
        raise MsfmInputError(msg)
    return arr


def _as_bounds(bounds: Any) -> Bounds:
    try:
        x0, y0, x1, y1 = (float(v) for v in bounds)
    except (TypeError, ValueError):
        msg = f"bounds={bounds!r}; expected four numbers (x0, y0, x1, y1) in micrometres."
        raise MsfmInputError(msg) from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        msg = f"bounds={bounds!r}; expected finite (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0."
        raise MsfmInputError(msg)
    return (x0, y0, x1, y1)


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else _seed_int(rng))


def _as_sections(section: Any, n: int) -> np.ndarray:
    """Integer section codes ``[n]``: None -> zeros; non-integer labels -> codes of the sorted unique labels."""
    if section is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(section)
    if arr.shape != (n,):
        msg = f"section has shape {arr.shape}; expected one section per cell ({n},)."
        raise MsfmInputError(msg)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    _, codes = np.unique(arr.astype(str), return_inverse=True)
    return codes.astype(np.int64)
