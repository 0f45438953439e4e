"""Spatial coordinates: validation, unit conversion to micrometres and an own 10x Visium (Space Ranger) reader.

Convention used across msfm: ``adata.obsm["spatial"]`` holds ``[n, 2]`` coordinates ``(x, y)``; a *scale* (µm per
unit of ``obsm``) converts them to micrometres; tissue sections are told apart by an ``obs`` column
(``section_key``). :func:`spatial_coords` checks all of this once and returns a :class:`SpatialCoords`.

Spatial verbs read their input with :func:`as_spatial_anndata`: an AnnData, any file :func:`msfm.data.read` knows,
or a Space Ranger ``outs`` folder (detected by its ``spatial/`` subfolder). :func:`read_positions` reads the
``x``/``y`` table of new positions or of a region polygon.

Visium geometry (used by :func:`read_visium`): spots sit on a hexagonal lattice with 100 µm centre-to-centre
spacing. Space Ranger's ``scalefactors_json.json`` gives ``spot_diameter_fullres``, which 10x Genomics defines as
the number of full-resolution pixels spanning a *theoretical 65 µm spot* (the capture spots themselves are 55 µm
wide). So ``µm per pixel = 65 / spot_diameter_fullres``; with this factor the bundled Visium positions have a
median nearest-neighbour distance of 100.3 µm, as the slide design says (55 µm would give 84.9 µm).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = [
    "VISIUM_SPOT_DIAMETER_UM",
    "SpatialCoords",
    "as_spatial_anndata",
    "is_visium_folder",
    "read_positions",
    "read_visium",
    "spatial_coords",
    "visium_positions",
]

PathLike = str | os.PathLike[str]

#: Diameter in µm of the theoretical spot whose width in pixels Space Ranger reports as ``spot_diameter_fullres``.
VISIUM_SPOT_DIAMETER_UM = 65.0
#: Half-width in µm of the uniform jitter that ``duplicates="jitter"`` adds to repeated coordinates.
JITTER_HALF_WIDTH_UM = 0.25

_DUPLICATE_MODES = ("error", "keep", "jitter")
_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")  # Space Ranger >= 2.0, then 1.x
_POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
_IMAGES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}


# --------------------------------------------------------------------------------------------- coordinates
@dataclass(frozen=True)
class SpatialCoords:
    """Validated coordinates of every cell/spot, in micrometres, with their section.

    Attributes:
        xy: ``[n, 2]`` float64 positions ``(x, y)`` in µm (``obsm[key] * scale``; a fresh array).
        section: ``[n]`` int64 section code of each row, an index into ``section_names``.
        section_names: Name of each section (``["all"]`` when no ``section_key`` was given).
        scale: µm per unit of ``adata.obsm[key]``.
        key: The ``obsm`` key the coordinates were read from.
        n_jittered: Rows moved by ``duplicates="jitter"`` (0 otherwise).
        scale_source: Where ``scale`` came from: ``scale=``, ``uns['msfm_spatial']...``, Visium scale factors, or
            the default.

    Shape:
        xy ``[n, 2]``; section ``[n]``.
    """

    xy: np.ndarray
    section: np.ndarray
    section_names: list[str]
    scale: float
    key: str
    n_jittered: int = field(default=0)
    scale_source: str = field(default="scale=")

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    @property
    def n_sections(self) -> int:
        """Number of sections."""
        return len(self.section_names)

    def indices(self, section: int) -> np.ndarray:
        """Row indices (int64, ascending) of the cells in section code ``section``."""
        return np.flatnonzero(self.section == section).astype(np.int64)


def _scale_from(adata: ad.AnnData, scale: float | None, key: str = "spatial") -> tuple[float, str]:
    """µm per unit of ``obsm[key]`` and where it came from (the argument, ``uns``, Visium scale factors, default)."""
    source = "scale="
    if scale is None:
        info = adata.uns.get("msfm_spatial")
        scale, source = 1.0, "no scale given: taken as µm"
        if isinstance(info, Mapping) and "um_per_unit" in info:
            scale, source = info["um_per_unit"], "uns['msfm_spatial']['um_per_unit']"
        elif key == "spatial":
            visium = _visium_pixel_scale(adata)
            if visium is not None:
                return visium, "Visium scale factors (uns['spatial'])"
    value = _positive_number(scale)
    if value is None:
        msg = (
            f"spatial_coords: scale={scale!r} is not a positive number. The scale is the number of micrometres per "
            "unit of adata.obsm coordinates (1.0 if they are already in µm, e.g. 0.2125 for Xenium pixels); pass "
            "scale=<µm per unit> or set adata.uns['msfm_spatial'] = {'unit': 'um', 'um_per_unit': <value>}."
        )
        raise MsfmInputError(msg)
    return value, source


def _positive_number(value: Any) -> float | None:
    """``value`` as a finite positive float, or None (not a number, NaN, infinite, zero or negative)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _visium_pixel_scale(adata: ad.AnnData) -> float | None:
    """µm per pixel of scanpy/squidpy-style Visium data (``obsm['spatial']`` in full-resolution pixels).

    scanpy's ``read_visium`` keeps the spot centres in pixels of the full-resolution image and the Space Ranger
    scale factors in ``uns['spatial'][library]['scalefactors']``. The factor is :data:`VISIUM_SPOT_DIAMETER_UM`
    / ``spot_diameter_fullres`` (as :func:`read_visium` uses); it is recorded in ``uns['msfm_spatial']`` with a
    warning. None when the data carry no scale factors.

    Raises:
        MsfmInputError: scale factors without a usable ``spot_diameter_fullres``, or libraries of different pixel
            sizes (no one factor converts them all).
    """
    info = adata.uns.get("spatial")
    if not isinstance(info, Mapping):
        return None
    libraries = {
        str(lib): v["scalefactors"]
        for lib, v in info.items()
        if isinstance(v, Mapping) and isinstance(v.get("scalefactors"), Mapping)
    }
    if not libraries:
        return None
    fix = (
        "pass scale=<µm per coordinate unit> (CLI: --scale), e.g. scale=1 if obsm['spatial'] already holds µm, or "
        "read the Space Ranger folder with msfm.data.spatial.read_visium, which converts pixels to µm."
    )
    factors: dict[str, float] = {}
    for lib, sf in libraries.items():
        diameter = sf.get("spot_diameter_fullres")
        value = _positive_number(diameter)
        if value is None:
            msg = (
                f"spatial_coords: adata.uns['spatial'][{lib!r}]['scalefactors'] (scanpy Visium layout, where "
                f"obsm['spatial'] holds image pixels) has spot_diameter_fullres={diameter!r}, so pixels cannot be "
                f"converted to µm. Expected a positive number of pixels. Fix: {fix}"
            )
            raise MsfmInputError(msg)
        factors[lib] = VISIUM_SPOT_DIAMETER_UM / value
    if len({round(f, 9) for f in factors.values()}) > 1:
        shown = ", ".join(f"{k}: {v:.4g}" for k, v in factors.items())
        msg = (
            f"spatial_coords: adata.uns['spatial'] holds {len(factors)} Visium libraries with different pixel sizes "
            f"(µm per pixel {shown}); one scale cannot convert obsm['spatial'] (pixels) to µm. Fix: process each "
            f"library on its own, or convert obsm['spatial'] to µm yourself and {fix}"
        )
        raise MsfmInputError(msg)
    lib, factor = next(iter(factors.items()))
    warnings.warn(
        f"spatial_coords: obsm['spatial'] looks like scanpy Visium pixel coordinates (uns['spatial'][{lib!r}] has "
        f"Space Ranger scale factors and uns['msfm_spatial'] is absent); converting to µm with {factor:.6g} µm per "
        f"pixel = {VISIUM_SPOT_DIAMETER_UM:g} µm / spot_diameter_fullres "
        f"({VISIUM_SPOT_DIAMETER_UM / factor:.6g} px). The factor is recorded in uns['msfm_spatial']. Pass scale= "
        "(CLI: --scale) to override it, e.g. scale=1 if the coordinates are already in µm.",
        UserWarning,
        stacklevel=4,
    )
    if not adata.is_view:
        adata.uns["msfm_spatial"] = {
            "unit": "pixel",
            "um_per_unit": float(factor),
            "um_per_pixel": float(factor),
            "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM,
            "source": f"uns['spatial'][{lib!r}]['scalefactors']['spot_diameter_fullres'] (scanpy Visium layout)",
            "library_id": lib,
        }
    return factor


