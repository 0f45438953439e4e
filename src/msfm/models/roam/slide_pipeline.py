"""One slide through the preprocessing pipeline (:func:`process_slide`)::

    open_slide -> thumbnail -> segment_tissue -> plan_rois -> for each ROI:
        read_roi -> [skip background: R-channel std < 5] -> [stain normalisation] -> roi_pyramid (84 patches)
    -> encoder, several ROIs' patches per forward -> features/<slide_id>.h5 (+ qc/<slide_id>.png)

Reading, stain normalisation and pyramid cutting run in reader threads that work a few ROIs ahead of the encoder
(OpenSlide, PIL and most numpy work release the GIL), so the encoder rarely waits for the disk.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msfm.errors import MsfmInputError
from msfm.models.roam.encoders import PatchEncoder
from msfm.models.roam.features import TOKENS_PER_ROI, SlideFeatures, read_feature_attrs, write_slide_features
from msfm.models.roam.preprocess_config import PreprocessConfig, run_signature
from msfm.models.roam.qc import render_qc, save_png
from msfm.runtime.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["REPORT_COLUMNS", "finished_attrs", "process_slide", "segmentation_thumbnail_size"]

REPORT_COLUMNS = ["slide_id", "path", "status", "n_roi", "n_background", "seconds", "slide_mpp", "error"]


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

    bar = progress_bar(n, slide.path.name, enabled=progress, unit="ROI")
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
                    save_png(img, qc_path)

            if len(grid) == 0:
                qc(None, "no ROI with enough tissue")
                msg = (
                    f"Slide {slide_id} ({path}): no ROI of {config.roi_size} px at {config.target_mpp} µm/px holds "
                    f">= {config.min_tissue:.0%} tissue; the tissue mask (preset {config.tissue_preset!r}) covers "
                    f"{float(mask.mean()):.1%} of the slide. Check the QC image{f' {qc_path}' if config.qc else ''}; "
                    "if the slide has tissue, try --tissue permissive or biopsy, a lower --min-tissue or a smaller "
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


def finished_attrs(path: Path, signature: dict[str, Any], dim: int) -> dict[str, Any] | None:
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
