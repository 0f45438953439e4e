"""CellSource: the count contract, row access, backed vs in-memory equality."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from msfm.data import CellSource
from msfm.errors import MsfmInputError


def _counts(n: int = 60, g: int = 25, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.8, size=(n, g)).astype(np.float32)
    x[[4, 17]] = 0  # cells without counts must be kept and flagged
    return sp.csr_matrix(x)


def _adata(x, **layers) -> ad.AnnData:
    adata = ad.AnnData(x, var=pd.DataFrame(index=[f"g{i}" for i in range(x.shape[1])]))
    for k, v in layers.items():
        adata.layers[k] = v
    return adata


@pytest.fixture
def backed_pair(tmp_path):
    x = _counts()
    adata = _adata(x)
    adata.write_h5ad(tmp_path / "c.h5ad")
    return adata, ad.read_h5ad(tmp_path / "c.h5ad", backed="r")


def test_backed_matches_in_memory(backed_pair):
    mem, backed = backed_pair
    a, b = CellSource(mem), CellSource(backed, chunk_size=7)
    assert a.kind == b.kind == "counts"
    assert b.backed
    assert not a.backed
    idx = [59, 3, 3, 10, 0, 11, 12, 13, 58]
    ra, rb = a.rows(idx), b.rows(idx)
    assert isinstance(rb, sp.csr_matrix)
    assert rb.dtype == np.float32
    np.testing.assert_array_equal(ra.toarray(), rb.toarray())
    np.testing.assert_array_equal(rb.toarray(), mem.X[idx].toarray())
    np.testing.assert_array_equal(a.totals(), b.totals())
    chunks = list(b.iter_chunks())
    assert [len(c.obs_idx) for c in chunks] == [7] * 8 + [4]
    assert np.flatnonzero(np.concatenate([c.zero_count for c in chunks])).tolist() == [4, 17]
    assert np.flatnonzero(b.zero_count_cells()).tolist() == [4, 17]


def test_backed_reads_sorted_unique_rows_once(backed_pair, monkeypatch):
    _, backed = backed_pair
    src = CellSource(backed, chunk_size=8)
    reads: list[list[int]] = []
    original = src._read_rows

    def spy(rows):
        reads.append(rows.tolist())
        return original(rows)

    monkeypatch.setattr(src, "_read_rows", spy)
    out = src.rows([40, 2, 3, 4, 41, 2])
    assert reads == [[2, 3, 4, 40, 41]]  # one sorted, de-duplicated read; X is never loaded whole
    np.testing.assert_array_equal(out.toarray(), backed_pair[0].X[[40, 2, 3, 4, 41, 2]].toarray())


def test_prefers_counts_layer_and_explicit_layer():
    x = _counts()
    norm = x.copy()
    norm.data = np.log1p(norm.data) + 0.1
    adata = _adata(norm, counts=x)
    src = CellSource(adata)
    assert src.matrix_name == "layers['counts']"
    assert src.kind == "counts"
    np.testing.assert_array_equal(src.rows([1]).toarray(), x[[1]].toarray())
    with pytest.raises(MsfmInputError, match=r"layer='counts'.*pre_normalized=True"):
        CellSource(_adata(norm))
    with pytest.warns(UserWarning, match="already log-normalised"):
        src = CellSource(_adata(norm), pre_normalized=True)
    assert src.kind == "normalized"
    with pytest.raises(MsfmInputError, match=r"layer='nope'.*available layers: \['counts'\]"):
        CellSource(adata, layer="nope")


def test_csc_x_is_read_by_rows():
    x = _counts()
    adata = _adata(sp.csc_matrix(x))
    np.testing.assert_array_equal(CellSource(adata).rows([3, 1]).toarray(), x[[3, 1]].toarray())
    assert adata.X.format == "csc"


def test_dense_x_and_float64_are_accepted():
    x = _counts().toarray().astype(np.float64)
    src = CellSource(_adata(x))
    out = src.rows(np.array([2, 1]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.toarray(), x[[2, 1]])


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (-1.0, r"1 negative values \(first in cell '5', row 5"),
        (np.nan, "1 NaN and 0 infinite"),
        (np.inf, "0 NaN and 1 infinite"),
    ],
)
def test_invalid_values(value, pattern):
    x = _counts().toarray()
    x[5, 3] = value
    with pytest.raises(MsfmInputError, match=pattern):
        CellSource(_adata(sp.csr_matrix(x)))


def test_invalid_values_found_in_later_backed_chunk(tmp_path):
    x = _counts().toarray()
    x[50, 1] = 2.5  # beyond the first chunk that decides the kind
    _adata(sp.csr_matrix(x)).write_h5ad(tmp_path / "bad.h5ad")
    src = CellSource(ad.read_h5ad(tmp_path / "bad.h5ad", backed="r"), chunk_size=10)
    src.rows([1, 2])
    with pytest.raises(MsfmInputError, match=r"not integers \(first in cell '50'"):
        src.rows([3, 50])


def test_empty_and_duplicated():
    with pytest.raises(MsfmInputError, match="empty"):
        CellSource(ad.AnnData(sp.csr_matrix((0, 5), dtype=np.float32)))
    adata = _adata(_counts(20, 3))
    adata.var_names = ["A", "B", "A"]
    with pytest.raises(
        MsfmInputError, match=r"duplicated gene names \(e.g. \['A'\]\).*var_names_make_unique"
    ):
        CellSource(adata)


def test_integer_pre_normalized_is_refused_and_source_untouched():
    # Integer-only values cannot be log1p-normalised: pre_normalized=True on counts is refused (issue 12).
    x = _counts()
    adata = _adata(x)
    before = adata.X.copy()
    with pytest.raises(MsfmInputError, match=r"only integer values \(max \d+\): these look like raw counts"):
        CellSource(adata, pre_normalized=True)
    assert (adata.X != before).nnz == 0


def test_row_index_errors():
    src = CellSource(_adata(_counts()))
    with pytest.raises(MsfmInputError, match=r"\[0, 60\)"):
        src.rows([60])
    with pytest.raises(MsfmInputError, match="boolean mask"):
        src.rows(np.ones(60, dtype=bool))
    assert src.rows([]).shape == (0, 25)
