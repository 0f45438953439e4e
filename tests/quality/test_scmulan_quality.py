"""scMulan quality: a tiny model trained from scratch annotates held-out real PBMCs far above the majority class.

Data: ``msfm.datasets.pbmc68k()`` (700 real PBMCs, 10 labels), split 70/30 stratified by label (seed 0), as the
demo splits it. The model is ``scmulan-tiny`` narrowed to 64 wide x 2 layers (so 250 steps fit in ~20 s on one
core), trained on the annotation task only (``genes + <PCT>`` -> label) with the 256 most variable genes, then
annotates the 210 held-out cells with constrained greedy decoding.

Measured (2026-12-02, 2-core AMD EPYC, 1 torch thread, training seeds 0/1/2; the split is always seed 0):

    | training seed | accuracy | macro-F1 | train time |
    |---|---|---|---|
    | 0 | 0.686 | 0.355 | 17.5 s |
    | 1 | 0.714 | 0.367 | 19.5 s |
    | 2 | 0.662 | 0.300 | 21.2 s |
    | majority class (trivial baseline) | 0.343 | 0.051 | |

The asserted margins (accuracy >= majority + 0.20, macro-F1 >= 0.20) sit well inside these runs; 40 steps
(0.343 = the majority class, macro-F1 0.051) and 150 steps with seeds 1/2 (0.481 accuracy, macro-F1 0.12-0.13)
fail them, so the test measures learning, not just that training runs. The train times above were taken
while other jobs shared the 2 cores; on idle cores the whole test takes 12 s (13 s under `-n 2`).
"""

from __future__ import annotations

import numpy as np
import pytest

import msfm

# Marked slow: 28 s in the full suite with -n 2 (2026-12-02, 2-core AVX2 EPYC), above the ~20 s the marker means.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 250


@pytest.mark.slow
def test_tiny_scmulan_annotates_held_out_pbmcs_above_the_majority_class(tmp_path):
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    sm = msfm.scmulan
    adata = msfm.datasets.pbmc68k()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    idx_train, idx_test = train_test_split(
        np.arange(adata.n_obs), test_size=0.3, stratify=labels, random_state=0
    )
    train_cells = adata[np.sort(idx_train)].copy()
    test_cells = adata[np.sort(idx_test)].copy()
    cfg = sm.ScMulanTrainConfig(
        preset="scmulan-tiny",
        model_overrides={"dim": 64, "depth": 2, "num_heads": 4},
        meta_columns={"cell_type": "cell_type"},
        tasks={"annotate": 1.0},
        loss={"expression_weight": 1.0},  # the release's 200 swamps the label signal of a tiny model (demo)
        vocabulary="data",
        n_genes=256,
        seed=0,
    )
    run = sm.train(
        train_cells,
        tmp_path / "run",
        config=cfg,
        max_steps=STEPS,
        batch_size=16,
        lr=3e-3,
        warmup_steps=STEPS // 20,
        accelerator="cpu",
        devices=1,
        checkpoint_every_n_steps=STEPS,
        progress_bar=False,
    )
    sm.predict(test_cells, run, min_confidence=0.0, batch_size=64, device="cpu", progress=False)

    truth = test_cells.obs["cell_type"].astype(str).to_numpy()
    pred = test_cells.obs["scmulan_cell_type"].astype(str).to_numpy()
    assert not set(test_cells.obs_names) & set(train_cells.obs_names)  # held out for real
    majority = max(np.mean(truth == c) for c in set(truth))
    assert majority == pytest.approx(0.343, abs=0.01)  # CD14+ Monocyte
    accuracy = float(np.mean(pred == truth))
    macro_f1 = float(f1_score(truth, pred, average="macro"))
    assert accuracy >= majority + 0.20, (accuracy, macro_f1, majority)
    assert macro_f1 >= 0.20, (accuracy, macro_f1)
