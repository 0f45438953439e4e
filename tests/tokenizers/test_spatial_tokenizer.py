"""GeST spatial tokenisation: meta-cell vocabulary, serialisation, window sampling and tiling."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

from msfm.errors import CheckpointError, MsfmInputError
from msfm.tokenizers.spatial import (
    MetaCellVocab,
    Window,
    WindowSampler,
    normalize_positions,
    serialize,
    tile_windows,
    window_cells,
)
from msfm.tokenizers.spatial import vocab as sp_tok

N_TRUE = 5


def _mixture(n: int, n_genes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """log1p Poisson counts from N_TRUE well-separated expression programmes."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(N_TRUE, size=n)
    rates = rng.gamma(1.0, 3.0, size=(N_TRUE, n_genes)) * (rng.random((N_TRUE, n_genes)) < 0.4) + 0.05
    return np.log1p(rng.poisson(rates[truth] * 3)).astype(np.float32), truth


GENES = [f"g{i}" for i in range(30)]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return _mixture(1000, len(GENES), seed=0)


@pytest.fixture(scope="module")
def vocab(data: tuple[np.ndarray, np.ndarray]) -> MetaCellVocab:
    return MetaCellVocab.fit(data[0], GENES, n_metacells=40, n_pcs=8, levels=(15, 10, 5), seed=0)


def _assert_nested(v: MetaCellVocab) -> None:
    for i in range(1, v.n_levels):
        for lab in np.unique(v.hierarchy[i - 1]):
            parents = np.unique(v.hierarchy[i][v.hierarchy[i - 1] == lab])
            assert parents.size == 1, f"level {i - 1} label {lab} splits across level {i}: {parents}"


# ---------------------------------------------------------------------------------------------------------------
# Meta-cell vocabulary
# ---------------------------------------------------------------------------------------------------------------