#: Plausible median distance between neighbouring cells or spots, in µm: below it coordinates are in a larger unit
#: (mm: cells 0.01 apart), above it in a smaller one (nm: cells 10,000 apart). Stereo-seq bins lie 0.5 µm apart,
#: sparse spot arrays a few hundred µm.
PLAUSIBLE_SPACING_UM = (0.3, 5000.0)
#: Largest plausible extent of one section, in µm (a slide is 25 x 75 mm).
PLAUSIBLE_EXTENT_UM = 100_000.0
_UNIT_NAMES = {1e-6: "picometres", 1e-3: "nanometres", 1.0: "µm", 1e3: "millimetres", 1e6: "metres"}


def _check_um_scale(
    xy: np.ndarray, section: np.ndarray, names: list[str], scale: float, source: str, key: str
) -> None:
    """Refuse coordinates whose neighbour spacing or extent cannot be micrometres (mm or nm taken as µm)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    spacings: list[np.ndarray] = []
    extent, where = 0.0, names[0] if names else "all"
    for code in np.unique(section):
        pts = xy[section == code]
        span = float(np.max(pts.max(axis=0) - pts.min(axis=0))) if len(pts) else 0.0
        if span > extent:
            extent, where = span, names[int(code)]
        if len(pts) < 2:
            continue
        query = pts if len(pts) <= 20_000 else pts[rng.choice(len(pts), 20_000, replace=False)]
        dist, _ = cKDTree(pts).query(query, k=min(len(pts), 8))
        dist = np.where(dist > 0, dist, np.inf).min(axis=1)  # first neighbour at another position
        spacings.append(dist[np.isfinite(dist)])
    found = np.concatenate(spacings) if spacings else np.empty(0)
    if found.size == 0 and extent <= PLAUSIBLE_EXTENT_UM:
        return
    spacing = float(np.median(found)) if found.size else float("nan")
    low, high = PLAUSIBLE_SPACING_UM
    if (found.size and low <= spacing <= high) and extent <= PLAUSIBLE_EXTENT_UM:
        return
    reference = spacing if found.size and not (low <= spacing <= high) else extent / 1000.0
    factor = 1000.0 ** round(float(np.log10(20.0 / reference)) / 3.0)
    unit = _UNIT_NAMES.get(factor, f"units of {factor:g} µm")
    origin = f"obsm[{key!r}] x {scale:g} ({source})" if scale != 1.0 else f"obsm[{key!r}] ({source})"
    msg = (
        f"spatial_coords: the coordinates in {origin} put neighbouring cells a median {spacing:.3g} µm apart and "
        f"span {extent:.4g} µm (section {where!r}). msfm expects micrometres: neighbouring cells or spots lie "
        f"{low:g} to {high:g} µm apart (Visium spots 100 µm, cells about 10 µm) and a section spans at most "
        f"{PLAUSIBLE_EXTENT_UM:g} µm. The coordinates look like {unit}. Fix: pass scale=<µm per unit> (CLI: --scale), "
        f"here probably scale={factor:g}, or set adata.uns['msfm_spatial'] = {{'unit': ..., 'um_per_unit': {factor:g}}}."
    )
    raise MsfmInputError(msg)


def _sections(adata: ad.AnnData, section_key: str | None) -> tuple[np.ndarray, list[str]]:
    n = adata.n_obs
    if section_key is None:
        return np.zeros(n, dtype=np.int64), ["all"]
    if section_key not in adata.obs.columns:
        msg = (
            f"spatial_coords: section_key={section_key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)}). Pass the obs column that names each cell's tissue section, or "
            "section_key=None if all cells come from one section."
        )
        raise MsfmInputError(msg)
    col = adata.obs[section_key]
    missing = col.isna().to_numpy()
    if missing.any():
        msg = (
            f"spatial_coords: adata.obs[{section_key!r}] is missing for {int(missing.sum())} cells (e.g. "
            f"{list(adata.obs_names[missing][:3])}). Every cell needs a section; fill or drop those cells."
        )
        raise MsfmInputError(msg)
    if isinstance(col.dtype, pd.CategoricalDtype):
        # Keep the user's category order, dropping categories that no cell uses.
        cat = col.cat.remove_unused_categories()
        names = [str(c) for c in cat.cat.categories]
        codes = cat.cat.codes.to_numpy().astype(np.int64)
    else:
        cat = pd.Categorical(col.astype(str).to_numpy())
        names = [str(c) for c in cat.categories]
        codes = np.asarray(cat.codes, dtype=np.int64)
    return codes, names


def _duplicate_groups(xy: np.ndarray, section: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose (section, x, y) repeats an earlier row, and the first row each one repeats.

    Returns:
        ``(dup_rows, first_rows)``, both int64 and aligned.
    """
    table = pd.DataFrame({"s": section, "x": xy[:, 0], "y": xy[:, 1]})
    dup = table.duplicated(keep="first").to_numpy()
    if not dup.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    group = table.groupby(["s", "x", "y"], sort=False).ngroup().to_numpy()
    first_of_group = pd.Series(np.arange(len(table))).groupby(group).transform("min").to_numpy()
    rows = np.flatnonzero(dup).astype(np.int64)
    return rows, first_of_group[rows].astype(np.int64)


