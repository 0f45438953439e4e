"""``warn_once``: one warning per process and message, however many readers reach it."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from msfm.runtime.warn_once import warn_once


def test_warn_once_shows_each_message_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_once("a") is True
        assert warn_once("a") is False
        assert warn_once("b") is True
    assert [str(w.message) for w in caught] == ["a", "b"]


def test_pre_normalized_warning_is_shown_once_and_names_no_model_family():
    import anndata as ad

    from msfm.data import CellSource

    x = sp.csr_matrix(np.log1p(np.arange(1, 41, dtype=np.float32).reshape(4, 10) / 10))
    adata = ad.AnnData(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):  # every verb and every pass over the data builds its own source
            CellSource(adata, pre_normalized=True)
    messages = [str(w.message) for w in caught if "pre_normalized=True" in str(w.message)]
    assert len(messages) == 1
    assert "scFoundation" not in messages[0]


@pytest.mark.parametrize(
    ("family", "verb"),
    [("roam", "predict"), ("roam", "heatmap"), ("roam", "cascade")]
    + [("gest", v) for v in ("generate", "embed", "perturb", "evaluate")],
)
def test_looping_verbs_take_progress(family, verb):
    import msfm

    fn = getattr(getattr(msfm, family), verb)
    param = inspect.signature(fn).parameters["progress"]
    assert param.default is True
