"""Baselines for spatial expression generation: predict expression at query positions from known cells.

GeST (B10) compares against a Gaussian process and an MLP that map absolute coordinates to expression; neither
looks at the neighbours' expression. :class:`KnnMeanBaseline` (mean of the nearest known cells) is the simple
neighbour baseline the paper lacks, and :class:`MeanBaseline` is the floor every method should beat.

Every baseline has the same interface::

    model = KnnMeanBaseline(k=6).fit(xy_known, X_known)   # [n, 2] µm, [n, T] model-space expression
    pred = model.predict(xy_query)                         # [m, 2] -> [m, T]

numpy / scikit-learn only (no torch). Predictions have the floating dtype of ``X_known`` (float32 stays float32).
"""

from __future__ import annotations

import abc
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "GaussianProcessBaseline",
    "KnnMeanBaseline",
    "MeanBaseline",
    "MlpBaseline",
    "SpatialBaseline",
    "fit_predict_baselines",
]


def _check_xy(xy: Any, name: str) -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        msg = f"{name} must be an [n, 2] array of positions (µm); got shape {arr.shape}."
        raise MsfmInputError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"{name} contains NaN or inf coordinates; drop those cells first."
        raise MsfmInputError(msg)
    return arr


def _check_known(xy_known: Any, X_known: Any, min_cells: int, who: str) -> tuple[np.ndarray, np.ndarray]:
    xy = _check_xy(xy_known, "xy_known")
    if hasattr(X_known, "toarray"):
        X_known = X_known.toarray()
    X = np.asarray(X_known)
    if X.ndim != 2:
        msg = f"X_known must be a 2-D [n_cells, n_genes] array; got shape {X.shape}."
        raise MsfmInputError(msg)
    if X.shape[0] != xy.shape[0]:
        msg = f"xy_known has {xy.shape[0]} positions but X_known has {X.shape[0]} rows; they must be the same cells."
        raise MsfmInputError(msg)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        msg = "X_known contains NaN or inf values; pass finite (e.g. log1p-normalised) expression."
        raise MsfmInputError(msg)
    if X.shape[0] < min_cells:
        msg = f"{who} needs at least {min_cells} known cells; got {X.shape[0]}."
        raise MsfmInputError(msg)
    if X.shape[1] == 0:
        msg = "X_known has no genes (0 columns)."
        raise MsfmInputError(msg)
    return xy, X


class SpatialBaseline(abc.ABC):
    """Common plumbing: input checks, fitted state and the output dtype."""

    name = "base"
    min_cells = 1

    def __init__(self) -> None:
        self._n_genes: int | None = None
        self._dtype: np.dtype = np.dtype(np.float64)

    def fit(self, xy_known: Any, X_known: Any) -> SpatialBaseline:
        """Learn from the known cells.

        Args:
            xy_known: Positions of the known cells (µm).
            X_known: Their expression (model space), dense or scipy sparse.

        Returns:
            ``self``.

        Raises:
            MsfmInputError: On bad shapes, non-finite values or too few known cells.

        Shape:
            xy_known: ``[n, 2]``; X_known: ``[n, T]``.
        """
        xy, X = _check_known(xy_known, X_known, self.min_cells, type(self).__name__)
        self._n_genes = X.shape[1]
        self._dtype = X.dtype
        self._fit(xy, X.astype(np.float64, copy=False))
        return self

    def predict(self, xy_query: Any) -> np.ndarray:
        """Predict expression at the query positions.

        Args:
            xy_query: Positions to generate (µm).

        Returns:
            Predicted expression, one row per query position.

        Raises:
            RuntimeError: If called before :meth:`fit`.
            MsfmInputError: On a bad query shape.

        Shape:
            xy_query: ``[m, 2]`` -> ``[m, T]``.
        """
        if self._n_genes is None:
            msg = f"{type(self).__name__}.predict was called before fit; call fit(xy_known, X_known) first."
            raise RuntimeError(msg)
        q = _check_xy(xy_query, "xy_query")
        if q.shape[0] == 0:
            return np.zeros((0, self._n_genes), dtype=self._dtype)
        return self._predict(q).astype(self._dtype, copy=False)

    @abc.abstractmethod
    def _fit(self, xy: np.ndarray, X: np.ndarray) -> None:
        """Fit on validated known cells (float64)."""

    @abc.abstractmethod
    def _predict(self, q: np.ndarray) -> np.ndarray:
        """Predict at validated query positions."""


