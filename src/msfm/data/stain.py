"""Stain normalisation of H&E images: Macenko (optical-density stain vectors) and Reinhard (LAB statistics).

Both are plain numpy. A normaliser is fitted on a target image (default: the tiatoolbox stain-normalisation target
bundled with msfm) and then maps other images toward its colours.

Background handling (documented choice): :meth:`fit` on an image without tissue (every pixel nearly white in
optical density) raises :class:`msfm.errors.MsfmInputError`, because no stain can be learned from it;
:meth:`transform` of such an image returns an unchanged copy, because a blank ROI has no stain to correct and a
batch should not fail on it.

Example:
    >>> norm = build_normalizer("macenko")  # fitted on the bundled target  # doctest: +SKIP
    >>> out = norm.transform(roi)  # uint8 [h, w, 3]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
from PIL import Image

from msfm.errors import MsfmInputError

__all__ = [
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "StainNormalizer",
    "build_normalizer",
    "lab_to_rgb",
    "od_to_rgb",
    "rgb_to_lab",
    "rgb_to_od",
]

#: Fewer tissue pixels than this (OD above ``beta`` in every channel) means "no tissue".
MIN_TISSUE_PIXELS = 100


@runtime_checkable
class StainNormalizer(Protocol):
    """What every stain normaliser provides."""

    name: str

    def fit(self, img: np.ndarray) -> Self: ...

    def transform(self, img: np.ndarray) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self: ...


def _check_rgb(img: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or arr.size == 0:
        msg = f"{what} expects a uint8 RGB image [h, w, 3]; got dtype {arr.dtype}, shape {arr.shape}."
        raise MsfmInputError(msg)
    return arr


# ------------------------------------------------------------------------------------------ optical density
#: OD of each uint8 value (a lookup is much faster than a log per pixel).
_OD_LUT = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


def rgb_to_od(img: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)`` (0 for white).

    Shape:
        ``[..., 3]`` uint8 -> ``[..., 3]`` float64.
    """
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return _OD_LUT[arr]
    return -np.log((arr.astype(np.float64) + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, rounded and clipped to uint8.

    Shape:
        ``[..., 3]`` float -> ``[..., 3]`` uint8.
    """
    out = np.exp(-np.asarray(od, dtype=np.float32))
    out *= 256.0
    out -= 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


_OD_LUT32 = _OD_LUT.astype(np.float32)


def _tissue_od(img: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Channel-first float32 OD ``[3, n]`` and the tissue mask ``[n]`` (OD > beta in every channel)."""
    od = np.ascontiguousarray(_OD_LUT32[img.reshape(-1, 3).T])
    return od, (od > beta).all(axis=0)


class MacenkoNormalizer:
    """Macenko et al. (2009) stain normalisation.

    Fit: optical densities (OD) of pixels with OD > ``beta`` in every channel; the plane of the two largest
    eigenvectors of their covariance; the angles of the pixels in that plane; the directions at the ``alpha`` and
    ``100 - alpha`` percentiles of the angle are the two stain vectors, haematoxylin first (the one with the larger
    red OD component). Concentrations are least-squares coefficients on the stain vectors; their 99th percentiles
    over tissue pixels are the reference intensities.

    Transform: the image's own stain vectors and concentrations are estimated the same way; concentrations are
    rescaled so their 99th percentiles match the target's, and the image is rebuilt with the target's vectors
    (the OD component outside the H-E plane is dropped, as in the original method).

    Args:
        alpha: Percentile (in percent of tissue pixels) of the extreme angles, for robustness to outliers.
        beta: OD threshold below which a pixel counts as background.
        max_fit_pixels: Tissue pixels used for the eigen-decomposition and the angle percentiles (an evenly
            strided subsample beyond that; deterministic).
    """

    name = "macenko"

    def __init__(self, alpha: float = 1.0, beta: float = 0.15, max_fit_pixels: int = 1_000_000) -> None:
        if not 0.0 < alpha < 50.0 or beta < 0 or max_fit_pixels < MIN_TISSUE_PIXELS:
            msg = f"MacenkoNormalizer: need 0 < alpha < 50, beta >= 0, max_fit_pixels >= {MIN_TISSUE_PIXELS}."
            raise MsfmInputError(msg)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.max_fit_pixels = int(max_fit_pixels)
        self.stain_matrix: np.ndarray | None = None  # [2, 3] unit rows: H, E
        self.max_concentrations: np.ndarray | None = None  # [2]

    def stain_vectors(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Stain matrix, concentrations and their 99th percentiles of an image (None when it has no tissue).

        Returns:
            ``(stain_matrix [2, 3], concentrations [2, h*w], max_concentrations [2])`` or ``None``.
        """
        arr = _check_rgb(img, "MacenkoNormalizer")
        od, tissue = _tissue_od(arr, self.beta)
        n_tissue = int(tissue.sum())
        if n_tissue < MIN_TISSUE_PIXELS:
            return None
        od_t = od[:, tissue]
        if n_tissue > self.max_fit_pixels:
            od_t = od_t[:, :: int(np.ceil(n_tissue / self.max_fit_pixels))]
        _, vecs = np.linalg.eigh(np.cov(od_t.astype(np.float64)))
        plane = vecs[:, [2, 1]]  # two largest eigenvalues (eigh sorts ascending)
        # Eigenvector signs are arbitrary: point both into the positive OD octant, so every tissue pixel has a
        # positive first coordinate and its angle never wraps around +-pi.
        plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
        proj = plane.T.astype(np.float32) @ od_t
        phi = np.arctan2(proj[1], proj[0])
        lo, hi = np.percentile(phi, [self.alpha, 100.0 - self.alpha])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
        stains = stains * np.where(stains.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
        stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
        conc = np.linalg.pinv(stains).T.astype(np.float32) @ od  # [2, n]: least squares OD ~ stains.T @ conc
        max_conc = np.percentile(conc[:, tissue], 99, axis=1).astype(np.float64)
        return stains, conc, max_conc

    def fit(self, img: np.ndarray) -> Self:
        """Learn the target's stain vectors and intensities.

        Raises:
            MsfmInputError: The image has no tissue (fewer than ``MIN_TISSUE_PIXELS`` stained pixels).
        """
        est = self.stain_vectors(img)
        if est is None:
            msg = (
                f"MacenkoNormalizer.fit: the target image has no stained tissue (fewer than {MIN_TISSUE_PIXELS} "
                f"pixels with optical density > {self.beta} in every channel). Use an H&E image with tissue."
            )
            raise MsfmInputError(msg)
        self.stain_matrix, _, self.max_concentrations = est[0], est[1], est[2]
        return self

    def transform(self, img: np.ndarray) -> np.ndarray:
        """Map an image to the target's stain (an image without tissue comes back unchanged, as a copy).

        Shape:
            ``[h, w, 3]`` uint8 -> ``[h, w, 3]`` uint8.
        """
        if self.stain_matrix is None or self.max_concentrations is None:
            msg = "MacenkoNormalizer.transform called before fit(): fit it on a target image first."
            raise MsfmInputError(msg)
        arr = _check_rgb(img, "MacenkoNormalizer.transform")
        est = self.stain_vectors(arr)
        if est is None:
            return arr.copy()
        _, conc, max_conc = est
        scale = (self.max_concentrations / np.maximum(max_conc, 1e-6)).astype(np.float32)
        od = self.stain_matrix.T.astype(np.float32) @ (conc * scale[:, None])  # [3, n]
        return od_to_rgb(od.T).reshape(arr.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (including the fitted target)."""
        return {
            "name": self.name,
            "alpha": self.alpha,
            "beta": self.beta,
            "max_fit_pixels": self.max_fit_pixels,
            "stain_matrix": None if self.stain_matrix is None else self.stain_matrix.tolist(),
            "max_concentrations": None
            if self.max_concentrations is None
            else self.max_concentrations.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Rebuild from :meth:`to_dict` output."""
        _check_name(d, cls.name)
        out = cls(
            alpha=d.get("alpha", 1.0),
            beta=d.get("beta", 0.15),
            max_fit_pixels=d.get("max_fit_pixels", 1_000_000),
        )
        if d.get("stain_matrix") is not None:
            out.stain_matrix = np.asarray(d["stain_matrix"], dtype=np.float64).reshape(2, 3)
            out.max_concentrations = np.asarray(d["max_concentrations"], dtype=np.float64).reshape(2)
        return out


# -------------------------------------------------------------------------------------------------------- LAB
# sRGB (D65) <-> CIE LAB, the standard formulas.
_RGB2XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_EPS = 216 / 24389
_KAPPA = 24389 / 27


# sRGB decoding of each uint8 value, and sRGB encoding of linear light quantised to 16 bits (lookups instead of a
# power per pixel; the 16-bit step is far below one uint8 level everywhere).
_SRGB_TO_LINEAR = np.where(
    np.arange(256) / 255.0 <= 0.04045,
    np.arange(256) / 255.0 / 12.92,
    ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4,
).astype(np.float32)
_LIN_STEPS = 65535
_lin = np.arange(_LIN_STEPS + 1) / _LIN_STEPS
_LINEAR_TO_SRGB = np.clip(
    np.rint(255.0 * np.where(_lin <= 0.0031308, 12.92 * _lin, 1.055 * _lin ** (1 / 2.4) - 0.055)), 0, 255
).astype(np.uint8)
del _lin


def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """sRGB uint8 to CIE LAB (D65).

    Shape:
        ``[..., 3]`` uint8 -> ``[..., 3]`` float32 (L in 0..100).
    """
    lin = _SRGB_TO_LINEAR[np.asarray(img, dtype=np.uint8)]
    xyz = lin @ (_RGB2XYZ.T / _WHITE).astype(np.float32)
    f = np.where(xyz > _EPS, np.cbrt(xyz), (_KAPPA * xyz + 16.0) / 116.0).astype(np.float32)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE LAB (D65) to sRGB uint8 (rounded, clipped).

    Shape:
        ``[..., 3]`` float -> ``[..., 3]`` uint8.
    """
    lab = np.asarray(lab, dtype=np.float32)
    f = np.empty_like(lab)
    f[..., 1] = (lab[..., 0] + 16.0) / 116.0
    f[..., 0] = f[..., 1] + lab[..., 1] / 500.0
    f[..., 2] = f[..., 1] - lab[..., 2] / 200.0
    f3 = f**3
    xyz = np.where(f3 > _EPS, f3, (116.0 * f - 16.0) / _KAPPA)
    lin = xyz @ (_XYZ2RGB * _WHITE).T.astype(np.float32)
    idx = np.rint(np.clip(lin, 0.0, 1.0) * _LIN_STEPS).astype(np.int32)
    return _LINEAR_TO_SRGB[idx]


class ReinhardNormalizer:
    """Reinhard et al. (2001) colour transfer: match the per-channel mean and std in CIE LAB.

    Statistics are taken over all pixels (background included, as in the original method).

    Args:
        beta: OD threshold used only to decide whether an image has tissue at all (see the module docstring).
    """

    name = "reinhard"

    def __init__(self, beta: float = 0.15) -> None:
        self.beta = float(beta)
        self.mean: np.ndarray | None = None  # [3] LAB
        self.std: np.ndarray | None = None  # [3] LAB

    def _has_tissue(self, arr: np.ndarray) -> bool:
        return int(_tissue_od(arr, self.beta)[1].sum()) >= MIN_TISSUE_PIXELS

    def fit(self, img: np.ndarray) -> Self:
        """Learn the target's LAB mean and std.

        Raises:
            MsfmInputError: The image has no tissue.
        """
        arr = _check_rgb(img, "ReinhardNormalizer")
        if not self._has_tissue(arr):
            msg = (
                f"ReinhardNormalizer.fit: the target image has no stained tissue (fewer than {MIN_TISSUE_PIXELS} "
                f"pixels with optical density > {self.beta} in every channel). Use an H&E image with tissue."
            )
            raise MsfmInputError(msg)
        lab = rgb_to_lab(arr).reshape(-1, 3).astype(np.float64)
        self.mean, self.std = lab.mean(axis=0), lab.std(axis=0)
        return self

    def transform(self, img: np.ndarray) -> np.ndarray:
        """Map an image's LAB statistics to the target's (no tissue: unchanged copy).

        Shape:
            ``[h, w, 3]`` uint8 -> ``[h, w, 3]`` uint8.
        """
        if self.mean is None or self.std is None:
            msg = "ReinhardNormalizer.transform called before fit(): fit it on a target image first."
            raise MsfmInputError(msg)
        arr = _check_rgb(img, "ReinhardNormalizer.transform")
        if not self._has_tissue(arr):
            return arr.copy()
        lab = rgb_to_lab(arr)
        flat = lab.reshape(-1, 3).astype(np.float64)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        scale = self.std / np.maximum(std, 1e-6)
        out = lab * scale.astype(np.float32) + (self.mean - mean * scale).astype(np.float32)
        return lab_to_rgb(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (including the fitted target)."""
        return {
            "name": self.name,
            "beta": self.beta,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Rebuild from :meth:`to_dict` output."""
        _check_name(d, cls.name)
        out = cls(beta=d.get("beta", 0.15))
        if d.get("mean") is not None:
            out.mean = np.asarray(d["mean"], dtype=np.float64).reshape(3)
            out.std = np.asarray(d["std"], dtype=np.float64).reshape(3)
        return out


def _check_name(d: dict[str, Any], name: str) -> None:
    if not isinstance(d, dict) or d.get("name") != name:
        got = d.get("name") if isinstance(d, dict) else type(d).__name__
        msg = f"Expected a saved {name!r} stain normaliser (to_dict() output); got name {got!r}."
        raise MsfmInputError(msg)


_NORMALIZERS: dict[str, type] = {"macenko": MacenkoNormalizer, "reinhard": ReinhardNormalizer}


def _load_target(target: str | os.PathLike[str] | np.ndarray | None) -> np.ndarray:
    if target is None:
        from msfm.datasets.histology import stain_target_path

        target = stain_target_path()
    if isinstance(target, np.ndarray):
        return _check_rgb(target, "build_normalizer target")
    path = Path(target)
    if not path.is_file():
        msg = f"Stain target {path} does not exist. Pass an RGB image file (PNG/JPEG/TIFF) with H&E tissue."
        raise MsfmInputError(msg)
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception:
        pass
    from msfm.data.slides import open_slide

    # Not a plain image: read it as a slide (whole level-0 view, capped at 4096 px on the longer side).
    with open_slide(path) as slide:
        return slide.thumbnail(4096)[0]


def build_normalizer(
    name: str | None, target: str | os.PathLike[str] | np.ndarray | None = None
) -> StainNormalizer | None:
    """A fitted stain normaliser by name.

    Args:
        name: ``None`` or ``"none"`` (no normalisation), ``"macenko"`` or ``"reinhard"``.
        target: Target image (array or file); default the bundled tiatoolbox target (``target_image.png``).

    Returns:
        The fitted normaliser, or ``None`` for no normalisation.

    Raises:
        MsfmInputError: Unknown name, unreadable target or a target without tissue.
    """
    if name is None or str(name).lower() == "none":
        return None
    key = str(name).lower()
    if key not in _NORMALIZERS:
        msg = f"Unknown stain normaliser {name!r}; use one of none, {', '.join(_NORMALIZERS)}."
        raise MsfmInputError(msg)
    return _NORMALIZERS[key]().fit(_load_target(target))