def spatial_coords(
    adata: ad.AnnData,
    *,
    key: str = "spatial",
    scale: float | None = None,
    section_key: str | None = None,
    duplicates: Literal["error", "keep", "jitter"] = "error",
) -> SpatialCoords:
    """Read, check and convert the spatial coordinates of ``adata`` to micrometres.

    Args:
        adata: Cells or spots with coordinates in ``adata.obsm[key]`` (not modified).
        key: ``obsm`` key of the ``[n, 2]`` ``(x, y)`` coordinates.
        scale: µm per unit of ``obsm[key]``. ``None`` reads ``adata.uns["msfm_spatial"]["um_per_unit"]`` when
            present; else, for scanpy-style Visium data (``key="spatial"`` in full-resolution pixels with
            ``uns["spatial"][library]["scalefactors"]["spot_diameter_fullres"]``), ``65 / spot_diameter_fullres``
            with a ``UserWarning`` stating the factor, which is then recorded in ``adata.uns["msfm_spatial"]``
            (``adata`` is modified only there); else 1.0 (coordinates already in µm).
        section_key: ``obs`` column naming each cell's tissue section; ``None`` means one section. Coordinates
            of different sections are independent (they may overlap).
        duplicates: What to do when two cells of one section share the same position: ``"error"`` (default)
            raises; ``"keep"`` leaves them as they are (ties stay in row order, so anything that sorts by
            position stays deterministic); ``"jitter"`` moves every repeat (not the first occurrence) by a
            seeded uniform offset in ``[-0.25, 0.25]`` µm per axis (``np.random.default_rng(0)``: the same input
            always gets the same jitter), so positions become distinct without changing any neighbourhood.

    Returns:
        A :class:`SpatialCoords` with ``xy`` in µm (float64, a new array).

    Units are checked: when the median distance between neighbouring cells is outside
    :data:`PLAUSIBLE_SPACING_UM` (0.3 to 5,000 µm) or a section spans more than 100 mm, the coordinates cannot be
    micrometres (millimetres or nanometres taken as µm) and an error gives the measured spacing and the likely
    ``scale``.

    Raises:
        MsfmInputError: missing key, wrong shape or dtype, NaN/inf values, unknown ``section_key``, bad
            ``scale`` or ``duplicates``, coordinates that cannot be µm (implausible spacing or extent), Visium
            scale factors without a usable spot diameter, or duplicated positions with ``duplicates="error"``.

    Shape:
        ``obsm[key]``: ``[n, 2]`` -> ``xy``: ``[n, 2]``, ``section``: ``[n]``.
    """
    if duplicates not in _DUPLICATE_MODES:
        msg = f"spatial_coords: duplicates={duplicates!r}; use one of {', '.join(repr(m) for m in _DUPLICATE_MODES)}."
        raise MsfmInputError(msg)
    if key not in adata.obsm:
        available = list(adata.obsm.keys())
        msg = (
            f"spatial_coords: adata.obsm has no key {key!r} (available obsm keys: {available or 'none'}). Set "
            "adata.obsm['spatial'] = coordinates in micrometres (an [n_obs, 2] array of x, y), or pass key=<the "
            "obsm key that holds them> and scale=<µm per unit> if they are in pixels."
        )
        raise MsfmInputError(msg)
    raw = adata.obsm[key]
    raw = raw.to_numpy() if isinstance(raw, pd.DataFrame) else np.asarray(raw)
    if raw.ndim != 2 or raw.shape[0] != adata.n_obs or raw.shape[1] != 2:
        msg = (
            f"spatial_coords: adata.obsm[{key!r}] has shape {raw.shape}, expected ({adata.n_obs}, 2) (one (x, y) "
            "row per cell). If it holds (x, y, z) or more columns, store the two planar ones: "
            f"adata.obsm[{key!r}] = adata.obsm[{key!r}][:, :2]."
        )
        raise MsfmInputError(msg)
    if adata.n_obs == 0:
        msg = "spatial_coords: adata has no cells (n_obs = 0); nothing to place."
        raise MsfmInputError(msg)
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
        msg = (
            f"spatial_coords: adata.obsm[{key!r}] has dtype {raw.dtype}, expected numbers. Convert it with "
            f"adata.obsm[{key!r}] = adata.obsm[{key!r}].astype(float)."
        )
        raise MsfmInputError(msg)
    unit_scale, scale_source = _scale_from(adata, scale, key)
    xy = raw.astype(np.float64) * unit_scale  # astype copies: the user's array is never touched
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        msg = (
            f"spatial_coords: adata.obsm[{key!r}] has NaN or infinite values in {int(bad.sum())} of {adata.n_obs} "
            f"rows (e.g. {list(adata.obs_names[bad][:3])}). Drop those cells (adata = adata[np.isfinite("
            f"adata.obsm[{key!r}]).all(axis=1)].copy()) or fill in their positions."
        )
        raise MsfmInputError(msg)
    section, names = _sections(adata, section_key)
    _check_um_scale(xy, section, names, unit_scale, scale_source, key)

    n_jittered = 0
    if duplicates != "keep":
        rows, firsts = _duplicate_groups(xy, section)
        if rows.size and duplicates == "error":
            examples = ", ".join(
                f"{adata.obs_names[r]!r} = {adata.obs_names[f]!r} at ({xy[r, 0]:g}, {xy[r, 1]:g}) µm"
                for r, f in zip(rows[:3], firsts[:3], strict=True)
            )
            where = "within a section" if section_key is not None else "(one section: no section_key given)"
            msg = (
                f"spatial_coords: {rows.size} cells repeat the position of another cell {where}; e.g. {examples}. "
                "If the data hold several sections, pass section_key=<obs column>. Otherwise choose "
                "duplicates='keep' (leave ties) or duplicates='jitter' (seeded sub-micron offsets)."
            )
            raise MsfmInputError(msg)
        if rows.size:
            rng = np.random.default_rng(0)
            xy[rows] += rng.uniform(-JITTER_HALF_WIDTH_UM, JITTER_HALF_WIDTH_UM, size=(rows.size, 2))
            n_jittered = int(rows.size)
            logger.info(
                "spatial_coords: jittered %d repeated positions by <= %g µm", n_jittered, JITTER_HALF_WIDTH_UM
            )
    return SpatialCoords(
        xy=xy,
        section=section,
        section_names=names,
        scale=unit_scale,
        key=key,
        n_jittered=n_jittered,
        scale_source=scale_source,
    )


