"""A small demo-like folder for the ``msfm view`` server tests: real pyramid TIFF slides (the bundled images), a
ROAM heatmap folder written with the real ``rois_anndata`` writer, a cascade table, spatial spots and embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def build_demo_like(root: Path) -> Path:
    """Write ``root/roam/{cohort,heatmaps,cascade_predictions.csv}`` and ``root/cells.h5ad``, ``root/spots.h5ad``."""
    import anndata
    from PIL import Image

    from msfm.data.slides import open_slide
    from msfm.datasets.histology import build_cohort
    from msfm.models.roam.heatmaps import rois_anndata

    cohort = root / "roam" / "cohort"
    table = build_cohort(cohort, n_slides_per_class=1, seed=0, roi_px=512)
    sid = str(table["slide_id"].iloc[0])
    image = Path(table["path"].iloc[0]) if "path" in table else next((cohort / "slides").glob(f"{sid}.*"))
    with open_slide(image) as slide:
        thumb, ds = slide.thumbnail(200)
    coords = np.array([[0, 0], [512, 0], [0, 512]], dtype=np.int64)
    scores = np.array([0.5, 0.3, 0.2])
    heat = root / "roam" / "heatmaps" / sid
    (heat / "roi_maps").mkdir(parents=True)
    meta = {
        "slide_id": sid,
        "class_shown": "cmu",
        "predicted_class": "cmu",
        "probabilities": {"cmu": 0.7, "tia": 0.3},
    }
    rois = rois_anndata(sid, coords, 512, scores, np.array([100.0, 66.7, 33.3]), thumb, ds, meta)
    rois.write_h5ad(heat / "rois.h5ad")
    rng = np.random.default_rng(0)
    np.savez(
        heat / "roi_maps" / "roi0.npz",
        **{"20x": rng.random((8, 8)), "10x": rng.random((4, 4)), "5x": rng.random((2, 2))},
    )
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(heat / "roi_maps" / "roi0.png")
    summary = {
        **meta,
        "slide_path": str(image),
        "n_rois": 3,
        "method": "grad_rollout",
        "colour_by": "percentile",
    }
    (heat / "summary.json").write_text(json.dumps(summary))
    ids = list(table["slide_id"].astype(str))
    pd.DataFrame(
        {
            "slide_id": ids,
            "source": ["cmu"] * len(ids),
            "source_confidence": [0.9] * len(ids),
            "stages": ["source"] * len(ids),
        }
    ).to_csv(root / "roam" / "cascade_predictions.csv", index=False)

    n = 300
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], n)),
            "scmulan_confidence": rng.random(n),
            "n_genes": rng.integers(100, 900, n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    cells = anndata.AnnData(X=rng.random((n, 5)).astype(np.float32), obs=obs)
    cells.obsm["X_umap"] = rng.normal(size=(n, 2))
    cells.obsm["X_pca"] = rng.normal(size=(n, 10))
    cells.write_h5ad(root / "cells.h5ad")

    spots = anndata.AnnData(
        X=rng.random((50, 4)).astype(np.float32),
        obs=pd.DataFrame(
            {"niche": pd.Categorical(rng.choice(["a", "b"], 50))}, index=[f"s{i}" for i in range(50)]
        ),
        var=pd.DataFrame(index=["G1", "G2", "G3", "G4"]),
    )
    spots.obsm["spatial"] = rng.uniform(0, 1000, size=(50, 2))
    spots.write_h5ad(root / "spots.h5ad")
    (root / "figures").mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "figures" / "not_a_slide.png")
    return root