class MeanBaseline(SpatialBaseline):
    """Predict the global mean expression of the known cells everywhere."""

    name = "mean"

    def _fit(self, xy: np.ndarray, X: np.ndarray) -> None:
        self.mean_ = X.mean(axis=0)

    def _predict(self, q: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.mean_, (q.shape[0], self.mean_.shape[0])).copy()


class KnnMeanBaseline(SpatialBaseline):
    """Mean expression of the ``k`` nearest known cells (the neighbour baseline GeST's paper lacks).

    Args:
        k: Neighbours to average (must not exceed the number of known cells).
        weights: ``"uniform"`` (plain mean) or ``"distance"`` (inverse-distance weights; a query exactly at a known
            position returns that cell's expression, the mean if several known cells share it).
    """

    name = "knn"

    def __init__(self, k: int = 6, weights: Literal["uniform", "distance"] = "uniform") -> None:
        super().__init__()
        if int(k) < 1:
            msg = f"k must be at least 1; got {k}."
            raise MsfmInputError(msg)
        if weights not in ("uniform", "distance"):
            msg = f"weights must be 'uniform' or 'distance'; got {weights!r}."
            raise MsfmInputError(msg)
        self.k = int(k)
        self.weights = weights

    def _fit(self, xy: np.ndarray, X: np.ndarray) -> None:
        from sklearn.neighbors import NearestNeighbors

        if self.k > X.shape[0]:
            msg = f"KnnMeanBaseline(k={self.k}) needs at least k known cells; got {X.shape[0]}. Lower k."
            raise MsfmInputError(msg)
        self.nn_ = NearestNeighbors(n_neighbors=self.k).fit(xy)
        self.X_ = X

    def _predict(self, q: np.ndarray) -> np.ndarray:
        dist, idx = self.nn_.kneighbors(q)
        if self.weights == "uniform":
            w = np.full(dist.shape, 1.0 / self.k)
        else:
            exact = dist <= 0.0
            with np.errstate(divide="ignore"):
                w = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), 1.0 / dist)
            w /= w.sum(axis=1, keepdims=True)
        out = np.zeros((q.shape[0], self.X_.shape[1]))
        # One neighbour rank at a time: memory m*T instead of m*k*T for the gathered rows.
        for j in range(self.k):
            out += w[:, j : j + 1] * self.X_[idx[:, j]]
        return out


class _PcaTargets:
    """Targets reduced to the top principal components (centred, one global scale), with the inverse map."""

    def __init__(self, X: np.ndarray, n_pcs: int | None, seed: int) -> None:
        from sklearn.decomposition import PCA

        n, n_genes = X.shape
        p = None if n_pcs is None else min(int(n_pcs), n - 1, n_genes)
        self.pca = None
        if p is not None and p >= 1 and p < n_genes:
            self.pca = PCA(n_components=p, random_state=seed).fit(X)
            Z = self.pca.transform(X)
        else:
            Z = X
        self.mu = Z.mean(axis=0)
        # One scale for every component (not one per component): PCA is orthonormal, so a squared error on the
        # scaled components is the gene-space squared error up to a constant, and the many low-variance (mostly
        # noise) components do not get the same weight as the signal ones in the MLP loss or the GP likelihood.
        sd = float(np.sqrt(np.mean((Z - self.mu) ** 2)))
        self.sd = sd if sd > 0 else 1.0
        self.Z = (Z - self.mu) / self.sd

    def inverse(self, Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z).reshape(Z.shape[0], -1) * self.sd + self.mu
        return Z if self.pca is None else self.pca.inverse_transform(Z)