# --------------------------------------------------------------------------------------------------- Visium
def _spatial_dir(path: Path) -> Path:
    if not path.is_dir():
        msg = (
            f"Visium folder {str(path)!r} does not exist or is not a folder. Pass the Space Ranger 'outs' folder "
            "(it holds filtered_feature_bc_matrix.h5 and spatial/)."
        )
        raise MsfmInputError(msg)
    spatial = path / "spatial"
    if not spatial.is_dir():
        msg = (
            f"Visium folder {str(path)!r} has no 'spatial' subfolder (found: {sorted(p.name for p in path.iterdir())}). "
            "Pass the Space Ranger 'outs' folder, which holds spatial/tissue_positions[_list].csv and "
            "spatial/scalefactors_json.json."
        )
        raise MsfmInputError(msg)
    return spatial


def visium_positions(path: PathLike) -> pd.DataFrame:
    """Every spot of a Visium slide (in and out of tissue) from ``spatial/tissue_positions[_list].csv``.

    Space Ranger 1.x writes ``tissue_positions_list.csv`` without a header; 2.x writes ``tissue_positions.csv``
    with one. Both are read (the 2.x name first).

    Args:
        path: Space Ranger ``outs`` folder (or any folder with a ``spatial/`` subfolder laid out the same way).

    Returns:
        DataFrame indexed by barcode with ``in_tissue`` (int), ``array_row``, ``array_col`` (int, the hexagonal
        array grid: ``array_col`` steps by 2 along a row), ``pxl_row_in_fullres``, ``pxl_col_in_fullres``
        (float, full-resolution image pixels).

    Raises:
        MsfmInputError: the folder, the positions file or one of its columns is missing.
    """
    spatial = _spatial_dir(Path(path))
    found = next((spatial / name for name in _POSITION_FILES if (spatial / name).is_file()), None)
    if found is None:
        msg = (
            f"Visium folder {str(path)!r}: spatial/ has neither {' nor '.join(_POSITION_FILES)} (found: "
            f"{sorted(p.name for p in spatial.iterdir())}). Copy the positions file from Space Ranger's outs/spatial."
        )
        raise MsfmInputError(msg)
    with found.open() as fh:
        first = fh.readline()
    has_header = first.split(",")[0].strip().lower() == "barcode"
    try:
        table = pd.read_csv(found, header=0 if has_header else None, dtype={0: str})
    except (ValueError, pd.errors.ParserError) as err:
        msg = f"Could not parse the Visium positions file {found}: {err}."
        raise MsfmInputError(msg) from err
    if table.shape[1] != len(_POSITION_COLUMNS):
        msg = (
            f"Visium positions file {found} has {table.shape[1]} columns, expected {len(_POSITION_COLUMNS)}: "
            f"{', '.join(_POSITION_COLUMNS)}."
        )
        raise MsfmInputError(msg)
    table.columns = _POSITION_COLUMNS
    table["barcode"] = table["barcode"].astype(str)
    if table["barcode"].duplicated().any():
        msg = f"Visium positions file {found} lists some barcodes twice; the file is damaged."
        raise MsfmInputError(msg)
    table = table.set_index("barcode")
    table.index.name = None
    for col in ("in_tissue", "array_row", "array_col"):
        table[col] = table[col].astype(np.int64)
    for col in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        table[col] = table[col].astype(np.float64)
    table.attrs["source_file"] = found.name
    return table


