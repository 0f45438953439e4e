"""What ``msfm view PATH...`` serves: the slides, spatial data sets and cell embeddings found at start-up.

Discovery walks each path given (a demo output folder, a ROAM heatmap folder, a slide file, an ``.h5ad``) once;
the result is an allow-list: every entry has a stable id (a slug of its name plus a hash of its resolved path) and
requests address entries by id only, so no path from a request is ever joined onto the disk.

What is recognised in a folder (walked up to :data:`MAX_DEPTH` levels, skipping feature stores, checkpoints and
figure folders):

* a heatmap folder (``rois.h5ad`` + ``summary.json``, as ``msfm roam heatmap`` writes): a slide with its ROIs; the
  slide image is ``summary.json["slide_path"]``, else a slide file of the same id found in the walk;
* ``cascade_predictions.csv`` (``msfm roam cascade``): the calls of each slide, joined by slide id;
* slide files (``.svs``, ``.tif``, ``.ndpi``, ...; plain PNG/JPEG only when given directly);
* ``.h5ad`` files: spatial data when ``obsm["spatial"]`` exists, cells when any other ``obsm["X_*"]`` exists;
* GeST checkpoints (``meta.json`` of family ``gest``): paired with the spatial data found beside them. The demo
  trains its GeST on the bundled ``scc_st()`` spots without saving them, so a ``gest/scc_run*`` checkpoint with no
  spatial ``.h5ad`` next to it is served on ``msfm.datasets.scc_st()``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["CellsEntry", "Sources", "SlideEntry", "SpatialEntry", "discover"]

MAX_DEPTH = 5
_SKIP_DIRS = {
    "checkpoints",
    "figures",
    "preprocessed",
    "features",
    "lightning_logs",
    "roi_maps",
    "__pycache__",
}
_PLAIN_IMAGES = {".png", ".jpg", ".jpeg"}
_BUNDLED_SCC = "scc_st (bundled)"


def _slide_suffixes() -> set[str]:
    from msfm.data.slides import SLIDE_EXTENSIONS

    return set(SLIDE_EXTENSIONS)


def _entry_id(name: str, key: str) -> str:
    """A URL-safe id: the name's slug plus 8 hex digits of a hash of ``key`` (the resolved path)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "item"
    return f"{slug}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"


@dataclass
class SlideEntry:
    """One slide: its image, optional heatmap folder and cascade calls."""

    id: str
    name: str
    image: Path
    heatmap: Path | None = None
    cascade: dict[str, Any] | None = None
    _tiles: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tiles(self) -> Any:
        """The :class:`msfm.view.tiles.SlideTiles` of the image (opened on first use)."""
        with self._lock:
            if self._tiles is None:
                from msfm.view.tiles import SlideTiles

                self._tiles = SlideTiles(self.image)
            return self._tiles


@dataclass
class _LazyAnnData:
    """An AnnData read on first use (and kept): from a file or a bundled data set."""

    path: Path | None
    bundled: str | None = None
    _adata: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def adata(self) -> Any:
        with self._lock:
            if self._adata is None:
                if self.bundled == _BUNDLED_SCC:
                    from msfm.datasets.spatial import scc_st

                    self._adata = scc_st()
                else:
                    import anndata

                    self._adata = anndata.read_h5ad(self.path)
            return self._adata


@dataclass
class SpatialEntry(_LazyAnnData):
    """Spatial data (``obsm["spatial"]``), with the GeST checkpoint that perturbs it, if any."""

    id: str = ""
    name: str = ""
    n_obs: int = 0
    checkpoint: Path | None = None


@dataclass
class CellsEntry(_LazyAnnData):
    """Cells with embeddings (``obsm["X_*"]``)."""

    id: str = ""
    name: str = ""
    n_obs: int = 0
    bases: list[str] = field(default_factory=list)


@dataclass
class Sources:
    """The allow-list the server serves from (entries by id)."""

    slides: dict[str, SlideEntry] = field(default_factory=dict)
    spatial: dict[str, SpatialEntry] = field(default_factory=dict)
    cells: dict[str, CellsEntry] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slides) + len(self.spatial) + len(self.cells)


