"""Feature folders: finding each slide's feature file and reading ROI features through the feature-file contract.

:class:`FeatureStore` checks every file against one encoder and feature dimension (the first file read sets them
when the model does not), so features of two encoders are never mixed, and caches slides within a memory budget.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msfm.data.slide_ids import check_slide_ids
from msfm.data.slides import SLIDE_EXTENSIONS
from msfm.errors import MsfmInputError
from msfm.models.roam.features import GEOMETRY_KEYS, feature_path, read_slide_features
from msfm.runtime.jsonable import to_jsonable

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

__all__ = ["FeatureStore", "list_feature_slides", "resolve_feature_files", "training_geometry"]

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


def training_geometry(metas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ROI geometry (ROI size, patch size, target mpp) the models were trained on, from their ``meta.json``.

    ``msfm roam train`` stores the preprocessing recorded in the training feature files under
    ``meta["preprocessing"]``; models converted from the release or saved without it give ``{}`` (nothing to check).

    Raises:
        MsfmInputError: The models were trained on different geometries (they cannot share feature files).
    """
    found: list[dict[str, Any]] = []
    for meta in metas:
        pre = meta.get("preprocessing") or {}
        geo = {k: pre[k] for k in GEOMETRY_KEYS if isinstance(pre, Mapping) and pre.get(k) is not None}
        if geo:
            found.append(geo)
    if not found:
        return {}
    if any(not _same_geometry(g, found[0]) or set(g) != set(found[0]) for g in found[1:]):
        msg = (
            f"The models were trained on features of different ROI geometry ({found}); they cannot share feature "
            "files. Ensemble models trained on features made with one `msfm roam preprocess` setting."
        )
        raise MsfmInputError(msg)
    return found[0]


def _same_value(key: str, a: Any, b: Any) -> bool:
    if key == "target_mpp":
        return math.isclose(float(a), float(b), rel_tol=1e-3)
    return int(a) == int(b)


def _same_geometry(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(_same_value(k, a[k], b[k]) for k in a if k in b)


def _describe(geo: Mapping[str, Any]) -> str:
    parts = []
    if "roi_size" in geo:
        parts.append(f"ROI size {int(geo['roi_size'])} px")
    if "patch_size" in geo:
        parts.append(f"patch size {int(geo['patch_size'])} px")
    if "target_mpp" in geo:
        parts.append(f"{float(geo['target_mpp']):g} µm/px")
    return ", ".join(parts)


class FeatureStore:
    """Read ROI features per slide through the feature-file contract, caching them in memory up to a budget.

    Every file is checked against the expected encoder and feature dimension (the first file read sets them
    when they are not given), so features from two different encoders are never mixed, and against the ROI
    geometry the model was trained on (``geometry``): a file made with another ROI size, patch size or
    magnification is refused; a file that does not record its geometry is read with a warning.

    Args:
        paths: Slide id -> feature file.
        encoder: Expected encoder name (None: take the first file's).
        feature_dim: Expected feature dimension (None: take the first file's).
        cache_bytes: Keep slides in memory while their total size stays below this (0 disables).
        geometry: Expected ROI geometry (:func:`training_geometry`); None or empty: not checked.
    """

    def __init__(
        self,
        paths: Mapping[str, Path],
        *,
        encoder: str | None = None,
        feature_dim: int | None = None,
        cache_bytes: int = 0,
        geometry: Mapping[str, Any] | None = None,
    ) -> None:
        self.paths = dict(paths)
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.geometry = dict(geometry or {})
        self._unrecorded: list[str] = []
        self.recorded_attrs: frozenset[str] = frozenset()
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
        if self.geometry:
            self._check_geometry(slide_id, sf)
        if self.attrs is None:
            self.attrs = dict(getattr(sf, "attrs", {}) or {})
            self.recorded_attrs = frozenset(getattr(sf, "recorded_attrs", frozenset()))
            if self.encoder is None:
                enc = _attr_str(self.attrs.get("encoder"))
                self.encoder = None if enc in (None, "", "unknown") else enc
            if self.feature_dim is None:
                self.feature_dim = int(feats.shape[-1])
        return sf

    def _check_geometry(self, slide_id: str, sf: Any) -> None:
        """Refuse features of another ROI geometry than the model's; warn (once) for files that record none."""
        path = self.paths[slide_id]
        recorded = getattr(sf, "recorded_attrs", frozenset())
        found = {k: sf.attrs[k] for k in self.geometry if k in recorded and sf.attrs.get(k) is not None}
        differ = [k for k in found if not _same_value(k, found[k], self.geometry[k])]
        if differ:
            want = " ".join(
                f"--{k.replace('_', '-')} {self.geometry[k]:g}"
                if k == "target_mpp"
                else f"--{k.replace('_', '-')} {int(self.geometry[k])}"
                for k in GEOMETRY_KEYS
                if k in self.geometry
            )
            msg = (
                f"Feature file {str(path)!r} of slide {slide_id!r} was made with {_describe(found)}, but the model was "
                f"trained on features with {_describe(self.geometry)} ({', '.join(differ)} differ). Predictions on "
                f"another ROI geometry are meaningless, however confident. Fix: re-run `msfm roam preprocess` with "
                f"{want} into a new output folder, or use a model trained on features of this geometry."
            )
            raise MsfmInputError(msg)
        missing = [k for k in self.geometry if k not in found]
        if missing and not self._unrecorded:
            self._unrecorded.append(slide_id)
            warnings.warn(
                f"Feature file {str(path)!r} does not record its {', '.join(missing)} (made by another tool or an old "
                f"version), so msfm cannot check it against the model's training features ({_describe(self.geometry)}). "
                "It is used as if it matched; re-run `msfm roam preprocess` to make files that record it.",
                UserWarning,
                stacklevel=3,
            )

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
        # ROI geometry only where the files record it: a default would later be taken for the training geometry.
        out = {
            k: to_jsonable(attrs[k])
            for k in keys
            if attrs.get(k) is not None and (k not in GEOMETRY_KEYS or k in self.recorded_attrs)
        }
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