def _scalefactors(spatial: Path) -> dict[str, float]:
    path = spatial / "scalefactors_json.json"
    if not path.is_file():
        msg = (
            f"Visium folder {str(spatial.parent)!r}: spatial/scalefactors_json.json is missing. It is needed to "
            "convert pixels to micrometres; copy it from Space Ranger's outs/spatial."
        )
        raise MsfmInputError(msg)
    factors = json.loads(path.read_text())
    diameter = factors.get("spot_diameter_fullres")
    if not isinstance(diameter, int | float) or not np.isfinite(diameter) or diameter <= 0:
        msg = f"{path}: 'spot_diameter_fullres' is {diameter!r}, expected a positive number of pixels."
        raise MsfmInputError(msg)
    return {str(k): float(v) for k, v in factors.items() if isinstance(v, int | float)}


def _read_images(spatial: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    images: dict[str, np.ndarray] = {}
    for res, name in _IMAGES.items():
        path = spatial / name
        if path.is_file():
            with Image.open(path) as img:
                # RGB uint8, whatever the PNG mode (the hires image of some Space Ranger versions is RGBA).
                images[res] = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return images


def _decode(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _read_counts_h5(path: Path) -> ad.AnnData:
    """Read a Space Ranger / Cell Ranger >= 3 HDF5 matrix (``/matrix``) directly with h5py.

    This avoids importing scanpy (seconds) for the common case; the older Cell Ranger 2 layout (one group per
    genome) goes through :func:`msfm.data.readers.read`. Like scanpy, only "Gene Expression" features are kept.
    """
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if "matrix" not in fh:
                from msfm.data.readers import read

                return read(path)
            m = fh["matrix"]
            n_features, n_barcodes = (int(v) for v in m["shape"][()])
            # 10x stores features x barcodes in CSC form: one column (indptr slice) per barcode.
            by_gene = sp.csc_matrix(
                (m["data"][()], m["indices"][()], m["indptr"][()]), shape=(n_features, n_barcodes)
            )
            barcodes = _decode(m["barcodes"][()])
            feats = m["features"]
            var = pd.DataFrame(
                {"gene_ids": _decode(feats["id"][()]), "feature_types": _decode(feats["feature_type"][()])},
                index=pd.Index(_decode(feats["name"][()]).astype(str)),
            )
            if "genome" in feats:
                var["genome"] = _decode(feats["genome"][()])
    except (OSError, KeyError, ValueError) as err:
        msg = (
            f"Could not read {str(path)!r} as a 10x Genomics HDF5 counts file ({type(err).__name__}: {err})."
        )
        raise MsfmInputError(msg) from err
    x = sp.csr_matrix(by_gene.T, dtype=np.float32)
    keep = (var["feature_types"] == "Gene Expression").to_numpy()
    if not keep.all():
        var, x = var[keep], x[:, np.flatnonzero(keep)]
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(barcodes.astype(str))), var=var)
    if adata.var_names.has_duplicates:
        logger.info(
            "%s: making duplicated gene symbols unique; Ensembl ids stay in var['gene_ids']", path.name
        )
        adata.var_names_make_unique()
    return adata


