"""Seeded K-fold assignment for cross-validation, optionally grouped (whole groups held out) and stratified.

Family-agnostic: the drug tasks hold out (cell line, drug) pairs, whole cell lines or whole drugs; ROAM keeps its own
patient-grouped slide splits in ``msfm.models.roam.splits``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError

__all__ = ["assign_folds", "check_fold_classes"]


def assign_folds(
    n: int,
    *,
    folds: int = 5,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    what: str = "samples",
) -> np.ndarray:
    """The held-out fold of every sample.

    Args:
        n: Number of samples.
        folds: Number of folds (>= 2).
        seed: Shuffling seed; the same inputs and seed give the same folds.
        groups: Group of each sample; a group is never split across folds (``GroupKFold``-like).
        labels: Class of each sample for stratified folds (``StratifiedKFold`` / ``StratifiedGroupKFold``).
        what: Name of the units in error messages (``"cell lines"``, ``"drugs"``, ...).

    Returns:
        ``[n]`` int64 fold index in ``0..folds-1``.

    Raises:
        MsfmInputError: ``folds < 2`` or more folds than samples (groups).
    """
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    if int(folds) < 2:
        msg = f"folds={folds}: cross-validation needs at least 2 folds."
        raise MsfmInputError(msg)
    units = n if groups is None else len(set(np.asarray(groups, dtype=object).tolist()))
    if units < folds:
        msg = f"folds={folds} is more than the {units} {what} there are to hold out. Use folds <= {units}."
        raise MsfmInputError(msg)
    fold = np.full(n, -1, dtype=np.int64)
    idx = np.arange(n)
    with warnings.catch_warnings():
        # "The least populated class has fewer members than n_splits": checked by check_fold_classes instead.
        warnings.simplefilter("ignore", UserWarning)
        if groups is None and labels is None:
            parts = KFold(folds, shuffle=True, random_state=seed).split(idx)
        elif groups is None:
            parts = StratifiedKFold(folds, shuffle=True, random_state=seed).split(idx, np.asarray(labels))
        elif labels is None:
            # Shuffle the groups once, then deal them to folds by size (largest first) to balance the folds.
            g = np.asarray(groups, dtype=object)
            uniq, inverse, counts = np.unique(g.astype(str), return_inverse=True, return_counts=True)
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(uniq))
            order = order[np.argsort(-counts[order], kind="stable")]
            load = np.zeros(folds, dtype=np.int64)
            group_fold = np.empty(len(uniq), dtype=np.int64)
            for u in order:
                k = int(np.argmin(load))
                group_fold[u] = k
                load[k] += counts[u]
            return group_fold[inverse].astype(np.int64)
        else:
            splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
            parts = splitter.split(idx, np.asarray(labels), np.asarray(groups, dtype=object).astype(str))
        for k, (_, held) in enumerate(parts):
            fold[held] = k
    return fold


def check_fold_classes(fold: np.ndarray, labels: np.ndarray, *, what: str = "samples") -> None:
    """Each fold's training part and held-out part contain both classes (AUROC and training need both).

    Raises:
        MsfmInputError: Naming the first fold with one class only, the class counts, and the fix.
    """
    y = np.asarray(labels)
    for k in np.unique(fold):
        for part, mask in (("held-out", fold == k), ("training", fold != k)):
            classes = np.unique(y[mask])
            if classes.size < 2:
                counts = {int(c): int((y == c).sum()) for c in np.unique(y)}
                msg = (
                    f"Fold {int(k)} has only one class ({int(classes[0]) if classes.size else 'none'}) among its "
                    f"{int(mask.sum())} {part} {what} (class counts overall {counts}); AUROC and training need both "
                    "classes. Use fewer folds or add samples of the rare class."
                )
                raise MsfmInputError(msg)