def test_vocab_shapes_counts_and_hierarchy(vocab: MetaCellVocab, data: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = data
    assert vocab.level_sizes == (40, 15, 10, 5)
    assert (vocab.n_metacells, vocab.n_genes, vocab.n_pcs, vocab.n_levels) == (40, 30, 8, 4)
    assert vocab.hierarchy.shape == (4, 40)
    np.testing.assert_array_equal(vocab.hierarchy[0], np.arange(40))
    for level, size in enumerate(vocab.level_sizes):
        np.testing.assert_array_equal(np.unique(vocab.hierarchy[level]), np.arange(size))
    _assert_nested(vocab)
    # Every meta-cell has members; counts and expression centroids agree with assign().
    tokens = vocab.assign(X)
    np.testing.assert_array_equal(vocab.cell_counts, np.bincount(tokens, minlength=40))
    assert vocab.cell_counts.min() >= 1
    assert vocab.cell_counts.sum() == X.shape[0]
    brute = np.stack([X[tokens == k].astype(np.float64).mean(axis=0) for k in range(40)])
    np.testing.assert_allclose(vocab.centroids_expr, brute, rtol=1e-5, atol=1e-6)
    assert vocab.meta["n_pcs"] == 8
    assert vocab.meta["n_cells"] == 1000
    assert vocab.meta["kmeans"] == "KMeans"
    # PCA components are orthonormal.
    comps = vocab.pca_components.astype(np.float64)
    np.testing.assert_allclose(comps @ comps.T, np.eye(8), atol=1e-5)


def test_vocab_recovers_true_clusters_at_level_3(
    vocab: MetaCellVocab, data: tuple[np.ndarray, np.ndarray]
) -> None:
    X, truth = data
    coarse = vocab.level_of(vocab.assign(X), 3)
    for c in range(N_TRUE):
        labels = coarse[truth == c]
        assert np.bincount(labels).max() / labels.size > 0.9, f"true cluster {c} is split at level 3"
    assert adjusted_rand_score(truth, coarse) > 0.9


def test_top_pcs_match_exact_pca(vocab: MetaCellVocab, data: tuple[np.ndarray, np.ndarray]) -> None:
    X = data[0].astype(np.float64)
    Xc = X - X.mean(axis=0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    # The 4 between-programme directions dominate the spectrum and must be recovered (up to sign).
    cos = np.abs((vt[:4] * vocab.pca_components[:4]).sum(axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)
    np.testing.assert_allclose(vocab.pca_mean, X.mean(axis=0), rtol=1e-6)


def test_assign_equals_brute_force_argmin(vocab: MetaCellVocab) -> None:
    X2, _ = _mixture(300, len(GENES), seed=7)
    P = (X2.astype(np.float64) - vocab.pca_mean) @ vocab.pca_components.astype(np.float64).T
    d = ((P[:, None, :] - vocab.centroids_pca[None].astype(np.float64)) ** 2).sum(axis=-1)
    np.testing.assert_array_equal(vocab.assign(X2), d.argmin(axis=1))
    np.testing.assert_array_equal(vocab.assign(X2, batch_size=7), d.argmin(axis=1))
    np.testing.assert_allclose(vocab.project(X2), P, rtol=1e-5, atol=1e-5)
    # Sparse input gives the same tokens.
    np.testing.assert_array_equal(vocab.assign(sp.csr_matrix(X2)), d.argmin(axis=1))


def test_assign_ties_go_to_lowest_index() -> None:
    X = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=np.float32)
    v = MetaCellVocab.fit(X, ["a", "b"], n_metacells=4, n_pcs=2, levels=(2,), seed=0)
    # Put two identical centres: the point on them must go to the lower index.
    C = v.centroids_pca.copy()
    C[3] = C[1]
    v.centroids_pca = C
    tok = v.assign(X)
    assert 3 not in tok.tolist()


def test_fit_sparse_matches_dense(data: tuple[np.ndarray, np.ndarray], vocab: MetaCellVocab) -> None:
    X, _ = data
    vs = MetaCellVocab.fit(sp.csr_matrix(X), GENES, n_metacells=40, n_pcs=8, seed=0)
    np.testing.assert_allclose(vs.pca_components, vocab.pca_components, atol=1e-5)
    assert (vs.assign(X) == vocab.assign(X)).mean() > 0.99


def test_fit_is_deterministic_and_seed_dependent(data: tuple[np.ndarray, np.ndarray]) -> None:
    X = data[0][:300]
    a = MetaCellVocab.fit(X, GENES, n_metacells=20, n_pcs=5, levels=(6, 3), seed=3)
    b = MetaCellVocab.fit(X, GENES, n_metacells=20, n_pcs=5, levels=(6, 3), seed=3)
    c = MetaCellVocab.fit(X, GENES, n_metacells=20, n_pcs=5, levels=(6, 3), seed=4)
    for name in sp_tok._TENSOR_NAMES:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.centroids_pca, c.centroids_pca)


def test_subsample_and_minibatch_path(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    X, truth = data
    monkeypatch.setattr(sp_tok, "_MINIBATCH_THRESHOLD", 100)
    v = MetaCellVocab.fit(X, GENES, n_metacells=30, n_pcs=6, levels=(10, 5), seed=1, max_cells=400)
    assert v.meta["kmeans"] == "MiniBatchKMeans"
    assert v.meta["n_fit_cells"] == 400
    assert v.meta["n_cells"] == 1000
    # All cells (not only the 400 fit cells) are assigned and counted; no meta-cell is empty.
    assert v.cell_counts.sum() == 1000
    assert v.cell_counts.min() >= 1
    _assert_nested(v)
    assert adjusted_rand_score(truth, v.level_of(v.assign(X), 2)) > 0.8


def test_n_pcs_clamped_and_no_levels() -> None:
    X, _ = _mixture(12, 30, seed=2)
    v = MetaCellVocab.fit(X, GENES, n_metacells=4, n_pcs=50, levels=(), seed=0)
    assert v.n_pcs == 11
    assert v.meta["n_pcs_requested"] == 50
    assert v.level_sizes == (4,)
    assert v.n_levels == 1


def test_level_of_numpy_torch_and_padding(vocab: MetaCellVocab) -> None:
    tokens = np.array([[0, 5, 39], [-100, 2, 2]])
    out = vocab.level_of(tokens, 2)
    np.testing.assert_array_equal(out[0], vocab.hierarchy[2][[0, 5, 39]])
    assert out[1, 0] == -100
    t = vocab.level_of(torch.as_tensor(tokens), 2)
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), out)
    np.testing.assert_array_equal(vocab.level_of(tokens, 0), tokens)
    with pytest.raises(MsfmInputError, match="level"):
        vocab.level_of(tokens, 4)
    with pytest.raises(MsfmInputError, match="out of range"):
        vocab.level_of(np.array([40]), 1)