def _counts_metadata(h5: Path) -> dict[str, Any]:
    import h5py

    out: dict[str, Any] = {}
    with h5py.File(h5, "r") as fh:
        for key in ("chemistry_description", "software_version", "library_ids"):
            if key in fh.attrs:
                value = fh.attrs[key]
                value = value[0] if isinstance(value, np.ndarray) and value.size else value
                out[key] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def read_visium(
    path: PathLike,
    *,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    library_id: str | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
) -> ad.AnnData:
    """Read a 10x Visium Space Ranger ``outs`` folder (counts, spot positions, images) without scanpy.read_visium.

    Positions (full-resolution pixels) are converted to µm with ``um_per_pixel = spot_diameter_um /
    spot_diameter_fullres``; ``spot_diameter_fullres`` spans a theoretical 65 µm spot (10x Genomics' definition),
    which puts neighbouring spots 100 µm apart.

    Args:
        path: The ``outs`` folder: ``<counts_file>`` and ``spatial/`` with ``tissue_positions.csv`` (2.x) or
            ``tissue_positions_list.csv`` (1.x), ``scalefactors_json.json`` and optionally
            ``tissue_hires_image.png`` / ``tissue_lowres_image.png``.
        counts_file: 10x HDF5 counts file inside ``path``.
        library_id: Key under ``uns["spatial"]``; default the library id stored in the counts file, else the
            folder name.
        spot_diameter_um: µm spanned by ``spot_diameter_fullres`` pixels (keep 65 unless the data say otherwise).

    Returns:
        AnnData (spots x genes): raw counts in ``X`` and ``layers["counts"]`` (float32 CSR); ``var`` symbols with
        ``gene_ids``; ``obs`` ``in_tissue``, ``array_row``, ``array_col``; ``obsm["spatial"]`` ``(x, y) =
        (pxl_col, pxl_row) * um_per_pixel`` in µm; ``uns["spatial"][library_id]`` = ``{"images": {"hires"|"lowres":
        uint8 [h, w, 3]}, "scalefactors": {...}, "metadata": {...}}`` (scanpy/squidpy layout; the images stay in
        pixel units, so plot with the scale factor times ``1 / um_per_pixel``); ``uns["msfm_spatial"]`` =
        ``{"unit": "um", "um_per_unit": 1.0, "um_per_pixel": ..., "source": ...}``.

    Raises:
        MsfmInputError: a missing folder or file (named), or counts barcodes absent from the positions file.

    Shape:
        ``obsm["spatial"]``: ``[n_spots, 2]`` float64.
    """
    root = Path(path)
    spatial = _spatial_dir(root)
    h5 = root / counts_file
    if not h5.is_file():
        msg = (
            f"Visium folder {str(root)!r}: the counts file {counts_file!r} is missing (found: "
            f"{sorted(p.name for p in root.iterdir())}). Pass counts_file=<name of the 10x .h5 file>."
        )
        raise MsfmInputError(msg)
    if not (np.isfinite(spot_diameter_um) and spot_diameter_um > 0):
        msg = f"read_visium: spot_diameter_um={spot_diameter_um!r} must be a positive number of micrometres."
        raise MsfmInputError(msg)
    factors = _scalefactors(spatial)
    positions = visium_positions(root)
    adata = _read_counts_h5(h5)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    barcodes = adata.obs_names
    missing = ~barcodes.isin(positions.index)
    if missing.any():
        msg = (
            f"{h5.name}: {int(missing.sum())} of {len(barcodes)} barcodes are not in "
            f"spatial/{positions.attrs['source_file']} (e.g. {list(barcodes[missing][:3])}). The counts and the "
            "positions come from different runs; use the files of one Space Ranger output."
        )
        raise MsfmInputError(msg)
    pos = positions.loc[barcodes]
    um_per_pixel = spot_diameter_um / factors["spot_diameter_fullres"]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy()
    adata.obsm["spatial"] = np.column_stack(
        [
            pos["pxl_col_in_fullres"].to_numpy() * um_per_pixel,
            pos["pxl_row_in_fullres"].to_numpy() * um_per_pixel,
        ]
    )
    adata.layers["counts"] = adata.X.copy()
    meta = _counts_metadata(h5)
    lib = library_id or meta.pop("library_ids", None) or root.name
    meta.pop("library_ids", None)
    adata.uns["spatial"] = {
        str(lib): {"images": _read_images(spatial), "scalefactors": factors, "metadata": meta},
    }
    adata.uns["msfm_spatial"] = {
        "unit": "um",
        "um_per_unit": 1.0,
        "um_per_pixel": float(um_per_pixel),
        "spot_diameter_um": float(spot_diameter_um),
        "source": f"{root.resolve()} ({counts_file}, spatial/{positions.attrs['source_file']})",
        "library_id": str(lib),
    }
    return adata


