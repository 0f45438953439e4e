"""Perturbation metrics and the three baselines (plain functions, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from msfm.eval.perturb_metrics import (
    additive_linear,
    mean_shift,
    no_change,
    pearson,
    perturbation_metrics,
    top_de_genes,
)

rng = np.random.default_rng(0)
CTRL = rng.uniform(0, 3, size=50)


def test_perfect_prediction_scores_perfectly():
    true = CTRL + rng.normal(size=50)
    m = perturbation_metrics(true, true, CTRL)
    assert m["mse_top20_de"] == 0.0
    assert m["pearson_top20_de"] == pytest.approx(1.0)
    assert m["pearson_delta"] == pytest.approx(1.0)
    assert m["direction_acc_top20_de"] == 1.0


def test_no_change_has_zero_delta_correlation_and_real_error():
    true = CTRL + rng.normal(size=50)
    m = perturbation_metrics(no_change(CTRL), true, CTRL)
    assert m["pearson_delta"] == 0.0
    assert m["direction_acc_top20_de"] == 0.0
    assert m["mse_top20_de"] > 0.5
    flipped = perturbation_metrics(CTRL - (true - CTRL), true, CTRL)
    assert flipped["pearson_delta"] == pytest.approx(-1.0)
    assert flipped["direction_acc_top20_de"] == 0.0


def test_top_de_genes_are_the_largest_absolute_deltas():
    true = CTRL.copy()
    true[[3, 7]] += [5.0, -6.0]
    assert top_de_genes(true, CTRL, 2).tolist() == [7, 3]
    assert pearson(np.ones(4), np.arange(4)) == 0.0


def test_mean_shift_adds_the_mean_training_delta():
    deltas = np.stack([np.full(50, 1.0), np.full(50, 3.0)])
    np.testing.assert_allclose(mean_shift(CTRL, deltas), CTRL + 2.0)


def test_additive_linear_sums_single_effects_and_averages_a_label():
    da, db = rng.normal(size=50), rng.normal(size=50)
    pred = additive_linear(CTRL, [("A",), ("B",)], np.stack([da, db]), ("A", "B"), ridge=1e-9)
    np.testing.assert_allclose(pred, CTRL + da + db, atol=1e-6)
    stim = np.stack([np.full(50, 1.0), np.full(50, 2.0), np.full(50, 3.0)])
    pred = additive_linear(CTRL, [("stim",)] * 3, stim, ("stim",), ridge=1e-9)
    np.testing.assert_allclose(pred, CTRL + 2.0, atol=1e-6)
    # a token never trained on contributes nothing
    np.testing.assert_allclose(additive_linear(CTRL, [("A",)], da[None], ("C",)), CTRL)