# ----------------------------------------------------------------------------------------------------- readers
def _h5ad_layout(path: Path) -> tuple[int, list[str]]:
    """``(n_obs, obsm keys)`` of an ``.h5ad`` without reading its matrices."""
    import h5py

    with h5py.File(path, "r") as f:
        obs = f["obs"]
        index = obs.attrs.get("_index", "_index")
        if isinstance(index, bytes):
            index = index.decode()
        n_obs = int(obs[index].shape[0]) if index in obs else 0
        keys = sorted(f["obsm"].keys()) if "obsm" in f else []
    return n_obs, keys


def _gest_checkpoint(folder: Path) -> bool:
    meta = folder / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("family") == "gest"
    except (OSError, ValueError):
        return False


def _read_cascade(path: Path) -> dict[str, dict[str, Any]]:
    """slide id -> {"calls": {stage: call}, "confidence": {stage: p}} from a cascade table (stages that did not
    run on a slide are left out)."""
    out: dict[str, dict[str, Any]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            sid = row.get("slide_id")
            if not sid:
                continue
            stages = [s for s in re.split(r"[>;,|+ ]+", row.get("stages") or "") if s]
            if not stages:
                stages = [k for k in row if k and k != "slide_id" and "_" not in k and k != "stages"]
            calls = {s: row[s] for s in stages if row.get(s)}
            conf = {s: float(row[f"{s}_confidence"]) for s in calls if row.get(f"{s}_confidence")}
            out[sid] = {"calls": calls, "confidence": conf}
    return out


# ------------------------------------------------------------------------------------------------------- walk
@dataclass
class _Found:
    heatmaps: list[Path] = field(default_factory=list)
    slide_files: list[Path] = field(default_factory=list)
    h5ads: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    cascades: list[Path] = field(default_factory=list)


def _walk(root: Path, found: _Found) -> None:
    suffixes = _slide_suffixes() - _PLAIN_IMAGES
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        depth = len(here.parts) - base_depth
        names = set(filenames)
        if "rois.h5ad" in names and "summary.json" in names:
            found.heatmaps.append(here)
            dirnames[:] = []
            continue
        if "meta.json" in names and _gest_checkpoint(here):
            found.checkpoints.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH
        )
        for name in sorted(filenames):
            p = here / name
            low = name.lower()
            if low == "cascade_predictions.csv":
                found.cascades.append(p)
            elif low.endswith(".h5ad"):
                found.h5ads.append(p)
            elif p.suffix.lower() in suffixes:
                found.slide_files.append(p)


def _pair_checkpoint(data_name: str, checkpoints: list[Path]) -> Path | None:
    """The checkpoint for a data set: the only one, or the one whose run name shares a word with the data."""
    if len(checkpoints) == 1:
        return checkpoints[0]
    words = {w for w in re.split(r"[^a-z0-9]+", data_name.lower()) if len(w) > 1}
    for ck in checkpoints:
        run = ck.parent.name if ck.name == "model" else ck.name
        if words & {w for w in re.split(r"[^a-z0-9]+", run.lower()) if len(w) > 1}:
            return ck
    return None