# ------------------------------------------------------------------------------------------------- inputs
def is_visium_folder(path: PathLike) -> bool:
    """True for a folder with a ``spatial/`` subfolder (the layout of a Space Ranger ``outs`` folder)."""
    p = Path(path)
    return p.is_dir() and (p / "spatial").is_dir()


def as_spatial_anndata(data: ad.AnnData | PathLike, *, copy: bool = False) -> ad.AnnData:
    """The AnnData a spatial verb works on: ``data`` itself (or a copy), a file, or a Visium ``outs`` folder.

    A Visium folder is read with :func:`read_visium`: its ``filtered_feature_bc_matrix.h5``, or the only ``.h5``
    matrix of the folder. Everything else goes through :func:`msfm.data.as_anndata`.

    Raises:
        MsfmInputError: a missing path, an unknown format, or a Visium folder without exactly one ``.h5`` matrix.
    """
    from msfm.data.readers import as_anndata

    if isinstance(data, ad.AnnData) or not is_visium_folder(data):
        return as_anndata(data, copy=copy)
    path = Path(data)
    default = "filtered_feature_bc_matrix.h5"
    if (path / default).is_file():
        return read_visium(path)
    found = sorted(p.name for p in path.glob("*.h5"))
    if len(found) != 1:
        msg = (
            f"{path} looks like a Visium outs folder (it has spatial/) but holds {len(found)} .h5 matrices "
            f"{found[:5]} and no {default}; expected exactly one."
        )
        raise MsfmInputError(msg)
    return read_visium(path, counts_file=found[0])


