"""Slides as training items: one bag of ROI features per slide (with ROI dropout), padded into batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from msfm.models.roam.feature_store import FeatureStore

__all__ = ["SlideBagDataset", "collate_slides"]


class SlideBagDataset(torch.utils.data.Dataset):
    """One item per slide: its ROI features, label and id; training items get ROI dropout.

    Args:
        store: Feature store.
        slide_ids: Slides.
        labels: Class index per slide.
        train: Apply ROI dropout / the ROI cap (deterministic in ``(seed, epoch, position)``).
        keep_fraction: Fraction of ROIs kept by ROI dropout.
        min_rois: ROI dropout applies from this many ROIs.
        max_rois: Cap on ROIs per item (random subset).
        seed: Base seed.
    """

    def __init__(
        self,
        store: FeatureStore,
        slide_ids: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        *,
        train: bool = False,
        keep_fraction: float = 1.0,
        min_rois: int = 16,
        max_rois: int | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.slide_ids = list(slide_ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.train = train
        self.keep_fraction = keep_fraction
        self.min_rois = min_rois
        self.max_rois = max_rois
        self.seed = seed

    def __len__(self) -> int:
        return len(self.slide_ids)

    def n_kept(self, n: int) -> int:
        """ROIs a training item keeps out of ``n``."""
        keep = n
        if self.keep_fraction < 1.0 and n >= self.min_rois:
            keep = max(1, int(n * self.keep_fraction))
        if self.max_rois is not None:
            keep = min(keep, self.max_rois)
        return keep

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, Any]:
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        sid = self.slide_ids[index]
        feats = self.store.get(sid)
        if self.train:
            n = feats.shape[0]
            keep = self.n_kept(n)
            if keep < n:
                rng = np.random.default_rng([self.seed, epoch, position])
                feats = feats[np.sort(rng.choice(n, keep, replace=False))]
        return {"features": torch.from_numpy(feats), "label": int(self.labels[index]), "slide_id": sid}


def collate_slides(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pad slides to the largest ROI count of the batch.

    Returns:
        ``features`` float ``[B, K, 84, d]`` (zeros on padding), ``roi_mask`` bool ``[B, K]``, ``labels`` long
        ``[B]``, ``slide_ids`` list of str.
    """
    k = max(int(it["features"].shape[0]) for it in items)
    first = items[0]["features"]
    feats = first.new_zeros((len(items), k, *first.shape[1:]))
    mask = torch.zeros(len(items), k, dtype=torch.bool)
    for i, it in enumerate(items):
        n = int(it["features"].shape[0])
        feats[i, :n] = it["features"]
        mask[i, :n] = True
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    return {
        "features": feats,
        "roi_mask": mask,
        "labels": labels,
        "slide_ids": [it["slide_id"] for it in items],
    }
