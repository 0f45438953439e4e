"""Spatial generation baselines: mean, kNN mean, MLP and GP on absolute coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from msfm.errors import MsfmInputError
from msfm.models.gest.baselines import (
    BASELINES,
    GaussianProcessBaseline,
    KnnMeanBaseline,
    MeanBaseline,
    MlpBaseline,
    fit_predict_baselines,
)


def _smooth_tissue(seed: int = 0, side: int = 14, n_genes: int = 60):
    """Cells on a jittered grid whose genes mix three smooth spatial fields, plus a little noise."""
    rng = np.random.default_rng(seed)
    g = np.arange(side) * 20.0
    xx, yy = np.meshgrid(g, g)
    xy = np.column_stack([xx.ravel(), yy.ravel()]) + rng.uniform(-3, 3, size=(side * side, 2))
    fields = np.column_stack(
        [np.sin(xy[:, 0] / 60.0), np.cos(xy[:, 1] / 80.0), np.sin((xy[:, 0] + xy[:, 1]) / 100.0)]
    )
    X = (
        fields @ rng.uniform(0.0, 1.0, size=(3, n_genes))
        + 2.0
        + rng.normal(0, 0.05, size=(side * side, n_genes))
    )
    query = rng.random(side * side) < 0.25
    return xy, X, query


def test_knn_k1_returns_nearest_cell() -> None:
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    model = KnnMeanBaseline(k=1).fit(xy, X)
    np.testing.assert_array_equal(model.predict(xy), X)
    np.testing.assert_array_equal(model.predict(np.array([[9.0, 1.0], [1.0, 8.0]])), X[[1, 2]])
    # k=2 uniform: the mean of the two nearest; distance weights: closer cell weighs more.
    q = np.array([[2.0, 0.0]])
    np.testing.assert_allclose(KnnMeanBaseline(k=2).fit(xy, X).predict(q), [[2.0, 3.0]])
    # distances 2 and 8 -> weights 0.8 / 0.2
    np.testing.assert_allclose(
        KnnMeanBaseline(k=2, weights="distance").fit(xy, X).predict(q), [0.8 * X[0] + 0.2 * X[1]]
    )
    # A query exactly on a known cell returns that cell with distance weights.
    np.testing.assert_allclose(KnnMeanBaseline(k=3, weights="distance").fit(xy, X).predict(xy[1:2]), X[1:2])


def test_mean_baseline_and_dtypes() -> None:
    xy, X, _ = _smooth_tissue(side=6, n_genes=4)
    X32 = X.astype(np.float32)
    for cls in BASELINES.values():
        kwargs = {"max_iter": 20} if cls is MlpBaseline else {}
        model = cls(**kwargs).fit(xy, X32)
        out = model.predict(xy[:5] + 1.0)
        assert out.shape == (5, 4)
        assert out.dtype == np.float32
        assert model.predict(np.zeros((0, 2))).shape == (0, 4)
    np.testing.assert_allclose(MeanBaseline().fit(xy, X).predict(xy[:3]), np.tile(X.mean(0), (3, 1)))


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # Tiny matrices: multi-threaded BLAS only adds contention on the shared 2-core test machine.
    with threadpool_limits(limits=1):
        yield


def test_smooth_field_knn_and_gp_beat_global_mean() -> None:
    xy, X, query = _smooth_tissue()
    mlp = {"hidden": (64, 64), "max_iter": 200}
    preds = fit_predict_baselines(xy[~query], X[~query], xy[query], seed=0, params={"mlp": mlp})
    assert list(preds) == ["mean", "knn", "mlp", "gp"]
    rmse = {k: float(np.sqrt(np.mean((v - X[query]) ** 2))) for k, v in preds.items()}
    for name, v in preds.items():
        assert v.shape == X[query].shape, name
    assert rmse["knn"] < 0.5 * rmse["mean"]
    assert rmse["gp"] < 0.5 * rmse["mean"]
    assert rmse["mlp"] < rmse["mean"]
    # Deterministic given the seed.
    again = fit_predict_baselines(
        xy[~query], X[~query], xy[query], names=("mlp",), seed=0, params={"mlp": mlp}
    )
    np.testing.assert_array_equal(again["mlp"], preds["mlp"])


def test_gp_subsample_and_settings() -> None:
    xy, X, query = _smooth_tissue(side=12, n_genes=10)
    gp = GaussianProcessBaseline(max_train=40, n_pcs=3, seed=1).fit(xy[~query], X[~query])
    assert gp.gp_.X_train_.shape[0] == 40
    assert gp.targets_.pca is not None
    assert gp.targets_.pca.n_components_ == 3
    assert gp.predict(xy[query]).shape == (int(query.sum()), 10)
    fixed = GaussianProcessBaseline(length_scale=0.3, optimize=False, n_pcs=None).fit(xy, X)
    assert fixed.kernel_.k1.k2.length_scale == pytest.approx(0.3)
    mlp = MlpBaseline(hidden=(16,), max_iter=30, n_pcs=None).fit(xy, X)
    assert mlp.targets_.pca is None


def test_baseline_errors() -> None:
    xy, X, _ = _smooth_tissue(side=4, n_genes=3)
    with pytest.raises(MsfmInputError, match="at least k known cells"):
        KnnMeanBaseline(k=20).fit(xy, X)
    with pytest.raises(MsfmInputError, match="same cells"):
        KnnMeanBaseline().fit(xy[:-1], X)
    with pytest.raises(MsfmInputError, match=r"\[n, 2\]"):
        MeanBaseline().fit(np.zeros((16, 3)), X)
    with pytest.raises(MsfmInputError, match="NaN"):
        MeanBaseline().fit(xy, np.full_like(X, np.nan))
    with pytest.raises(MsfmInputError, match="at least 2 known cells"):
        MlpBaseline().fit(xy[:1], X[:1])
    with pytest.raises(RuntimeError, match="before fit"):
        KnnMeanBaseline().predict(xy)
    with pytest.raises(MsfmInputError, match=r"xy_query must be an \[n, 2\]"):
        MeanBaseline().fit(xy, X).predict(np.zeros(4))
    with pytest.raises(MsfmInputError, match="Unknown baseline"):
        fit_predict_baselines(xy, X, xy, names=("mean", "transformer"))
    with pytest.raises(MsfmInputError, match="weights"):
        KnnMeanBaseline(weights="gaussian")  # type: ignore[arg-type]
