"""The one normalisation (log1p CP10k): float64 numerics, which total divides, agreement with scanpy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from msfm.data import CellSource, GenePanel, harmonize_genes
from msfm.data.normalize import log1p_cp10k, normalized_rows, row_totals
from msfm.errors import MsfmInputError


def _counts() -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    x = rng.poisson(0.7, size=(40, 30)).astype(np.float32)
    x[5] = 0  # a cell without counts
    return sp.csr_matrix(x)


def test_values_are_float64_math_cast_to_float32() -> None:
    x = _counts()
    out = log1p_cp10k(x)
    assert out.dtype == np.float32
    dense = x.toarray().astype(np.float64)
    tot = dense.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(tot > 0, np.log1p(dense / tot * 1e4), 0.0).astype(np.float32)
    np.testing.assert_array_equal(out.toarray(), want)
    assert not out[5].toarray().any()
    # batching never changes a cell's values
    np.testing.assert_array_equal(log1p_cp10k(x[10:20]).toarray(), out[10:20].toarray())


def test_input_is_never_modified_and_dense_input_works() -> None:
    x = _counts()
    x_dup = sp.csr_matrix((np.array([1.0, 2.0]), np.array([3, 3]), np.array([0, 2])), shape=(1, 4))
    before = x_dup.copy()
    out = log1p_cp10k(x_dup)
    assert out.toarray()[0, 3] == pytest.approx(np.log1p(1e4))
    assert (x_dup.data == before.data).all()
    assert (x_dup.indices == before.indices).all()
    np.testing.assert_array_equal(log1p_cp10k(x.toarray()).toarray(), log1p_cp10k(x).toarray())


def test_given_totals_divide_instead_of_the_row_sums() -> None:
    x = _counts()
    totals = row_totals(x) * 2
    out = log1p_cp10k(x, totals=totals)
    dense = x.toarray().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(totals[:, None] > 0, np.log1p(dense / totals[:, None] * 1e4), 0).astype(np.float32)
    np.testing.assert_array_equal(out.toarray(), want)
    with pytest.raises(MsfmInputError, match="one library size per cell"):
        log1p_cp10k(x, totals=totals[:3])
    with pytest.raises(MsfmInputError, match="finite and non-negative"):
        log1p_cp10k(x, totals=-totals)


def test_normalized_rows_divides_by_all_genes_then_maps() -> None:
    x = _counts()
    genes = [f"G{i}" for i in range(x.shape[1])]
    adata = ad.AnnData(X=x, var={"x": np.arange(x.shape[1])})
    adata.var_names = genes
    panel = GenePanel.from_symbols(genes[:10][::-1], name="sub")
    mapping = harmonize_genes(adata.var, panel, min_panel_fraction=0.0, use_aliases=False)
    out = normalized_rows(CellSource(adata), np.array([3, 1]), mapping)
    full = log1p_cp10k(x).toarray()
    np.testing.assert_array_equal(out.toarray(), full[[3, 1]][:, :10][:, ::-1])
    # pre-normalised data are used as they are
    pre = ad.AnnData(X=sp.csr_matrix(full), var=adata.var)
    with pytest.warns(UserWarning, match="(?i)normali"):
        src = CellSource(pre, pre_normalized=True)
    np.testing.assert_array_equal(normalized_rows(src).toarray(), full)


def test_agrees_with_scanpy_to_one_float32_ulp() -> None:
    import scanpy as sc

    from msfm.datasets import pbmc68k

    a = pbmc68k()[:200]
    ref = ad.AnnData(X=sp.csr_matrix(a.layers["counts"], dtype=np.float32))
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    ours = log1p_cp10k(a.layers["counts"]).toarray()
    want = ref.X.toarray()
    ulp = np.spacing(np.maximum(want, np.float32(1e-30)))
    assert (np.abs(ours - want) <= ulp).all()
