"""ROI feature files: the contract between slide preprocessing and every ROAM model.

One HDF5 file per slide, ``<features_dir>/<slide_id>.h5``:

* ``features``: float32 ``[n_roi, 84, d]``, one chunk per ROI, uncompressed (feature files are read whole and
  often; gzip would cost more time than the disk it saves). Token order per ROI: 0-63 the 20x patches (8x8,
  row-major), 64-79 the 10x patches (4x4), 80-83 the 5x patches (2x2).
* ``coords``: int64 ``[n_roi, 2]``, level-0 ``(x, y)`` of each ROI's top-left corner.
* ``tissue_fraction`` (optional): float32 ``[n_roi]``, share of the ROI covered by the tissue mask.
* root attributes: see :data:`ATTR_DEFAULTS` (slide path and mpp, ROI geometry, encoder name and description,
  stain normalisation, preprocessing config, versions).

Files written by other tools are read too: ROAM's official extractor (``features`` with 85 tokens per ROI and
``coords``, no attributes; the 85th token, an extra 2.5x view, is dropped) and any file with just those two
datasets. Missing attributes take the defaults of :data:`ATTR_DEFAULTS`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import atomic_path
from msfm.runtime.h5ad import open_hdf5

logger = logging.getLogger(__name__)

__all__ = [
    "ATTR_DEFAULTS",
    "FEATURE_SCHEMA_VERSION",
    "GEOMETRY_KEYS",
    "TOKENS_PER_ROI",
    "SlideFeatures",
    "feature_path",
    "read_feature_attrs",
    "read_slide_features",
    "write_slide_features",
]

FEATURE_SCHEMA_VERSION = 1
TOKENS_PER_ROI = 84
# ROAM's published extractor writes one extra token per ROI (the ROI shrunk to one 256 px patch, "2.5x").
_LEGACY_TOKENS = 85

# Attributes of a feature file and the value a file without them gets. ROI geometry defaults to ROAM's
# standard (2048 px ROIs of 256 px patches at 0.5 um/px), which is what the official files hold.
ATTR_DEFAULTS: dict[str, Any] = {
    "slide_path": None,
    "slide_mpp": None,
    "target_mpp": 0.5,
    "roi_size": 2048,
    "roi_size_level0": None,
    "patch_size": 256,
    "tokens_per_roi": TOKENS_PER_ROI,
    "encoder": "unknown",
    "encoder_config": "{}",
    "feature_dim": None,
    "stain_norm": "unknown",
    "stain_target": None,
    "grid_shape": None,
    "slide_dimensions": None,
    "preprocess_config": "{}",
    "msfm_version": None,
    "schema_version": 0,
}


#: The ROI geometry a model depends on: ROI side and patch side in pixels at ``target_mpp`` (µm per pixel, the
#: magnification: 0.5 = 20x). The three token levels per ROI (20x, 10x, 5x) follow from them. ``msfm roam
#: preprocess`` records them in every file; a model trained on one geometry gives meaningless predictions on another.
GEOMETRY_KEYS = ("roi_size", "patch_size", "target_mpp")


@dataclass
class SlideFeatures:
    """The ROI features of one slide.

    Attributes:
        slide_id: Slide identifier (the file stem).
        features: Patch features of every ROI.
        coords: Level-0 ``(x, y)`` top-left of every ROI.
        tissue_fraction: Tissue share of every ROI, if known.
        attrs: File attributes (see :data:`ATTR_DEFAULTS`).
        recorded_attrs: The attributes the file itself holds (the others in ``attrs`` are defaults); empty for
            features made in memory.

    Shape:
        - features: float32 ``[n_roi, 84, d]``
        - coords: int64 ``[n_roi, 2]``
        - tissue_fraction: float32 ``[n_roi]``
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    tissue_fraction: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    recorded_attrs: frozenset[str] = field(default_factory=frozenset)

    def geometry(self) -> dict[str, Any]:
        """The ROI geometry (:data:`GEOMETRY_KEYS`) the file records; keys it does not record are left out."""
        return {
            k: self.attrs[k]
            for k in GEOMETRY_KEYS
            if k in self.recorded_attrs and self.attrs.get(k) is not None
        }

    @property
    def n_roi(self) -> int:
        """Number of ROIs."""
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.features.shape[-1])

    @property
    def encoder(self) -> str:
        """Name of the encoder that made the features (``"unknown"`` for legacy files)."""
        return str(self.attrs.get("encoder", "unknown"))

    @property
    def encoder_config(self) -> dict[str, Any]:
        """The encoder description (:meth:`~msfm.models.roam.encoders.PatchEncoder.describe`) as a dict."""
        return _json_attr(self.attrs.get("encoder_config"))

    @property
    def preprocess_config(self) -> dict[str, Any]:
        """The preprocessing configuration the file was made with, as a dict (empty for legacy files)."""
        return _json_attr(self.attrs.get("preprocess_config"))


