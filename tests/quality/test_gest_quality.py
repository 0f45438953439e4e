"""GeST quality: a tiny model generates held-out spots better than the global-mean predictor.

Data: ``msfm.datasets.semi_real_tissue(n_cells=1500, n_domains=4, side_um=1000, seed=0)``: real PBMC profiles
(raw counts) placed in 4 spatial domains of different cell-type composition (the arrangement is synthetic, the
expression is real). Six 150 µm windows (198 cells) are held out (``held_out_windows(seed=0)``) and never seen in
training. ``gest-tiny`` (K = 48 meta-cells, 150 µm windows, at most 128 cells, batch 16) is trained 150 steps on
the other cells, then generates the held-out cells from their surroundings; ``msfm.gest.evaluate`` scores it
beside the global mean of the known cells (and kNN) in log1p CP10k space, "top" = the 50 genes of highest
Moran's I on the known cells.

Measured (2026-12-02, 2-core AMD EPYC, 1 torch thread, training seeds 0/1/2; the held-out cells are the same):

    | seed | GeST-W rmse_all | mean rmse_all | GeST-W rmse_top | mean rmse_top | GeST-W / mean (top) | GeST-W pearson_cell | mean pearson_cell | train |
    |---|---|---|---|---|---|---|---|---|
    | 0 | 1.5560 | 1.5882 | 1.6406 | 1.7792 | 0.922 | 0.442 | 0.404 | 14 s |
    | 1 | 1.5526 | 1.5882 | 1.6300 | 1.7792 | 0.916 | 0.445 | 0.404 | 16 s |
    | 2 | 1.5588 | 1.5882 | 1.6554 | 1.7792 | 0.930 | 0.439 | 0.404 | 20 s |

Asserted: GeST-W rmse_top < 0.96 x the mean's, rmse_all below the mean's, per-cell Pearson above the mean's + 0.015.
After 20 steps (seed 0) GeST-W is still the mean (rmse_all 1.5945, rmse_top 1.7891, Pearson 0.396) and fails all three.
The train times above were taken while other jobs shared the 2 cores; on idle cores the whole test takes 9-10 s.

On the real spots of ``scc_st`` (the demo's data) GeST's margin over the mean at an affordable step count is too
thin to test: 150 steps gave rmse_all 0.2401 vs 0.2409 (0.3 %), rmse_top 0.4392 vs 0.4429; the documented
400-step demo run gives 0.2370 vs 0.2409 (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

import msfm

# Not marked slow: 7-13 s each on 2 idle cores (tests/quality/ together: 38 s serial, 32 s with -n 2).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 150


def test_tiny_gest_generates_held_out_cells_better_than_the_mean(tmp_path):
    from msfm.data.spatial import spatial_coords
    from msfm.datasets.spatial import semi_real_tissue
    from msfm.engine.trainer import TrainerOptions

    gest = msfm.gest
    tissue = semi_real_tissue(n_cells=1500, n_domains=4, side_um=1000.0, seed=0)
    held = gest.held_out_windows(spatial_coords(tissue).xy, side_um=150.0, n_windows=6, seed=0)
    assert int(held.sum()) == 198
    cfg = gest.GestTrainConfig(
        preset="gest-tiny",
        n_genes=500,
        n_metacells=48,
        n_pcs=30,
        side_um=150.0,
        max_cells=128,
        batch_size=16,
        seed=0,
        trainer=TrainerOptions(
            max_steps=STEPS,
            checkpoint_every_n_steps=STEPS,
            progress_bar=False,
            model_summary=False,
            accelerator="cpu",
            seed=0,
        ),
    )
    model = gest.train(tissue, tmp_path / "run", config=cfg, held_out=held)
    assert model.metrics["global_step"] == STEPS
    ev = gest.evaluate(
        tissue,
        model,
        held_out=held,
        baselines=("mean", "knn"),
        modes=("weighted",),
        n_top_genes=50,
        seed=0,
        device="cpu",
        progress=False,
    )
    t = ev.table
    assert int(t.loc["mean", "n_cells"]) == 198
    gw, mean = t.loc["gest_weighted"], t.loc["mean"]
    numbers = t[["rmse_all", "rmse_top", "pearson_cell"]].to_dict()
    assert mean["rmse_all"] == pytest.approx(1.5882, abs=2e-3), numbers  # the baseline itself is fixed
    assert gw["rmse_top"] < 0.96 * mean["rmse_top"], numbers
    assert gw["rmse_all"] < mean["rmse_all"], numbers
    assert gw["pearson_cell"] > mean["pearson_cell"] + 0.015, numbers
