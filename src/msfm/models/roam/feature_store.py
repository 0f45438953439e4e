"""Feature folders: finding each slide's feature file and reading ROI features through the feature-file contract.

:class:`FeatureStore` checks every file against one encoder and feature dimension (the first file read sets them
when the model does not), so features of two encoders are never mixed, and caches slides within a memory budget.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msfm.data.slide_ids import check_slide_ids
from msfm.data.slides import SLIDE_EXTENSIONS
from msfm.errors import MsfmInputError
from msfm.models.roam.features import feature_path, read_slide_features
from msfm.runtime.jsonable import to_jsonable

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = ["FeatureStore", "list_feature_slides", "resolve_feature_files"]

# Suffixes stripped when slides are given as file names (feature files and formats msfm does not read too).
_SLIDE_SUFFIXES = {*SLIDE_EXTENSIONS, ".czi", ".isyntax", ".h5"}


def _format_missing(missing: Sequence[str], features_dir: Path) -> str:
    shown = ", ".join(missing[:10])
    more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
    return (
        f"{len(missing)} slide(s) have no feature file in {features_dir} (looked for <slide_id>.h5 there and in "
        f"its features/ subfolder): {shown}{more}."
    )


def resolve_feature_files(
    slide_ids: Sequence[str], features_dir: PathLike, *, skip_missing: bool = False
) -> tuple[dict[str, Path], list[str]]:
    """Find the feature file of each slide.

    A slide id that carries a slide-file suffix (``A01.svs``) also matches ``A01.h5``.

    Args:
        slide_ids: Slide ids.
        features_dir: Folder written by ``msfm roam preprocess`` (``DIR/features/<id>.h5``) or a folder of
            ``<id>.h5`` files.
        skip_missing: Drop slides without a file (with a warning) instead of raising.

    Returns:
        ``(paths, missing)``: slide id -> feature file for the slides found, and the ids without a file.

    Raises:
        MsfmInputError: If the folder does not exist, or files are missing and ``skip_missing`` is False (the
            message lists the first 10 missing ids, their count and the folder searched).
    """
    root = Path(features_dir)
    if not root.is_dir():
        msg = f"Features folder {root} does not exist. Pass the --out folder of `msfm roam preprocess`."
        raise MsfmInputError(msg)
    found: dict[str, Path] = {}
    missing: list[str] = []
    # Ids name files: one that leaves the folder (``../x``) is refused before any path is built from it.
    for sid in check_slide_ids(slide_ids):
        candidates = [sid]
        suffix = Path(sid).suffix.lower()
        if suffix in _SLIDE_SUFFIXES:
            candidates.append(sid[: -len(suffix)])
        for cand in candidates:
            path = Path(feature_path(root, cand))
            if path.is_file():
                found[sid] = path
                break
        else:
            missing.append(sid)
    if missing:
        text = _format_missing(missing, root)
        if not skip_missing:
            msg = f"{text} Extract their features with `msfm roam preprocess`, or pass --skip-missing to leave them out."
            raise MsfmInputError(msg)
        logger.warning("%s They are left out (--skip-missing).", text)
    return found, missing


def list_feature_slides(features_dir: PathLike) -> list[str]:
    """Slide ids of every ``*.h5`` feature file in a features folder (or its ``features/`` subfolder).

    Raises:
        MsfmInputError: If the folder holds no feature file.
    """
    root = Path(features_dir)
    for folder in (root / "features", root):
        files = (
            sorted(f for f in folder.glob("*.h5") if not f.name.startswith(".")) if folder.is_dir() else []
        )
        if files:
            return check_slide_ids([f.stem for f in files], f"feature files in {folder}")
    msg = f"No feature files (*.h5) in {root} or {root / 'features'}. Run `msfm roam preprocess` first."
    raise MsfmInputError(msg)


class FeatureStore:
    """Read ROI features per slide through the feature-file contract, caching them in memory up to a budget.

    Every file is checked against the expected encoder and feature dimension (the first file read sets them
    when they are not given), so features from two different encoders are never mixed.

    Args:
        paths: Slide id -> feature file.
        encoder: Expected encoder name (None: take the first file's).
        feature_dim: Expected feature dimension (None: take the first file's).
        cache_bytes: Keep slides in memory while their total size stays below this (0 disables).
    """

    def __init__(
        self,
        paths: Mapping[str, Path],
        *,
        encoder: str | None = None,
        feature_dim: int | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.paths = dict(paths)
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[str, np.ndarray] = {}
        self._cached_bytes = 0
        self.n_rois: dict[str, int] = {}
        self.attrs: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, slide_id: str) -> Any:
        """The :class:`~msfm.models.roam.features.SlideFeatures` of a slide (not cached)."""
        if slide_id not in self.paths:
            msg = f"Slide {slide_id!r} has no feature file in this store ({len(self.paths)} slides)."
            raise MsfmInputError(msg)
        sf = read_slide_features(self.paths[slide_id], encoder=self.encoder, feature_dim=self.feature_dim)
        feats = np.asarray(sf.features)
        if feats.ndim != 3 or feats.shape[0] == 0:
            msg = (
                f"Feature file {self.paths[slide_id]} of slide {slide_id!r} holds features of shape {feats.shape}; "
                "expected [n_roi >= 1, 84, d]. Re-run `msfm roam preprocess` for it or leave the slide out."
            )
            raise MsfmInputError(msg)
        self.n_rois[slide_id] = int(feats.shape[0])
        if self.attrs is None:
            self.attrs = dict(getattr(sf, "attrs", {}) or {})
            if self.encoder is None:
                enc = _attr_str(self.attrs.get("encoder"))
                self.encoder = None if enc in (None, "", "unknown") else enc
            if self.feature_dim is None:
                self.feature_dim = int(feats.shape[-1])
        return sf

    def get(self, slide_id: str) -> np.ndarray:
        """ROI features of a slide.

        Shape:
            returns float32 ``[n_roi, 84, d]``.
        """
        hit = self._cache.get(slide_id)
        if hit is not None:
            return hit
        feats = np.ascontiguousarray(self.read(slide_id).features, dtype=np.float32)
        if self._cached_bytes + feats.nbytes <= self.cache_bytes:
            self._cache[slide_id] = feats
            self._cached_bytes += feats.nbytes
        return feats

    def encoder_description(self) -> dict[str, Any]:
        """Encoder name, its ``describe()`` record (when the files carry one) and the feature dimension."""
        attrs = self.attrs or {}
        config = attrs.get("encoder_config")
        if isinstance(config, bytes):
            config = config.decode("utf-8")
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError:
                pass
        return {"name": self.encoder, "config": to_jsonable(config), "feature_dim": self.feature_dim}

    def preprocessing(self) -> dict[str, Any]:
        """The slide-processing parameters recorded in the feature files (mpp, ROI size, stain normalisation)."""
        keys = (
            "target_mpp",
            "roi_size",
            "patch_size",
            "tokens_per_roi",
            "stain_norm",
            "stain_target",
            "encoder",
        )
        attrs = self.attrs or {}
        out = {k: to_jsonable(attrs[k]) for k in keys if attrs.get(k) is not None}
        config = attrs.get("preprocess_config")
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except json.JSONDecodeError:
                config = None
        if isinstance(config, dict) and config:
            out["preprocess_config"] = to_jsonable(config)
        return out


def _attr_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)