class MlpBaseline(SpatialBaseline):
    """scikit-learn ``MLPRegressor`` from standardised absolute coordinates to expression (GeST's "MLP").

    The targets are the top ``n_pcs`` principal components of the known expression (centred and divided by one
    global scale), and the
    prediction is projected back to genes: 50 outputs instead of thousands keep it fast and act as denoising.
    ``n_pcs=None`` regresses every gene directly. A ``ConvergenceWarning`` at ``max_iter`` is expected for a
    baseline and only logged.

    Args:
        hidden: Hidden layer sizes.
        max_iter: Adam epochs.
        n_pcs: Principal components of the targets (capped at ``n - 1`` and ``T``); None: raw genes.
        alpha: L2 penalty.
        seed: Seed of the weights, the batches and the PCA.
    """

    name = "mlp"
    min_cells = 2

    def __init__(
        self,
        hidden: Sequence[int] = (256, 256),
        max_iter: int = 300,
        seed: int = 0,
        *,
        n_pcs: int | None = 50,
        alpha: float = 1e-4,
    ) -> None:
        super().__init__()
        self.hidden = tuple(int(h) for h in hidden)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.n_pcs = n_pcs
        self.alpha = float(alpha)

    def _fit(self, xy: np.ndarray, X: np.ndarray) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor
        from sklearn.preprocessing import StandardScaler

        self.scaler_ = StandardScaler().fit(xy)
        self.targets_ = _PcaTargets(X, self.n_pcs, self.seed)
        self.mlp_ = MLPRegressor(
            hidden_layer_sizes=self.hidden,
            max_iter=self.max_iter,
            alpha=self.alpha,
            random_state=self.seed,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.mlp_.fit(self.scaler_.transform(xy), self.targets_.Z)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            logger.info("MlpBaseline stopped at max_iter=%d before convergence", self.max_iter)

    def _predict(self, q: np.ndarray) -> np.ndarray:
        z = self.mlp_.predict(self.scaler_.transform(q))
        return self.targets_.inverse(z.reshape(q.shape[0], -1))


class GaussianProcessBaseline(SpatialBaseline):
    """Gaussian process regression from standardised absolute coordinates (GeST's "GP").

    Kernel ``C * RBF(length_scale) + WhiteKernel(noise)`` on standardised coordinates, fitted by marginal
    likelihood (``optimize=True``) with shared hyperparameters across outputs. The outputs are the top ``n_pcs``
    principal components of the known expression (centred, one global scale, so the high-variance components
    dominate the likelihood as they dominate the gene-space error), projected back to genes. Exact GPs cost
    ``O(n^3)``, so training uses at most ``max_train`` randomly chosen known cells (the PCA uses all of them).

    Args:
        length_scale: Initial RBF length scale in standardised coordinate units; default 3x the median distance
            to the nearest known neighbour (also in standardised units).
        noise: Initial white-noise level (the targets have unit mean variance per component).
        max_train: Most known cells used to fit the GP.
        n_pcs: Principal components of the targets; None: raw genes (slow for many genes).
        optimize: Fit the kernel hyperparameters; False keeps the initial values.
        seed: Seed of the subsample, the PCA and the optimiser.
    """

    name = "gp"
    min_cells = 2

    def __init__(
        self,
        length_scale: float | None = None,
        noise: float = 0.5,
        max_train: int = 2000,
        seed: int = 0,
        *,
        n_pcs: int | None = 50,
        optimize: bool = True,
    ) -> None:
        super().__init__()
        if length_scale is not None and not length_scale > 0:
            msg = f"length_scale must be positive; got {length_scale}."
            raise MsfmInputError(msg)
        if not noise > 0:
            msg = f"noise must be positive; got {noise}."
            raise MsfmInputError(msg)
        if int(max_train) < 2:
            msg = f"max_train must be at least 2; got {max_train}."
            raise MsfmInputError(msg)
        self.length_scale = length_scale
        self.noise = float(noise)
        self.max_train = int(max_train)
        self.seed = int(seed)
        self.n_pcs = n_pcs
        self.optimize = bool(optimize)

    def _fit(self, xy: np.ndarray, X: np.ndarray) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
        from sklearn.neighbors import NearestNeighbors
        from sklearn.preprocessing import StandardScaler

        rng = np.random.default_rng(self.seed)
        self.scaler_ = StandardScaler().fit(xy)
        targets = _PcaTargets(X, self.n_pcs, self.seed)
        self.targets_ = targets
        sel = np.arange(xy.shape[0])
        if sel.size > self.max_train:
            sel = np.sort(rng.choice(sel.size, size=self.max_train, replace=False))
        u = self.scaler_.transform(xy[sel])
        if self.length_scale is None:
            d, _ = NearestNeighbors(n_neighbors=2).fit(u).kneighbors(u)
            med = float(np.median(d[:, 1]))
            # Duplicate positions give a zero median; fall back to a tenth of the (unit) coordinate scale.
            ls = 3.0 * med if med > 0 else 0.1
        else:
            ls = float(self.length_scale)
        kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(ls, (1e-3, 1e3)) + WhiteKernel(
            self.noise, (1e-5, 1e1)
        )
        self.gp_ = GaussianProcessRegressor(
            kernel=kernel,
            optimizer="fmin_l_bfgs_b" if self.optimize else None,
            normalize_y=False,  # targets are already centred and scaled (one scale for all components)
            random_state=self.seed,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.gp_.fit(u, targets.Z[sel])
        if caught:
            logger.info("GaussianProcessBaseline: %s", caught[0].message)
        self.kernel_ = self.gp_.kernel_

    def _predict(self, q: np.ndarray) -> np.ndarray:
        z = self.gp_.predict(self.scaler_.transform(q))
        return self.targets_.inverse(np.asarray(z).reshape(q.shape[0], -1))


BASELINES: dict[str, type[SpatialBaseline]] = {
    "mean": MeanBaseline,
    "knn": KnnMeanBaseline,
    "mlp": MlpBaseline,
    "gp": GaussianProcessBaseline,
}


def fit_predict_baselines(
    xy_known: Any,
    X_known: Any,
    xy_query: Any,
    names: Sequence[str] = ("mean", "knn", "mlp", "gp"),
    seed: int = 0,
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, np.ndarray]:
    """Fit each named baseline on the known cells and predict the query positions.

    Args:
        xy_known: Positions of the known cells (µm).
        X_known: Their expression (model space).
        xy_query: Positions to predict.
        names: Baselines to run, among ``"mean"``, ``"knn"``, ``"mlp"``, ``"gp"``.
        seed: Seed passed to the seeded baselines (MLP, GP).
        params: Extra constructor arguments per name, e.g. ``{"knn": {"k": 10}}``.

    Returns:
        ``{name: prediction [m, T]}`` in the order of ``names``.

    Raises:
        MsfmInputError: On an unknown name or the errors of the baselines.

    Shape:
        xy_known: ``[n, 2]``; X_known: ``[n, T]``; xy_query: ``[m, 2]``.
    """
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        msg = f"Unknown baseline(s) {unknown}; expected names among {sorted(BASELINES)}."
        raise MsfmInputError(msg)
    extra = dict(params or {})
    bad = [n for n in extra if n not in names]
    if bad:
        msg = f"params has entries for {bad}, which are not in names={list(names)}."
        raise MsfmInputError(msg)
    out: dict[str, np.ndarray] = {}
    for name in names:
        kwargs = dict(extra.get(name, {}))
        if name in ("mlp", "gp"):
            kwargs.setdefault("seed", seed)
        model = BASELINES[name](**kwargs).fit(xy_known, X_known)
        out[name] = model.predict(xy_query)
    return out