def discover(
    paths: list[str | os.PathLike[str]],
    *,
    spatial: list[str | os.PathLike[str]] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Sources:
    """Find what the viewer serves in ``paths`` (see the module docstring).

    Args:
        paths: Demo output folders, heatmap folders, slide files, ``.h5ad`` files.
        spatial: Extra spatial ``.h5ad`` files (``--spatial``).
        checkpoint: A GeST checkpoint used for every spatial data set (``--checkpoint``), overriding pairing.

    Returns:
        The :class:`Sources` allow-list.

    Raises:
        MsfmInputError: a path that does not exist, a ``--spatial`` file without ``obsm["spatial"]``, a
            ``--checkpoint`` that is not a GeST checkpoint, or nothing to show at all.
    """
    found = _Found()
    direct_slides: list[Path] = []
    suffixes = _slide_suffixes()
    for raw in [*paths, *(spatial or [])]:
        p = Path(raw).expanduser()
        if not p.exists():
            msg = f"msfm view: {p} does not exist; give demo folders, heatmap folders, slide files or .h5ad files."
            raise MsfmInputError(msg)
        if p.is_dir():
            _walk(p.resolve(), found)
        elif p.suffix.lower() == ".h5ad":
            found.h5ads.append(p.resolve())
        elif p.suffix.lower() in suffixes:
            direct_slides.append(p.resolve())
        else:
            msg = (
                f"msfm view: do not know what to show for {p} (suffix {p.suffix or 'none'}); expected a folder, "
                f"an .h5ad or a slide file ({', '.join(sorted(suffixes))})."
            )
            raise MsfmInputError(msg)

    ck_given: Path | None = None
    if checkpoint is not None:
        ck_given = Path(checkpoint).expanduser().resolve()
        if (ck_given / "model").is_dir() and not (ck_given / "meta.json").is_file():
            ck_given = ck_given / "model"  # a run directory was given
        if not _gest_checkpoint(ck_given):
            msg = f"--checkpoint {checkpoint}: not a GeST checkpoint (no meta.json of family 'gest' there)."
            raise MsfmInputError(msg)

    src = Sources()
    cascade: dict[str, dict[str, Any]] = {}
    for c in found.cascades:
        cascade.update(_read_cascade(c))

    # Slides: heatmap folders first (they name their image), then plain slide files not already covered.
    files_by_stem = {p.stem: p for p in [*found.slide_files, *direct_slides]}
    seen: set[Path] = set()
    for h in sorted(found.heatmaps):
        try:
            summary = json.loads((h / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            src.notes.append(f"skipped heatmap folder {h}: unreadable summary.json ({err})")
            continue
        sid = str(summary.get("slide_id") or h.name)
        image = Path(str(summary.get("slide_path") or ""))
        if not image.is_file():
            image = files_by_stem.get(sid, image)
        if not image.is_file():
            src.notes.append(
                f"skipped heatmap of {sid}: its slide image {summary.get('slide_path')} is missing"
            )
            continue
        image = image.resolve()
        seen.add(image)
        eid = _entry_id(sid, str(image))
        src.slides[eid] = SlideEntry(eid, sid, image, heatmap=h, cascade=cascade.get(sid))
    for f in [*found.slide_files, *direct_slides]:
        f = f.resolve()
        if f in seen:
            continue
        seen.add(f)
        eid = _entry_id(f.stem, str(f))
        src.slides[eid] = SlideEntry(eid, f.stem, f, cascade=cascade.get(f.stem))

    # AnnData files: spatial and/or cells.
    spatial_paths = {Path(s).expanduser().resolve() for s in spatial or []}
    for h5 in sorted(set(found.h5ads)):
        try:
            n_obs, keys = _h5ad_layout(h5)
        except Exception as err:
            src.notes.append(f"skipped {h5}: not a readable .h5ad ({type(err).__name__}: {err})")
            continue
        if h5 in spatial_paths and "spatial" not in keys:
            msg = f"--spatial {h5}: no obsm['spatial'] (its obsm keys are {keys}); spatial data need coordinates."
            raise MsfmInputError(msg)
        if "spatial" in keys:
            ck = ck_given or _pair_checkpoint(h5.stem, found.checkpoints)
            eid = _entry_id(h5.stem, str(h5))
            src.spatial[eid] = SpatialEntry(path=h5, id=eid, name=h5.stem, n_obs=n_obs, checkpoint=ck)
        bases = [k for k in keys if k.startswith("X_") and k != "X_spatial"]
        if bases:
            eid = _entry_id(h5.stem, f"cells:{h5}")
            src.cells[eid] = CellsEntry(path=h5, id=eid, name=h5.stem, n_obs=n_obs, bases=bases)

    # The demo's GeST run on the bundled SCC spots (its data are not saved beside it).
    scc_runs = [
        c for c in found.checkpoints if (c.parent.name if c.name == "model" else c.name).startswith("scc")
    ]
    if scc_runs and not any(e.checkpoint in scc_runs for e in src.spatial.values()):
        ck = ck_given or scc_runs[0]
        eid = _entry_id("scc_st", f"bundled:{ck}")
        src.spatial[eid] = SpatialEntry(
            path=None, bundled=_BUNDLED_SCC, id=eid, name=_BUNDLED_SCC, n_obs=621, checkpoint=ck
        )
    if ck_given is not None and not src.spatial:
        src.notes.append("--checkpoint given but no spatial data found; pass --spatial data.h5ad")
    if not len(src):
        msg = (
            f"msfm view found nothing to show in {[str(p) for p in paths]}: no heatmap folder (rois.h5ad + "
            "summary.json), slide file, cascade-annotated slide or .h5ad with obsm['spatial'] / obsm['X_*']."
        )
        raise MsfmInputError(msg)
    for note in src.notes:
        logger.warning("%s", note)
    return src