def read_positions(path: PathLike, *, what: str = "positions") -> np.ndarray:
    """``[k, 2]`` float64 coordinates from the ``x`` and ``y`` columns of a CSV/TSV file (one point a row).

    Args:
        path: ``.csv``, or ``.tsv``/``.tab``/``.txt`` (tab-separated); column names are matched case-insensitively.
        what: what the points are, for error messages (``"positions"``, ``"region_polygon"``).

    Raises:
        MsfmInputError: missing file or columns, no rows, non-numeric or non-finite values.
    """
    p = Path(path)
    if not p.is_file():
        msg = f"{what}: {p} does not exist."
        raise MsfmInputError(msg)
    sep = "\t" if p.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    table = pd.read_csv(p, sep=sep)
    cols = {str(c).strip().lower(): c for c in table.columns}
    if "x" not in cols or "y" not in cols:
        msg = f"{what}: {p} needs columns x and y; it has {list(table.columns)[:20]}."
        raise MsfmInputError(msg)
    if table.empty:
        msg = f"{what}: {p} has no rows."
        raise MsfmInputError(msg)
    try:
        xy = table[[cols["x"], cols["y"]]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        msg = f"{what}: {p}: columns x and y must be numbers."
        raise MsfmInputError(msg) from None
    if not np.isfinite(xy).all():
        msg = f"{what}: {p}: x and y must be finite numbers (found NaN/inf or empty cells)."
        raise MsfmInputError(msg)
    return xy
