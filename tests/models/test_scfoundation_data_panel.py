"""``gene_panel="data"`` sizes the model to the genes found: finding few of the full panel is expected there."""

from __future__ import annotations

import warnings

import pytest


def test_data_panel_does_not_warn_about_the_full_panel():
    import msfm
    from msfm.models.scfoundation.pretraining import resolve_panel

    adata = msfm.datasets.pbmc68k()[:8].copy()  # 765 genes: about 4% of the 19,264-gene panel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        panel = resolve_panel("data", [adata])
    assert 500 < len(panel) <= adata.n_vars
    assert not [w for w in caught if "panel genes" in str(w.message)]


def test_full_panel_still_warns_about_missing_genes():
    import msfm
    from msfm.data import harmonize_genes
    from msfm.models.scfoundation.pretraining import resolve_panel

    adata = msfm.datasets.pbmc68k()[:8].copy()
    with pytest.warns(UserWarning, match=r"panel genes .* were found in the input"):
        harmonize_genes(adata.var, resolve_panel("scfoundation", [adata]))