def test_save_load_round_trip_bit_exact(vocab: MetaCellVocab, tmp_path) -> None:
    path = vocab.save(tmp_path / "vocab.safetensors")
    assert path.is_file()
    assert (tmp_path / "vocab.json").is_file()
    assert json.loads((tmp_path / "vocab.json").read_text())["genes"] == GENES
    loaded = MetaCellVocab.load(path)
    for name in sp_tok._TENSOR_NAMES:
        a, b = getattr(vocab, name), getattr(loaded, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert loaded.genes == vocab.genes
    assert loaded.level_sizes == vocab.level_sizes
    assert loaded.meta == vocab.meta
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json", "vocab.safetensors"]
    # Metadata lives in the safetensors header: the sidecar is not needed to load.
    (tmp_path / "vocab.json").unlink()
    assert MetaCellVocab.load(path).genes == GENES


def test_from_tensors_round_trip_and_validation(vocab: MetaCellVocab) -> None:
    tensors, meta = vocab.to_tensors(), vocab.meta_dict()
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    json.dumps(meta)  # JSON-serialisable
    back = MetaCellVocab.from_tensors(tensors, meta)
    for name in sp_tok._TENSOR_NAMES:
        np.testing.assert_array_equal(getattr(vocab, name), getattr(back, name))
    broken = dict(tensors)
    hier = broken["hierarchy"].clone()
    hier[2, 0] = (hier[2, 0] + 1) % 10  # meta-cell 0 leaves its level-2 group: nesting broken somewhere
    broken["hierarchy"] = hier
    with pytest.raises(CheckpointError):
        MetaCellVocab.from_tensors(broken, meta)
    with pytest.raises(CheckpointError, match="lacks"):
        MetaCellVocab.from_tensors({k: v for k, v in tensors.items() if k != "centroids_expr"}, meta)
    with pytest.raises(CheckpointError, match="format"):
        MetaCellVocab.from_tensors(tensors, {**meta, "format": "other"})


def test_load_errors(tmp_path, vocab: MetaCellVocab) -> None:
    with pytest.raises(MsfmInputError, match="does not exist"):
        MetaCellVocab.load(tmp_path / "missing.safetensors")
    with pytest.raises(MsfmInputError, match=r"\.safetensors"):
        vocab.save(tmp_path / "vocab.npz")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        MetaCellVocab.load(bad)


def test_fit_errors(data: tuple[np.ndarray, np.ndarray]) -> None:
    X = data[0][:50]
    with pytest.raises(MsfmInputError, match=r"only 50 cells.*n_metacells=12"):
        MetaCellVocab.fit(X, GENES, n_metacells=60, levels=(5,))
    with pytest.raises(MsfmInputError, match="max_cells=20"):
        MetaCellVocab.fit(X, GENES, n_metacells=30, levels=(5,), max_cells=20)
    for levels in [(10, 10), (5, 8), (40,), (0,)]:
        with pytest.raises(MsfmInputError, match="levels"):
            MetaCellVocab.fit(X, GENES, n_metacells=20, levels=levels)
    with pytest.raises(MsfmInputError, match="29 gene names"):
        MetaCellVocab.fit(X, GENES[:-1], n_metacells=10, levels=(5,))
    with pytest.raises(MsfmInputError, match="unique"):
        MetaCellVocab.fit(X, ["g0"] * 30, n_metacells=10, levels=(5,))
    neg = X.copy()
    neg[3, 4] = -1.0
    with pytest.raises(MsfmInputError, match="negative"):
        MetaCellVocab.fit(neg, GENES, n_metacells=10, levels=(5,))
    with pytest.raises(MsfmInputError, match="negative"):
        MetaCellVocab.fit(sp.csr_matrix(neg), GENES, n_metacells=10, levels=(5,))
    nan = X.copy()
    nan[0, 0] = np.nan
    with pytest.raises(MsfmInputError, match="NaN"):
        MetaCellVocab.fit(nan, GENES, n_metacells=10, levels=(5,))
    # Only 3 distinct profiles: 8 meta-cells cannot all have members.
    dup = np.repeat(X[:3], 10, axis=0)
    with pytest.raises(MsfmInputError, match="distinct"):
        MetaCellVocab.fit(dup, GENES, n_metacells=8, levels=(2,))


def test_assign_errors(vocab: MetaCellVocab, data: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(MsfmInputError, match="30 genes"):
        vocab.assign(data[0][:5, :20])
    with pytest.raises(MsfmInputError, match="negative"):
        vocab.assign(-data[0][:5] - 1)


# ---------------------------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------------------------


def _grid(n_side: int = 20, spacing: float = 10.0) -> np.ndarray:
    g = np.arange(n_side) * spacing
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def test_serialize_is_deterministic_given_seed() -> None:
    xy = np.random.default_rng(0).uniform(0, 600, size=(200, 2))
    for order in ("corner_sweep", "random", "raster"):
        a = serialize(xy, order=order, rng=5)
        b = serialize(xy, order=order, rng=np.random.default_rng(5))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.sort(a), np.arange(200))
        assert a.dtype == np.int64
    assert not np.array_equal(serialize(xy, order="random", rng=1), serialize(xy, order="random", rng=2))


@pytest.mark.parametrize("corner", [0, 1, 2, 3])
def test_corner_sweep_without_jitter_is_distance_order(corner: int) -> None:
    xy = _grid()
    bounds = (-5.0, -5.0, 195.0, 195.0)
    origin = {0: (-5, -5), 1: (195, -5), 2: (195, 195), 3: (-5, 195)}[corner]
    d = np.sqrt(((xy - np.array(origin)) ** 2).sum(axis=1))
    perm = serialize(xy, corner=corner, jitter_um=0, bounds=bounds, rng=0)
    np.testing.assert_array_equal(perm, np.argsort(d, kind="stable"))  # ties by index


def test_corner_sweep_with_jitter_follows_distance_but_varies() -> None:
    xy = _grid()  # 20 x 20 grid, 10 µm apart; default jitter = 5 % of the 190 µm side
    d = np.sqrt((xy**2).sum(axis=1))
    perms = [serialize(xy, corner=0, rng=s) for s in range(3)]
    for perm in perms:
        rank = np.empty(400)
        rank[perm] = np.arange(400)
        assert spearmanr(rank, d).statistic > 0.8
        assert not np.array_equal(perm, np.argsort(d, kind="stable"))
    assert not np.array_equal(perms[0], perms[1])
    assert not np.array_equal(perms[1], perms[2])


def test_corner_sweep_random_corner() -> None:
    xy = _grid()
    corners = np.array([[0, 0], [190, 0], [190, 190], [0, 190]])
    starts = set()
    for seed in range(20):
        first = xy[serialize(xy, jitter_um=0, rng=seed)[0]]
        starts.add(int(np.argmin(((corners - first) ** 2).sum(axis=1))))
    assert len(starts) >= 3  # random corner per call


def test_raster_and_random_orders() -> None:
    xy = np.array([[5.0, 1.0], [1.0, 1.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_array_equal(serialize(xy, order="raster"), [2, 1, 4, 0, 3])
    perm = serialize(_grid(), order="random", rng=0)
    assert spearmanr(np.arange(400), perm).statistic < 0.2  # no spatial structure


def test_serialize_errors() -> None:
    xy = _grid(3)
    with pytest.raises(MsfmInputError, match="order"):
        serialize(xy, order="hilbert")  # type: ignore[arg-type]
    with pytest.raises(MsfmInputError, match="corner"):
        serialize(xy, corner=4)
    with pytest.raises(MsfmInputError, match="jitter"):
        serialize(xy, jitter_um=-1.0)
    with pytest.raises(MsfmInputError, match=r"\[n, 2\]"):
        serialize(np.zeros((3, 3)))
    assert serialize(np.zeros((0, 2))).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tissue() -> tuple[np.ndarray, np.ndarray]:
    """Two sections of 1500 random cells each on overlapping 2 mm squares."""
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 2000, size=(3000, 2))
    section = np.repeat([0, 1], 1500)
    return xy, section


def test_window_sampler_is_pure_in_seed_and_k(tissue: tuple[np.ndarray, np.ndarray]) -> None:
    xy, section = tissue
    a = WindowSampler(xy, section, side_um=300, seed=4)
    b = WindowSampler(xy, section, side_um=300, seed=4)
    c = WindowSampler(xy, section, side_um=300, seed=5)
    for k in (0, 7, 7, 123):
        wa, wb = a.window(k), b.window(k)
        np.testing.assert_array_equal(wa.cells, wb.cells)
        assert wa.bounds == wb.bounds
        assert wa.anchor == wb.anchor
    # Calling out of order does not change anything (no hidden state).
    np.testing.assert_array_equal(a.window(0).cells, b.window(0).cells)
    assert a.window(0).bounds != c.window(0).bounds
    assert a.window(0).bounds != a.window(1).bounds
    it = iter(a)
    np.testing.assert_array_equal(next(it).cells, a.window(0).cells)
    np.testing.assert_array_equal(next(it).cells, a.window(1).cells)
    assert len(a) == 3000


def test_window_contents_section_and_order(tissue: tuple[np.ndarray, np.ndarray]) -> None:
    xy, section = tissue
    sampler = WindowSampler(xy, section, side_um=300, seed=0, jitter_um=0)
    for k in range(20):
        w = sampler.window(k)
        assert isinstance(w, Window)
        x0, y0, x1, y1 = w.bounds
        assert x1 - x0 == pytest.approx(300)
        assert y1 - y0 == pytest.approx(300)
        assert w.anchor in w.cells.tolist()
        assert (section[w.cells] == w.section).all()
        assert section[w.anchor] == w.section
        # Exactly the cells of the anchor's section inside the window, in corner-sweep order.
        own = np.flatnonzero(section == w.section)
        expected = own[window_cells(xy[own], w.bounds)]
        np.testing.assert_array_equal(np.sort(w.cells), expected)
        d = [
            np.sqrt(((xy[w.cells] - np.array(c)) ** 2).sum(axis=1))
            for c in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        ]
        assert any(np.all(np.diff(di) >= 0) for di in d)  # sorted by distance to one corner
        pos = normalize_positions(xy[w.cells], w.bounds)
        assert pos.dtype == np.float32
        assert pos.min() >= -0.5
        assert pos.max() <= 0.5


def test_window_subsampling(tissue: tuple[np.ndarray, np.ndarray]) -> None:
    xy, section = tissue
    full = WindowSampler(xy, section, side_um=400, seed=2, max_cells=10_000)
    rand = WindowSampler(xy, section, side_um=400, seed=2, max_cells=8, subsample="random")
    near = WindowSampler(xy, section, side_um=400, seed=2, max_cells=8, subsample="nearest")
    for k in range(10):
        wf, wr, wn = full.window(k), rand.window(k), near.window(k)
        # Same anchor and bounds: subsampling happens after the window is placed.
        assert len(wf) > 8
        assert wr.bounds == wf.bounds
        assert wn.bounds == wf.bounds
        assert len(wr) == 8
        assert wr.anchor in wr.cells.tolist()
        assert set(wr.cells.tolist()) <= set(wf.cells.tolist())
        centre = np.array([(wf.bounds[0] + wf.bounds[2]) / 2, (wf.bounds[1] + wf.bounds[3]) / 2])
        members = np.sort(wf.cells)
        d2 = ((xy[members] - centre) ** 2).sum(axis=1)
        assert len(wn) == 8
        np.testing.assert_array_equal(np.sort(wn.cells), np.sort(members[np.argsort(d2, kind="stable")[:8]]))
    # Different windows draw different random subsets.
    assert not np.array_equal(np.sort(rand.window(0).cells), np.sort(rand.window(1).cells))


def test_window_sampler_allowed_cells_and_coords_object(tissue: tuple[np.ndarray, np.ndarray]) -> None:
    xy, section = tissue
    coords = SimpleNamespace(xy=xy, section=section)
    s = WindowSampler.from_coords(coords, side_um=300, cells=section == 1, seed=0)
    assert len(s) == 1500
    assert all(s.window(k).section == 1 for k in range(15))
    s2 = WindowSampler(xy, None, side_um=300, cells=[5, 9], seed=0)
    assert {s2.window(k).anchor for k in range(20)} == {5, 9}


def test_window_sampler_too_sparse_error() -> None:
    xy = np.array([[0.0, 0.0], [5000.0, 0.0], [0.0, 5000.0]])
    with pytest.raises(MsfmInputError, match=r"too sparse.*side_um"):
        WindowSampler(xy, side_um=100, max_tries=8).window(0)
    assert len(WindowSampler(xy, side_um=100, min_cells=1).window(0)) == 1
    with pytest.raises(MsfmInputError, match="min_cells"):
        WindowSampler(xy, max_cells=1, min_cells=2)
    with pytest.raises(MsfmInputError, match="subsample"):
        WindowSampler(xy, subsample="stride")  # type: ignore[arg-type]
    with pytest.raises(MsfmInputError, match="non-negative"):
        WindowSampler(xy).window(-1)


# ---------------------------------------------------------------------------------------------------------------
# Tiling and positions
# ---------------------------------------------------------------------------------------------------------------


def test_tile_windows_cover_every_cell_once(tissue: tuple[np.ndarray, np.ndarray]) -> None:
    xy, section = tissue
    tiles = tile_windows(SimpleNamespace(xy=xy, section=section), 250.0, min_cells=1)
    cells = np.concatenate([t.cells for t in tiles])
    np.testing.assert_array_equal(np.sort(cells), np.arange(3000))  # every cell exactly once
    for t in tiles:
        assert (section[t.cells] == t.section).all()
        own = np.flatnonzero(section == t.section)
        np.testing.assert_array_equal(t.cells, own[window_cells(xy[own], t.bounds)])
    assert [t.section for t in tiles] == sorted(t.section for t in tiles)


def test_tile_windows_exact_grid_edges_and_min_cells() -> None:
    # Cells exactly on tile edges (multiples of the side) are covered once, by the tile that starts there.
    xy = _grid(7, spacing=50.0)  # 0..300 µm; side 100 -> edges at 0, 100, 200, 300
    tiles = tile_windows(xy, 100.0, min_cells=1)
    assert len(tiles) == 16
    np.testing.assert_array_equal(np.sort(np.concatenate([t.cells for t in tiles])), np.arange(49))
    kept = tile_windows(xy, 100.0)  # min_cells=2 drops the 1-cell corner tile (300, 300)
    assert all(len(t) >= 2 for t in kept)
    assert len(kept) == 15
    overlap = tile_windows(xy, 100.0, stride_um=50.0, min_cells=1)
    counts = np.bincount(np.concatenate([t.cells for t in overlap]), minlength=49)
    assert counts.min() >= 1
    assert counts.max() == 4
    with pytest.raises(MsfmInputError, match="side_um"):
        tile_windows(xy, 0.0)


def test_normalize_positions() -> None:
    bounds = (100.0, 200.0, 700.0, 800.0)
    corners = np.array([[100.0, 200.0], [700.0, 800.0], [400.0, 500.0]])
    out = normalize_positions(corners, bounds)
    np.testing.assert_allclose(out, [[-0.5, -0.5], [0.5, 0.5], [0.0, 0.0]])
    assert out.dtype == np.float32
    pts = np.random.default_rng(0).uniform([100, 200], [700, 800], size=(500, 2))
    norm = normalize_positions(pts, bounds)
    assert norm.min() >= -0.5
    assert norm.max() <= 0.5
    with pytest.raises(MsfmInputError, match="zero"):
        normalize_positions(corners, (0.0, 0.0, 0.0, 0.0))


def test_package_exports_stay_reachable() -> None:
    # The old single module became a package; the public names keep their import paths.
    import msfm.tokenizers as tok
    from msfm.tokenizers import spatial

    for name in spatial.__all__:
        assert getattr(spatial, name) is not None
    assert tok.MetaCellVocab is spatial.MetaCellVocab
    assert tok.WindowSampler is spatial.WindowSampler
    assert tok.serialize is spatial.serialize
