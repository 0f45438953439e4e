"""PCC, SCC and RMSE (msfm.eval.regression)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from msfm.errors import MsfmInputError
from msfm.eval.regression import regression_scores


def test_scores_match_scipy_and_the_definition():
    rng = np.random.default_rng(0)
    t = rng.normal(size=50)
    p = t + rng.normal(scale=0.5, size=50)
    s = regression_scores(t, p)
    assert s["pcc"] == pytest.approx(pearsonr(t, p)[0])
    assert s["scc"] == pytest.approx(spearmanr(t, p)[0])
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean((t - p) ** 2)))
    assert s["n"] == 50
    perfect = regression_scores(t, 2 * t + 1)
    assert perfect["pcc"] == pytest.approx(1.0)
    assert perfect["scc"] == pytest.approx(1.0)


def test_constant_prediction_has_no_correlation_but_an_rmse():
    s = regression_scores([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert np.isnan(s["pcc"])
    assert np.isnan(s["scc"])
    assert s["rmse"] == pytest.approx(np.sqrt(2 / 3))


def test_bad_inputs_are_refused():
    with pytest.raises(MsfmInputError, match="paired"):
        regression_scores([1, 2, 3], [1, 2])
    with pytest.raises(MsfmInputError, match="finite"):
        regression_scores([1, 2, np.nan], [1, 2, 3])