def _json_attr(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if not value:
        return {}
    try:
        out = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def feature_path(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Path of a slide's feature file: ``features_dir/<slide_id>.h5``.

    ``features_dir`` may also be a preprocessing output folder: when it has a ``features`` subfolder and no
    ``<slide_id>.h5`` of its own, the file is looked up in ``features_dir/features``.
    """
    d = Path(features_dir)
    direct = d / f"{slide_id}.h5"
    if not direct.exists() and (d / "features").is_dir():
        return d / "features" / f"{slide_id}.h5"
    return direct


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def _to_attr(value: Any) -> Any:
    """An HDF5-storable version of an attribute value (dicts become JSON strings)."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return np.asarray(value)
    return value


def _from_attr(value: Any) -> Any:
    """Plain Python values from HDF5 attributes (numpy scalars and arrays, bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_from_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_slide_features(path: str | os.PathLike[str], sf: SlideFeatures) -> Path:
    """Write a slide's features to an HDF5 file atomically (temporary sibling, then ``os.replace``).

    A crash or kill never leaves a partial file at ``path``, so "file exists and reads" means "slide done".

    Args:
        path: Output ``.h5`` path; its folder must exist.
        sf: The features. ``features`` must be ``[n_roi, 84, d]`` and ``coords`` ``[n_roi, 2]``.

    Returns:
        The written path.

    Raises:
        MsfmInputError: Wrong shapes, or the folder does not exist.
    """
    target = Path(path)
    feats = np.asarray(sf.features, dtype=np.float32)
    coords = np.asarray(sf.coords, dtype=np.int64)
    if feats.ndim != 3 or feats.shape[1] != TOKENS_PER_ROI:
        msg = f"features must be float32 [n_roi, {TOKENS_PER_ROI}, d]; got shape {feats.shape} for {sf.slide_id!r}."
        raise MsfmInputError(msg)
    if coords.shape != (feats.shape[0], 2):
        msg = f"coords must be [n_roi, 2] = [{feats.shape[0]}, 2]; got {coords.shape} for {sf.slide_id!r}."
        raise MsfmInputError(msg)
    tissue = None
    if sf.tissue_fraction is not None:
        tissue = np.asarray(sf.tissue_fraction, dtype=np.float32)
        if tissue.shape != (feats.shape[0],):
            msg = f"tissue_fraction must be [n_roi] = [{feats.shape[0]}]; got {tissue.shape}."
            raise MsfmInputError(msg)
    if not target.parent.is_dir():
        msg = f"Cannot write {target}: the folder {target.parent} does not exist. Create it first."
        raise MsfmInputError(msg)
    attrs = {**ATTR_DEFAULTS, **sf.attrs}
    attrs.update(
        slide_id=sf.slide_id,
        feature_dim=int(feats.shape[2]),
        tokens_per_roi=TOKENS_PER_ROI,
        schema_version=FEATURE_SCHEMA_VERSION,
    )
    if attrs.get("msfm_version") is None:
        from msfm._version import __version__

        attrs["msfm_version"] = __version__
    # open_hdf5: a full disk is an OutputError and the temporary is removed, instead of an HDF5 crash.
    with atomic_path(target, suffix=".h5") as tmp, open_hdf5(tmp) as out:
        f = out.file
        # One chunk per ROI: readers that take a subset of ROIs touch only those chunks.
        chunks = (1, TOKENS_PER_ROI, feats.shape[2]) if feats.shape[0] > 0 else None
        f.create_dataset("features", data=feats, chunks=chunks)
        f.create_dataset("coords", data=coords)
        if tissue is not None:
            f.create_dataset("tissue_fraction", data=tissue)
        for key, value in attrs.items():
            if value is None:  # HDF5 has no null; absent means "unknown" and reads back as the default
                continue
            f.attrs[key] = _to_attr(value)
    return target


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------
def _open(path: Path) -> h5py.File:
    if not path.is_file():
        msg = (
            f"Feature file {str(path)!r} does not exist. Make feature files with `msfm roam preprocess SLIDES "
            "--out DIR` (they are written to DIR/features/<slide_id>.h5)."
        )
        raise MsfmInputError(msg)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        msg = (
            f"Feature file {str(path)!r} cannot be read as HDF5 ({err}); it is truncated or corrupt. Delete it and "
            "run `msfm roam preprocess` again for this slide (finished slides are skipped)."
        )
        raise MsfmInputError(msg) from err


def _file_attrs(f: h5py.File, path: Path) -> dict[str, Any]:
    attrs = dict(ATTR_DEFAULTS)
    attrs.update({k: _from_attr(v) for k, v in f.attrs.items()})
    # CLAM-style files keep the ROI geometry on the coords dataset (patch_size at patch_level).
    if "coords" in f and "roi_size_level0" not in f.attrs:
        c_attrs = {k: _from_attr(v) for k, v in f["coords"].attrs.items()}
        if "patch_size" in c_attrs and int(c_attrs.get("patch_level", 0) or 0) == 0:
            attrs["roi_size_level0"] = int(c_attrs["patch_size"])
    attrs.setdefault("slide_id", path.stem)
    if "slide_id" not in f.attrs:
        attrs["slide_id"] = path.stem
    return attrs


def read_feature_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The attributes of a feature file plus ``n_roi``, ``n_tokens`` and ``feature_dim`` read from the dataset
    shape, without loading the features (cheap; used to decide whether a slide is already done).

    Raises:
        MsfmInputError: Missing, unreadable or malformed file.
    """
    p = Path(path)
    with _open(p) as f:
        try:
            attrs = _file_attrs(f, p)
            if "features" not in f:
                msg = f"Feature file {str(p)!r} has no 'features' dataset (found {sorted(f.keys())})."
                raise MsfmInputError(msg)
            shape = f["features"].shape
        except (OSError, KeyError, RuntimeError) as err:
            msg = (
                f"Feature file {str(p)!r} is corrupt ({err}). Delete it and run `msfm roam preprocess` again."
            )
            raise MsfmInputError(msg) from err
    if len(shape) == 3:
        attrs.update(n_roi=int(shape[0]), n_tokens=int(shape[1]), feature_dim=int(shape[2]))
    return attrs


def read_recorded_geometry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ROI geometry (:data:`GEOMETRY_KEYS`) a feature file really records (no defaults filled in).

    Raises:
        MsfmInputError: Missing or unreadable file.
    """
    p = Path(path)
    with _open(p) as f:
        return {k: _from_attr(f.attrs[k]) for k in GEOMETRY_KEYS if k in f.attrs}


def read_slide_features(
    path: str | os.PathLike[str], *, encoder: str | None = None, feature_dim: int | None = None
) -> SlideFeatures:
    """Read a slide's ROI features and check they fit the model that will use them.

    Args:
        path: The ``.h5`` file.
        encoder: Encoder name the model was trained with; a file made by another encoder is refused.
            Legacy files without an encoder attribute pass this check (with a log message).
        feature_dim: Feature dimension the model expects.

    Returns:
        The features (legacy 85-token files sliced to 84 tokens; ``attrs["legacy_tokens"]`` records it).

    Raises:
        MsfmInputError: Missing, truncated or corrupt file, wrong layout, or features from another encoder or of
            another dimension.
    """
    p = Path(path)
    with _open(p) as f:
        try:
            attrs = _file_attrs(f, p)
            missing = [k for k in ("features", "coords") if k not in f]
            if missing:
                msg = (
                    f"Feature file {str(p)!r} lacks the dataset(s) {missing} (found {sorted(f.keys())}). Expected "
                    f"'features' [n_roi, {TOKENS_PER_ROI}, d] and 'coords' [n_roi, 2], as written by "
                    "`msfm roam preprocess`."
                )
                raise MsfmInputError(msg)
            dset = f["features"]
            shape = dset.shape
            if len(shape) != 3 or shape[1] not in (TOKENS_PER_ROI, _LEGACY_TOKENS):
                hint = (
                    " It looks like a patch-level file ([n_patches, d], e.g. from CLAM's extract_features_fp.py); "
                    "ROAM needs ROI files with 84 multi-scale patch tokens per ROI."
                    if len(shape) == 2
                    else ""
                )
                msg = (
                    f"Feature file {str(p)!r}: 'features' has shape {shape}; expected [n_roi, {TOKENS_PER_ROI}, d] "
                    f"(or ROAM's legacy [n_roi, {_LEGACY_TOKENS}, d]).{hint} Re-run `msfm roam preprocess` on the "
                    "slide."
                )
                raise MsfmInputError(msg)
            file_dim = int(shape[2])
            recorded = frozenset(f.attrs.keys())
            _check_encoder(p, attrs, file_dim, encoder=encoder, feature_dim=feature_dim)
            feats = np.asarray(dset[:, :TOKENS_PER_ROI, :], dtype=np.float32)
            coords = np.asarray(f["coords"][()])
            tissue = (
                np.asarray(f["tissue_fraction"][()], dtype=np.float32) if "tissue_fraction" in f else None
            )
        except (OSError, KeyError, RuntimeError) as err:
            msg = (
                f"Feature file {str(p)!r} is truncated or corrupt ({err}). Delete it and run `msfm roam preprocess` "
                "again for this slide (finished slides are skipped)."
            )
            raise MsfmInputError(msg) from err
    if shape[1] == _LEGACY_TOKENS:
        attrs["legacy_tokens"] = _LEGACY_TOKENS
        logger.info(
            "%s: legacy %d-token features, using the first %d", p.name, _LEGACY_TOKENS, TOKENS_PER_ROI
        )
    if coords.ndim != 2 or coords.shape != (feats.shape[0], 2):
        msg = f"Feature file {str(p)!r}: 'coords' has shape {coords.shape}; expected [{feats.shape[0]}, 2]."
        raise MsfmInputError(msg)
    if tissue is not None and tissue.shape != (feats.shape[0],):
        tissue = None
    attrs["feature_dim"] = file_dim
    attrs["tokens_per_roi"] = TOKENS_PER_ROI
    return SlideFeatures(
        slide_id=str(attrs["slide_id"]),
        features=feats,
        coords=np.rint(coords).astype(np.int64) if coords.dtype.kind == "f" else coords.astype(np.int64),
        tissue_fraction=tissue,
        attrs=attrs,
        recorded_attrs=recorded,
    )


def _check_encoder(
    path: Path, attrs: dict[str, Any], file_dim: int, *, encoder: str | None, feature_dim: int | None
) -> None:
    file_encoder = str(attrs.get("encoder") or "unknown")
    fix = (
        "Features from another encoder cannot be used by this model: re-run `msfm roam preprocess` with "
        f"--encoder {encoder or '<the model encoder>'} (and its weights) into a new output folder, or use a model "
        f"trained on {file_encoder!r} features."
    )
    if encoder is not None and file_encoder != "unknown" and file_encoder != encoder:
        msg = (
            f"Feature file {str(path)!r} was made with encoder {file_encoder!r} ({file_dim}-d), but the model expects "
            f"encoder {encoder!r}{f' ({feature_dim}-d)' if feature_dim else ''}. {fix}"
        )
        raise MsfmInputError(msg)
    if encoder is not None and file_encoder == "unknown":
        logger.info("%s has no encoder attribute (legacy file); assuming %s", path.name, encoder)
    if feature_dim is not None and file_dim != int(feature_dim):
        msg = (
            f"Feature file {str(path)!r} holds {file_dim}-d features (encoder {file_encoder!r}), but the model "
            f"expects {int(feature_dim)}-d features{f' from encoder {encoder!r}' if encoder else ''}. {fix}"
        )
        raise MsfmInputError(msg)
