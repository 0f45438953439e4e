"""Whole-slide preprocessing for ROAM: slides in, one ROI feature file per slide out.

Per slide (:func:`process_slide`)::

    open_slide -> thumbnail -> segment_tissue -> plan_rois -> for each ROI:
        read_roi -> [skip background: R-channel std < 5] -> [stain normalisation] -> roi_pyramid (84 patches)
    -> encoder, several ROIs' patches per forward -> features/<slide_id>.h5 (+ qc/<slide_id>.png)

Reading, stain normalisation and pyramid cutting run in reader threads that work a few ROIs ahead of the encoder
(OpenSlide, PIL and most numpy work release the GIL), so the encoder rarely waits for the disk.

:func:`preprocess_slides` runs a batch:

* inputs: slide files, folders (searched recursively for :data:`SLIDE_EXTENSIONS`) or CSV files with a ``path``
  column and an optional ``slide_id`` column (relative paths are relative to the CSV's folder);
* resumable: a slide whose feature file exists, reads, and was made with the same encoder and the same
  feature-relevant configuration is skipped; files are written atomically, so a partial file never exists;
* one failing slide (unreadable, too small, no tissue, no mpp, ...) is reported and the batch goes on;
* ``shard=(i, n)``: the slides ``i, i+n, i+2n, ...`` of the sorted slide ids, for splitting a cohort across jobs;
* ``workers > 1``: slides in parallel in spawned processes, the CPU threads split between them;
* outputs: ``out_dir/features/<slide_id>.h5``, ``out_dir/qc/<slide_id>.png`` (thumbnail, tissue mask tint and
  outline, kept ROIs in blue, background-skipped ROIs in grey), ``out_dir/reports/report[.shard-i-of-n].csv``
  and ``out_dir/preprocess_config.json``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msfm.data.slide_ids import check_slide_id
from msfm.data.slides import SLIDE_EXTENSIONS
from msfm.errors import MsfmInputError
from msfm.models.roam.encoders import PatchEncoder, build_encoder, encoder_signature, torch_threads_for
from msfm.models.roam.features import (
    TOKENS_PER_ROI,
    SlideFeatures,
    feature_path,
    read_feature_attrs,
    write_slide_features,
)

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_COLUMNS",
    "SLIDE_EXTENSIONS",
    "PreprocessConfig",
    "collect_slides",
    "parse_shard",
    "preprocess_slides",
    "process_slide",
    "render_qc",
    "run_signature",
    "segmentation_thumbnail_size",
]


REPORT_COLUMNS = ["slide_id", "path", "status", "n_roi", "n_background", "seconds", "slide_mpp", "error"]
# Bump when the per-slide pipeline changes its output, so old files are no longer "done" on resume.
PIPELINE_VERSION = 1
# Fields of PreprocessConfig that change the features (the rest only change speed or side outputs).
_FEATURE_FIELDS = (
    "target_mpp",
    "roi_size",
    "patch_size",
    "step",
    "tissue_preset",
    "tissue_overrides",
    "min_tissue",
    "seg_mpp",
    "thumbnail_size",
    "skip_background",
    "background_std",
    "stain_norm",
    "mpp",
)


class PreprocessConfig(BaseModel):
    """Settings of :func:`preprocess_slides` (frozen; stored in every feature file and in
    ``out_dir/preprocess_config.json``).

    ROAM reads 84 tokens per ROI (8x8 + 4x4 + 2x2 patches), so ``roi_size`` must be ``8 * patch_size``:
    2048/256 (the ROAM setting), or smaller pairs such as 512/64 for quick tests.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            # One MsfmInputError that names each bad field, instead of pydantic's multi-line report.
            parts = []
            for e in err.errors():
                text = str(e["msg"]).removeprefix("Value error, ")
                where = ".".join(str(x) for x in e["loc"])
                parts.append(f"{where}: {text} (got {e.get('input')!r})" if where else text)
            problems = "; ".join(parts)
            msg = f"Invalid preprocessing settings: {problems}"
            raise MsfmInputError(msg) from None

    target_mpp: float = Field(0.5, gt=0, description="microns per pixel of the ROIs (0.5 = 20x)")
    roi_size: int = Field(2048, ge=8, description="ROI side in pixels at target_mpp")
    patch_size: int = Field(256, ge=1, description="patch side in pixels (roi_size / 8)")
    step: int | None = Field(None, ge=1, description="ROI step at target_mpp (default roi_size: no overlap)")
    tissue_preset: str = Field("default", description="msfm.data.tissue.TISSUE_PRESETS name")
    tissue_overrides: dict[str, Any] = Field(
        default_factory=dict, description="TissueParams fields to change"
    )
    min_tissue: float = Field(0.1, ge=0, le=1, description="smallest tissue fraction of a kept ROI")
    seg_mpp: float = Field(
        8.0, gt=0, description="microns per pixel of the segmentation thumbnail (CLAM ~16)"
    )
    thumbnail_size: int = Field(2048, ge=64, description="largest side of the segmentation thumbnail")
    skip_background: bool = Field(True, description="drop ROIs whose red-channel std is below background_std")
    background_std: float = Field(5.0, ge=0)
    stain_norm: Literal["none", "macenko", "reinhard"] = "none"
    stain_target: str | None = Field(None, description="stain target image (default: the bundled one)")
    encoder: str = Field("resnet50_trunc", description="msfm.models.roam.encoders name")
    weights: str | None = Field(None, description="local encoder weights file")
    encoder_options: dict[str, Any] = Field(default_factory=dict, description="encoder builder options")
    mpp: float | None = Field(None, gt=0, description="mpp override for every slide (slides without mpp)")
    backend: str = Field("auto", description="slide reader backend: auto | openslide | tiffslide | image")
    batch_size: int = Field(256, ge=1, description="patches per encoder batch (rounded to whole ROIs)")
    cpu_chunk: int | None = Field(
        None, ge=1, description="patches per forward on the CPU (default: the encoder's cache-friendly size)"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    workers: int = Field(1, ge=1, description="slides processed in parallel (processes)")
    read_threads: int = Field(2, ge=1, description="reader threads per slide (prefetch ahead of the encoder)")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker (default: split)")
    qc: bool = Field(True, description="write qc/<slide_id>.png")
    qc_size: int = Field(1024, ge=64, description="longest side of the QC image")

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        from msfm.data.tissue import TISSUE_PRESETS, TissueParams

        if self.roi_size != 8 * self.patch_size:
            msg = (
                f"roi_size={self.roi_size} with patch_size={self.patch_size} does not give ROAM's 84 tokens per ROI "
                f"(8x8 + 4x4 + 2x2 patches): roi_size must be 8 x patch_size, e.g. 2048/256 (ROAM) or 512/64."
            )
            raise MsfmInputError(msg)
        if self.tissue_preset not in TISSUE_PRESETS:
            msg = f"Unknown tissue preset {self.tissue_preset!r}; use one of {sorted(TISSUE_PRESETS)}."
            raise MsfmInputError(msg)
        if self.tissue_overrides:
            try:
                TissueParams(**{**TISSUE_PRESETS[self.tissue_preset].model_dump(), **self.tissue_overrides})
            except Exception as err:
                msg = f"tissue_overrides {self.tissue_overrides} are not valid TissueParams fields/values: {err}"
                raise MsfmInputError(msg) from err
        return self

    def tissue_params(self) -> Any:
        """The :class:`~msfm.data.tissue.TissueParams` of this config (preset plus overrides)."""
        from msfm.data.tissue import TISSUE_PRESETS

        preset = TISSUE_PRESETS[self.tissue_preset]
        return preset.model_copy(update=self.tissue_overrides) if self.tissue_overrides else preset

    def build_encoder(self) -> PatchEncoder:
        """The encoder this config names (on the CPU)."""
        return build_encoder(self.encoder, weights=self.weights, **self.encoder_options)

    def build_normalizer(self) -> Any:
        """The fitted stain normaliser, or ``None``."""
        from msfm.data.stain import build_normalizer

        return build_normalizer(self.stain_norm, self.stain_target)


def run_signature(config: PreprocessConfig, encoder: PatchEncoder, normalizer: Any) -> dict[str, Any]:
    """Everything that determines a slide's features: feature-relevant config fields, the encoder's signature
    (weights checksum, not location) and the fitted stain normaliser. Two runs with equal signatures write
    identical files, so a file with this signature is "done" on resume.
    """
    sig = {
        "pipeline_version": PIPELINE_VERSION,
        "config": {k: getattr(config, k) for k in _FEATURE_FIELDS},
        "encoder": encoder_signature(encoder.describe()),
        "stain": normalizer.to_dict() if normalizer is not None else None,
    }
    return json.loads(json.dumps(sig, sort_keys=True))  # the form it has after a round trip through a file


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def _rows_from_table(df: pd.DataFrame, *, base: Path, source: str) -> list[tuple[str, Path]]:
    if "path" not in df.columns:
        msg = (
            f"Slide table {source} has columns {list(df.columns)}; expected a 'path' column (one slide file per row) "
            "and optionally 'slide_id'."
        )
        raise MsfmInputError(msg)
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        raw = rec["path"]
        if raw is None or (isinstance(raw, float) and np.isnan(raw)) or not str(raw).strip():
            msg = f"Slide table {source}: row {i} has an empty 'path'."
            raise MsfmInputError(msg)
        p = Path(str(raw).strip()).expanduser()
        if not p.is_absolute():
            p = base / p
        sid = rec.get("slide_id")
        if sid is None or (isinstance(sid, float) and np.isnan(sid)) or not str(sid).strip():
            sid = p.stem
        rows.append((check_slide_id(sid, f"{source}, row {i}"), p))
    return rows


def _is_under(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def collect_slides(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | pd.DataFrame,
    *,
    exclude: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Resolve slide inputs into a table of unique slide ids and paths, sorted by slide id.

    Args:
        inputs: Slide files, folders (searched recursively for :data:`SLIDE_EXTENSIONS`; hidden files skipped),
            CSV files with a ``path`` column (+ optional ``slide_id``; relative paths are relative to the CSV's
            folder), or a DataFrame with those columns.
        exclude: A folder whose files are never taken as slides (the output folder, which holds QC PNGs).

    Returns:
        DataFrame with columns ``slide_id``, ``path`` (slide id = file stem unless the table gives one).

    Raises:
        MsfmInputError: A path that does not exist, a folder without slides, a table without ``path``, or two
            slides with the same id.
    """
    excl = Path(exclude) if exclude is not None else None
    rows: list[tuple[str, Path]] = []
    if isinstance(inputs, pd.DataFrame):
        rows = _rows_from_table(inputs, base=Path.cwd(), source="(DataFrame)")
    else:
        items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
        if not items:
            msg = "No slides given. Pass slide files, folders of slides or a CSV with a 'path' column."
            raise MsfmInputError(msg)
        for item in items:
            p = Path(item).expanduser()
            if p.is_dir():
                found = sorted(
                    f
                    for f in p.rglob("*")
                    if f.suffix.lower() in SLIDE_EXTENSIONS
                    and not f.name.startswith(".")
                    and f.is_file()
                    and not _is_under(f, excl)
                )
                if not found:
                    msg = f"Folder {p} holds no slides (searched recursively for {', '.join(SLIDE_EXTENSIONS)})."
                    raise MsfmInputError(msg)
                rows += [(check_slide_id(f.stem, str(f)), f) for f in found]
            elif p.is_file() and p.suffix.lower() == ".csv":
                try:
                    table = pd.read_csv(p)
                except Exception as err:
                    msg = f"Cannot read the slide table {p} as CSV: {err}."
                    raise MsfmInputError(msg) from err
                rows += _rows_from_table(table, base=p.parent, source=str(p))
            elif p.is_file():
                rows.append((check_slide_id(p.stem, str(p)), p))
            else:
                msg = f"Slide input {p} does not exist. Pass slide files, folders or a CSV with a 'path' column."
                raise MsfmInputError(msg)
    # The same file reached twice (a folder and a file in it) is one slide; two files with one id are an error.
    seen: dict[str, Path] = {}
    dups: dict[str, list[str]] = {}
    for sid, p in rows:
        if sid in seen:
            if seen[sid].resolve() != p.resolve():
                dups.setdefault(sid, [str(seen[sid])]).append(str(p))
            continue
        seen[sid] = p
    if dups:
        shown = "; ".join(f"{k}: {v}" for k, v in list(dups.items())[:5])
        msg = (
            f"{len(dups)} slide id(s) are used by more than one file ({shown}{' ...' if len(dups) > 5 else ''}). "
            "Output files are named by slide id, so ids must be unique: rename the files or pass a CSV with "
            "'path' and unique 'slide_id' columns."
        )
        raise MsfmInputError(msg)
    table = pd.DataFrame({"slide_id": list(seen), "path": [str(p) for p in seen.values()]})
    return table.sort_values("slide_id", kind="stable").reset_index(drop=True)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based ``i``) or ``(i, n)`` -> ``(i, n)``, checked; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in (text.split("/") if isinstance(text, str) else text))
    except (ValueError, TypeError) as err:
        msg = f"shard {text!r} must look like 'i/n' with 0 <= i < n, e.g. '0/4' for the first of 4 shards."
        raise MsfmInputError(msg) from err
    if n < 1 or not 0 <= i < n:
        msg = (
            f"shard {text!r}: need n >= 1 and 0 <= i < n (shards are numbered from 0), e.g. '0/4' ... '3/4'."
        )
        raise MsfmInputError(msg)
    return i, n


# ----------------------------------------------------------------------------------------------------------
# QC image
# ----------------------------------------------------------------------------------------------------------
def render_qc(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    roi_size_level0: int,
    *,
    background: np.ndarray | None = None,
    title: str = "",
    max_size: int = 1024,
) -> Any:
    """Quality-control picture of one slide: thumbnail, tissue tint and outline, ROI rectangles.

    Args:
        thumbnail: uint8 RGB thumbnail.
        mask: Boolean tissue mask (resized to the thumbnail if needed).
        downsample: Level-0 pixels per thumbnail pixel.
        coords: Level-0 ``(x, y)`` of the ROIs.
        roi_size_level0: ROI side in level-0 pixels.
        background: Boolean per ROI: skipped as background (drawn grey instead of blue).
        title: Text drawn in the top-left corner.
        max_size: Longest side of the result.

    Returns:
        A PIL RGB image.

    Shape:
        thumbnail ``[h, w, 3]``, mask ``[h, w]``, coords ``[n, 2]``, background ``[n]``.
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    img = np.asarray(thumbnail, dtype=np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape[:2]:
        m = np.asarray(Image.fromarray(m).resize((img.shape[1], img.shape[0]), Image.Resampling.NEAREST))
    img[m] = 0.75 * img[m] + 0.25 * np.array([40.0, 200.0, 40.0])
    edge = m & ~ndimage.binary_erosion(m, iterations=max(1, round(max(img.shape[:2]) / 500)))
    img[edge] = (0.0, 130.0, 0.0)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    scale = min(1.0, max_size / max(out.size))
    if scale < 1.0:
        out = out.resize(
            (max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.BOX
        )
    draw = ImageDraw.Draw(out)
    f = scale / float(downsample)
    bg = np.zeros(len(coords), bool) if background is None else np.asarray(background, bool)
    width = max(1, round(max(out.size) / 400))
    for (x, y), is_bg in zip(np.asarray(coords).reshape(-1, 2), bg, strict=False):
        box = (x * f, y * f, (x + roi_size_level0) * f - 1, (y + roi_size_level0) * f - 1)
        draw.rectangle(box, outline=(150, 150, 150) if is_bg else (20, 80, 255), width=width)
    if title:
        draw.rectangle((0, 0, min(out.width, 8 + 7 * len(title)), 16), fill=(255, 255, 255))
        draw.text((4, 3), title, fill=(0, 0, 0))
    return out


def _save_png(img: Any, path: Path) -> None:
    from msfm.runtime.atomic import atomic_write

    with atomic_write(path, "wb") as fh:
        img.save(fh, format="PNG")


# ----------------------------------------------------------------------------------------------------------
# one slide
# ----------------------------------------------------------------------------------------------------------
def _encode_rois(
    slide: Any,
    grid: Any,
    encoder: PatchEncoder,
    normalizer: Any,
    config: PreprocessConfig,
    device: torch.device,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every non-background ROI of ``grid`` and the background flags.

    Reader threads run read -> background test -> stain normalisation -> pyramid a few ROIs ahead; the calling
    thread batches whole ROIs (``config.batch_size`` patches) through the encoder.

    Returns:
        ``(features float32 [n_kept, 84, d], background bool [n])``.
    """
    from msfm.data.wsi import is_background_roi, read_roi, roi_pyramid

    n = len(grid)
    rois_per_batch = max(1, config.batch_size // TOKENS_PER_ROI)
    background = np.zeros(n, dtype=bool)
    chunks: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def load(i: int) -> np.ndarray | None:
        roi = read_roi(slide, grid, i)
        if config.skip_background and is_background_roi(roi, config.background_std):
            return None
        if normalizer is not None:
            roi = normalizer.transform(roi)
        return roi_pyramid(roi, patch_size=config.patch_size)

    def flush() -> None:
        if not pending:
            return
        batch = np.concatenate(pending, axis=0)
        out = encoder.encode(batch, device=device, chunk=config.cpu_chunk if device.type == "cpu" else None)
        chunks.append(out.float().cpu().numpy().reshape(len(pending), TOKENS_PER_ROI, encoder.dim))
        pending.clear()

    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=slide.path.name, unit="ROI", leave=False, disable=not progress)
    # Enough ROIs in flight to fill the next batch while the current one is encoded.
    ahead = max(2 * config.read_threads, rois_per_batch + config.read_threads)
    pool = cf.ThreadPoolExecutor(max_workers=config.read_threads, thread_name_prefix="msfm-roi-reader")
    try:
        window: deque[cf.Future[np.ndarray | None]] = deque()
        nxt = 0
        while nxt < n and len(window) < ahead:
            window.append(pool.submit(load, nxt))
            nxt += 1
        i = 0
        while window:
            patches = window.popleft().result()
            if nxt < n:
                window.append(pool.submit(load, nxt))
                nxt += 1
            if patches is None:
                background[i] = True
            else:
                pending.append(patches)
                if len(pending) >= rois_per_batch:
                    flush()
            i += 1
            bar.update(1)
        flush()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    feats = (
        np.concatenate(chunks, axis=0) if chunks else np.zeros((0, TOKENS_PER_ROI, encoder.dim), np.float32)
    )
    return feats, background


def process_slide(
    path: str | os.PathLike[str],
    slide_id: str,
    out_dir: str | os.PathLike[str],
    config: PreprocessConfig,
    encoder: PatchEncoder,
    normalizer: Any = None,
    *,
    signature: dict[str, Any] | None = None,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Preprocess one slide into ``out_dir/features/<slide_id>.h5`` (and its QC image).

    Never raises for a bad slide: the returned report row has ``status`` ``"ok"`` or ``"failed"`` with the
    error's type and message.

    Args:
        path: Slide file.
        slide_id: Output name.
        out_dir: Output folder (``features/`` and ``qc/`` are created).
        config: The settings.
        encoder: A built encoder (moved to ``device`` by the caller).
        normalizer: A fitted stain normaliser or ``None``.
        signature: :func:`run_signature` (computed if not given).
        device: Where the encoder runs (default: the encoder's device).
        progress: Show a per-ROI progress bar.

    Returns:
        One report row (keys :data:`REPORT_COLUMNS`).
    """
    from msfm.data.slides import open_slide, require_mpp
    from msfm.data.tissue import segment_tissue
    from msfm.data.wsi import NoTissueError, plan_rois

    t0 = time.perf_counter()
    out = Path(out_dir)
    row: dict[str, Any] = {"slide_id": slide_id, "path": str(path), "status": "failed", "n_roi": 0}
    row.update(n_background=0, slide_mpp=None, error="")
    signature = signature if signature is not None else run_signature(config, encoder, normalizer)
    device = device if device is not None else encoder.device
    try:
        (out / "features").mkdir(parents=True, exist_ok=True)
        if config.qc:
            (out / "qc").mkdir(parents=True, exist_ok=True)
        with open_slide(path, backend=config.backend, mpp=config.mpp) as slide:
            slide_mpp = require_mpp(slide, config.mpp)
            row["slide_mpp"] = slide_mpp
            thumb, ds = slide.thumbnail(segmentation_thumbnail_size(slide.dimensions, slide_mpp, config))
            mask = segment_tissue(thumb, mpp_thumb=slide_mpp * ds, params=config.tissue_params())
            grid = plan_rois(
                slide,
                mask,
                ds,
                slide_mpp=slide_mpp,
                target_mpp=config.target_mpp,
                roi_size=config.roi_size,
                step=config.step,
                min_tissue=config.min_tissue,
            )
            qc_path = out / "qc" / f"{slide_id}.png"

            def qc(background: np.ndarray | None, note: str) -> None:
                if config.qc:
                    title = f"{slide_id}: {note}"
                    img = render_qc(
                        thumb,
                        mask,
                        ds,
                        grid.coords,
                        grid.roi_size_level0,
                        background=background,
                        title=title,
                        max_size=config.qc_size,
                    )
                    _save_png(img, qc_path)

            if len(grid) == 0:
                qc(None, "no ROI with enough tissue")
                msg = (
                    f"Slide {slide_id} ({path}): no ROI of {config.roi_size} px at {config.target_mpp} µm/px holds "
                    f">= {config.min_tissue:.0%} tissue; the tissue mask (preset {config.tissue_preset!r}) covers "
                    f"{float(mask.mean()):.1%} of the slide. Check the QC image{f' {qc_path}' if config.qc else ''}; "
                    "if the slide has tissue, try --preset permissive or biopsy, a lower --min-tissue or a smaller "
                    "--roi-size."
                )
                raise NoTissueError(msg)
            feats, background = _encode_rois(
                slide, grid, encoder, normalizer, config, device, progress=progress
            )
            kept = ~background
            row["n_background"] = int(background.sum())
            qc(background, f"{int(kept.sum())} ROIs, {int(background.sum())} background")
            if not kept.any():
                msg = (
                    f"Slide {slide_id} ({path}): all {len(grid)} ROIs on the tissue mask are blank (red-channel std < "
                    f"{config.background_std}), so no features were written. Check the QC image; if the slide has "
                    "faint tissue, pass --keep-background (skip_background=False)."
                )
                raise NoTissueError(msg)
            stain_target = (
                config.stain_target if config.stain_target is not None else "bundled:target_image.png"
            )
            attrs = {
                "slide_path": str(Path(path).resolve()),
                "slide_backend": slide.backend,
                "slide_mpp": float(slide_mpp),
                "mpp_source": str(slide.mpp_source) if config.mpp is None else "override",
                "slide_dimensions": tuple(int(v) for v in slide.dimensions),
                "target_mpp": float(config.target_mpp),
                "roi_size": int(config.roi_size),
                "roi_size_level0": int(grid.roi_size_level0),
                "patch_size": int(config.patch_size),
                "read_level": int(grid.read_level),
                "grid_shape": tuple(int(v) for v in grid.grid_shape),
                "grid_origin": tuple(int(v) for v in grid.origin),
                "step_level0": int(grid.step_level0),
                "n_background": int(background.sum()),
                "encoder": encoder.name,
                "encoder_config": json.dumps(encoder.describe(), sort_keys=True),
                "stain_norm": config.stain_norm,
                "stain_target": stain_target if config.stain_norm != "none" else "none",
                "tissue_preset": config.tissue_preset,
                "preprocess_config": json.dumps(signature, sort_keys=True),
            }
            write_slide_features(
                out / "features" / f"{slide_id}.h5",
                SlideFeatures(
                    slide_id=slide_id,
                    features=feats,
                    coords=grid.coords[kept],
                    tissue_fraction=grid.tissue_fraction[kept],
                    attrs=attrs,
                ),
            )
        row.update(status="ok", n_roi=int(kept.sum()))
    except Exception as err:  # one bad slide must not stop the batch; the report carries the reason
        row["error"] = f"{type(err).__name__}: {err}"
        logger.warning("slide %s failed: %s", slide_id, row["error"])
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def segmentation_thumbnail_size(
    dimensions: tuple[int, int], slide_mpp: float, config: PreprocessConfig
) -> int:
    """Longest side of the thumbnail the tissue mask is computed on: the slide at ``seg_mpp`` µm/px, at least
    512 px (small slides) and at most ``thumbnail_size`` px (huge slides)."""
    side_um = max(dimensions) * float(slide_mpp)
    return int(min(config.thumbnail_size, max(512, math.ceil(side_um / config.seg_mpp))))


def _done(path: Path, signature: dict[str, Any], dim: int) -> dict[str, Any] | None:
    """The attrs of a finished feature file made with ``signature``, else ``None``."""
    if not path.is_file():
        return None
    try:
        attrs = read_feature_attrs(path)
        stored = json.loads(attrs.get("preprocess_config") or "{}")
    except (MsfmInputError, ValueError):
        return None
    if attrs.get("n_tokens") != TOKENS_PER_ROI or attrs.get("feature_dim") != dim or stored != signature:
        return None
    return attrs


# ----------------------------------------------------------------------------------------------------------
# worker processes
# ----------------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(config_json: str, threads: int) -> None:
    from msfm.runtime.devices import resolve_device

    torch.set_num_threads(threads)
    config = PreprocessConfig.model_validate_json(config_json)
    device = resolve_device(config.device)
    encoder = config.build_encoder().to(device)
    normalizer = config.build_normalizer()
    _WORKER.update(
        config=config,
        encoder=encoder,
        normalizer=normalizer,
        device=device,
        signature=run_signature(config, encoder, normalizer),
    )


def _worker_slide(path: str, slide_id: str, out_dir: str) -> dict[str, Any]:
    w = _WORKER
    return process_slide(
        path,
        slide_id,
        out_dir,
        w["config"],
        w["encoder"],
        w["normalizer"],
        signature=w["signature"],
        device=w["device"],
    )


# ----------------------------------------------------------------------------------------------------------
# the batch
# ----------------------------------------------------------------------------------------------------------
def preprocess_slides(
    slides: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | pd.DataFrame,
    out_dir: str | os.PathLike[str],
    config: PreprocessConfig | None = None,
    *,
    shard: tuple[int, int] | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Preprocess a batch of slides into ROI feature files (resumable, fault-tolerant, shardable).

    Args:
        slides: Slide files, folders, CSVs with a ``path`` column, or a DataFrame (see :func:`collect_slides`).
        out_dir: Output folder.
        config: Settings (default :class:`PreprocessConfig`, which needs ``weights`` for ``resnet50_trunc``).
        shard: ``(i, n)`` or ``"i/n"``: process only slides ``i, i+n, ...`` of the sorted slide ids.
        overwrite: Redo slides whose feature file is already complete.
        progress: Show progress bars.

    Returns:
        The report, one row per slide of the shard (columns :data:`REPORT_COLUMNS`; ``status`` is ``ok``,
        ``skipped`` or ``failed``), also written to ``out_dir/reports/report[.shard-i-of-n].csv``.

    Raises:
        MsfmInputError: Bad inputs or settings (per-slide problems are reported, not raised).
    """
    from tqdm.auto import tqdm

    from msfm._version import __version__
    from msfm.runtime.atomic import atomic_write_json
    from msfm.runtime.devices import resolve_device

    config = config if config is not None else PreprocessConfig()
    shard_t = parse_shard(shard)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        msg = f"Output {out} is a file; pass a folder for --out."
        raise MsfmInputError(msg)
    table = collect_slides(slides, exclude=out)
    if shard_t is not None:
        table = table.iloc[shard_t[0] :: shard_t[1]].reset_index(drop=True)
    device = resolve_device(config.device)
    # Built here (even when workers do the encoding) so that bad weights or settings fail before any slide.
    encoder = config.build_encoder()
    normalizer = config.build_normalizer()
    signature = run_signature(config, encoder, normalizer)
    for sub in ("features", "qc", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "preprocess_config.json",
        {
            "config": json.loads(config.model_dump_json()),
            "signature": signature,
            "encoder": encoder.describe(),
            "msfm_version": __version__,
            "tokens_per_roi": TOKENS_PER_ROI,
        },
    )

    rows: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, str]] = []
    for sid, path in zip(table["slide_id"], table["path"], strict=True):
        done = None if overwrite else _done(feature_path(out / "features", sid), signature, encoder.dim)
        if done is not None:
            rows[sid] = {
                "slide_id": sid,
                "path": path,
                "status": "skipped",
                "n_roi": int(done.get("n_roi", 0)),
                "n_background": int(done.get("n_background") or 0),
                "seconds": 0.0,
                "slide_mpp": done.get("slide_mpp"),
                "error": "",
            }
        else:
            todo.append((sid, path))

    bar = tqdm(total=len(table), desc="slides", unit="slide", disable=not progress)
    bar.update(len(rows))
    workers = min(config.workers, max(1, len(todo)))

    def record(row: dict[str, Any]) -> None:
        rows[row["slide_id"]] = row
        bar.update(1)
        bar.set_postfix_str(f"{row['slide_id']}: {row['status']}", refresh=False)

    try:
        if workers == 1:
            prev_threads = torch.get_num_threads()
            if config.torch_threads:
                torch.set_num_threads(config.torch_threads)
            try:
                encoder = encoder.to(device)
                for sid, path in todo:
                    record(
                        process_slide(
                            path,
                            sid,
                            out,
                            config,
                            encoder,
                            normalizer,
                            signature=signature,
                            device=device,
                            progress=progress,
                        )
                    )
            finally:
                torch.set_num_threads(prev_threads)
        elif todo:
            threads = config.torch_threads or torch_threads_for(workers)
            # spawn, not fork: forking a process whose torch/OpenMP thread pools are running can deadlock.
            with cf.ProcessPoolExecutor(
                max_workers=workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(config.model_dump_json(), threads),
            ) as pool:
                futures = {pool.submit(_worker_slide, path, sid, str(out)): (sid, path) for sid, path in todo}
                for fut in cf.as_completed(futures):
                    sid, path = futures[fut]
                    try:
                        record(fut.result())
                    except Exception as err:  # a worker that died (out of memory, killed)
                        record(_failed_row(sid, path, err))
    finally:
        bar.close()

    report = pd.DataFrame([rows[s] for s in table["slide_id"] if s in rows], columns=REPORT_COLUMNS)
    name = "report.csv" if shard_t is None else f"report.shard-{shard_t[0]}-of-{shard_t[1]}.csv"
    _write_csv(report, out / "reports" / name)
    return report


def _failed_row(slide_id: str, path: str, err: BaseException) -> dict[str, Any]:
    row = dict.fromkeys(REPORT_COLUMNS)
    row.update(slide_id=slide_id, path=path, status="failed", n_roi=0, n_background=0, seconds=0.0)
    row["error"] = f"{type(err).__name__}: {err}"
    return row


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    from msfm.runtime.atomic import atomic_write_text

    atomic_write_text(path, df.to_csv(index=False))


def summarize(report: pd.DataFrame) -> dict[str, int]:
    """Counts per status of a report."""
    counts = report["status"].value_counts().to_dict() if len(report) else {}
    return {k: int(counts.get(k, 0)) for k in ("ok", "skipped", "failed")}


def iter_failed(report: pd.DataFrame) -> Iterable[tuple[str, str]]:
    """``(slide_id, error)`` of every failed slide."""
    for rec in report[report["status"] == "failed"].itertuples():
        yield str(rec.slide_id), str(rec.error)
