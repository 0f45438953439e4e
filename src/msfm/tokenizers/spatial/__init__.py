"""GeST spatial tokenisation: the meta-cell vocabulary, window sampling and cell serialisation.

GeST (paper only, no public code; see ``roam_gest.md`` B3/B4) turns a square tissue window into a sequence:

* **Cell tokens** come from a *meta-cell vocabulary* (:mod:`.vocab`): PCA (:mod:`.pca`) of model-space expression
  (``log1p(normalize_total)``), k-means (:mod:`.kmeans`) into ``K`` meta-cells, each storing its PCA centre and the
  mean expression of its member cells. A cell's token is its nearest centre in PCA space. K-means is run again on
  the meta-cells to give nested coarser labels (``K > K1 > K2 > K3``) for the hierarchical loss.
* **Windows** (:mod:`.sampler`): squares of side ``side_um`` (600 µm by default) cropped from one section around a
  random anchor cell.
* **Serialisation** (:mod:`.windows`): a *corner sweep*: start at one of the four corners of the window and order
  the cells by distance to it, perturbed with Gumbel noise (a Plackett-Luce draw with weights ``exp(-d / jitter)``),
  so that nearby cells get nearby indices while the order still varies between epochs. ``random`` and ``raster``
  orders exist for ablations.

Everything here is numpy/scipy (scikit-learn for k-means); torch only appears in the tensor export of the vocabulary.
Everything is deterministic given a seed.
"""

from __future__ import annotations

from msfm.tokenizers.spatial._inputs import Bounds
from msfm.tokenizers.spatial.sampler import Subsample, WindowSampler
from msfm.tokenizers.spatial.vocab import MetaCellVocab
from msfm.tokenizers.spatial.windows import (
    Order,
    Window,
    normalize_positions,
    serialize,
    tile_windows,
    window_cells,
)

__all__ = [
    "Bounds",
    "MetaCellVocab",
    "Order",
    "Subsample",
    "Window",
    "WindowSampler",
    "normalize_positions",
    "serialize",
    "tile_windows",
    "window_cells",
]
