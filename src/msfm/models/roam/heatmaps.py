"""``msfm.roam.heatmap``: slide attention heatmaps, ROI galleries and ROI-level maps (feature files in, files out).

For each slide, :func:`heatmap` writes ``OUT/<slide>/`` (atomically, one folder per slide)::

    heatmap.png            thumbnail | attention overlay (jet, alpha 0.4, blurred; CLAM/ROAM style), with a title,
                           a colour bar naming the scale and the raw attention range (msfm.pl.slide_heatmap)
    rois.h5ad              one observation per ROI in the scverse spatial layout (obsm["spatial"] = ROI centres,
                           obs score/percentile/rank/x/y, uns["spatial"][slide] = thumbnail + scale factors,
                           uns["roam_heatmap"] = classes and probabilities); ``HeatmapResult.rois(slide)`` reads it
    gallery.png            the top-k and bottom-k ROIs of the class shown, with their scores
    roi_maps/roi<i>.png    ROI-level maps (20x, 10x, 5x and fused) over the ROI, for the top ``roi_maps`` ROIs
    roi_maps/roi<i>.npz    the raw per-scale maps of that ROI (8x8, 4x4, 2x2)
    scores.csv             roi, x, y, score (softmax over ROIs of the class shown), percentile, rank
    summary.json           predicted class, probabilities, class shown, models, options

A training run directory (``RUN/fold*/best``) is averaged like the release: raw attention scores are averaged over
the folds before the softmax over ROIs, and the class shown is the ensemble prediction unless ``class_name`` is
given. ``msfm roam heatmap`` is the command-line front end; the building blocks (``slide_attention_scores``,
``slide_heatmap``, ``top_roi_gallery``, ``roi_attention_maps``, ``roi_heatmap``) live in :mod:`.interpret`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from msfm.data.slide_ids import check_slide_ids
from msfm.data.slides import SLIDE_EXTENSIONS, open_slide
from msfm.errors import MsfmInputError
from msfm.models.roam.ensemble import ensemble_for
from msfm.models.roam.feature_store import (
    FeatureStore,
    list_feature_slides,
    resolve_feature_files,
    training_geometry,
)
from msfm.models.roam.interpret import (
    METHODS,
    roi_attention_maps,
    roi_heatmap,
    roi_image,
    slide_attention_scores,
    top_roi_gallery,
)
from msfm.pl.slide_heatmap import slide_heatmap as slide_heatmap_figure
from msfm.pl.slides import roi_maps_figure
from msfm.runtime.atomic import atomic_dir, atomic_write_json, atomic_write_text, check_output_free
from msfm.runtime.devices import resolve_device
from msfm.runtime.h5ad import write_h5ad_atomic
from msfm.runtime.progress import progress_iter
from msfm.runtime.results import Result

if TYPE_CHECKING:
    import anndata

logger = logging.getLogger(__name__)

__all__ = ["HeatmapResult", "heatmap"]

_SLIDE_SUFFIXES = set(SLIDE_EXTENSIONS)


@dataclass(frozen=True)
class HeatmapResult(Result):
    """What :func:`heatmap` returns.

    Attributes:
        table: One row per slide: ``slide_id``, ``class_shown``, ``predicted_class``, ``out`` (its folder).
        out: The output folder.
    """

    table: pd.DataFrame
    out: Path

    def rois(self, slide_id: str) -> anndata.AnnData:
        """The ROIs of one slide as an AnnData (``OUT/<slide>/rois.h5ad``), ready for :func:`msfm.pl.slide_heatmap`."""
        import anndata

        path = self.out / str(slide_id) / "rois.h5ad"
        if not path.is_file():
            done = list(self.table["slide_id"]) if "slide_id" in self.table else []
            msg = f"No rois.h5ad for slide {slide_id!r} under {self.out}; the slides drawn are {done}."
            raise MsfmInputError(msg)
        return anndata.read_h5ad(path)


def _split_slides(slides: str | list[str] | None) -> list[str]:
    out: list[str] = []
    for item in [slides] if isinstance(slides, str | os.PathLike) else slides or []:
        item = os.fspath(item)
        out.extend(s.strip() for s in item.split(",") if s.strip())
    return out


def _attr(attrs: dict[str, Any], key: str) -> Any:
    value = attrs.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _find_slide_image(
    slide_id: str, given: Path | None, attrs: dict[str, Any], slide_dir: Path | None
) -> Path:
    """The slide file: given on the command line, recorded in the feature file, or found in --slide-dir."""
    if given is not None:
        return given
    recorded = _attr(attrs, "slide_path")
    candidates: list[Path] = []
    if recorded:
        rec = Path(str(recorded))
        if slide_dir is not None:
            candidates.append(slide_dir / rec.name)
        candidates.append(rec)
    if slide_dir is not None:
        candidates.extend(
            sorted(p for p in slide_dir.glob(f"{slide_id}.*") if p.suffix.lower() in _SLIDE_SUFFIXES)
        )
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates) or "nothing (the feature file records no slide_path)"
    msg = (
        f"Cannot find the slide image of {slide_id!r} (tried {tried}). Pass the slide file itself in --slides, or "
        "--slide-dir with the folder that holds the slides."
    )
    raise MsfmInputError(msg)


def _scores_csv(coords: np.ndarray, scores: np.ndarray, percentiles: np.ndarray) -> str:
    order = np.argsort(-scores, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(1, len(order) + 1)
    df = pd.DataFrame(
        {
            "roi": np.arange(len(scores)),
            "x": coords[:, 0],
            "y": coords[:, 1],
            "score": scores,
            "percentile": percentiles,
            "rank": rank,
        }
    )
    return df.to_csv(index=False, float_format="%.8g")


def rois_anndata(
    slide_id: str,
    coords: np.ndarray,
    roi_size_level0: int,
    scores: np.ndarray,
    percentiles: np.ndarray,
    thumbnail: np.ndarray,
    downsample: float,
    meta: dict[str, Any],
) -> anndata.AnnData:
    """One observation per ROI in the scverse spatial layout (see :mod:`msfm.pl.slide_heatmap`).

    ``obsm["spatial"]`` holds ROI centres in level-0 pixels (as scanpy expects spots); ``obs`` holds ``x``/``y``
    (top-left corners, as ``scores.csv``), ``score``, ``percentile`` and ``rank``.

    Shape:
        coords: ``[K, 2]``; scores, percentiles: ``[K]``; thumbnail: ``[h, w, 3]`` uint8.
    """
    import anndata

    from msfm.runtime.jsonable import to_uns

    c = np.asarray(coords, dtype=np.int64)
    order = np.argsort(-np.asarray(scores), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    obs = pd.DataFrame(
        {
            "x": c[:, 0],
            "y": c[:, 1],
            "score": np.asarray(scores, dtype=np.float64),
            "percentile": np.asarray(percentiles, dtype=np.float64),
            "rank": rank,
        },
        index=[f"roi{i}" for i in range(len(c))],
    )
    adata = anndata.AnnData(obs=obs)
    adata.obsm["spatial"] = (c + roi_size_level0 / 2.0).astype(np.float64)
    adata.uns["spatial"] = {
        slide_id: {
            "images": {"hires": np.ascontiguousarray(thumbnail[..., :3], dtype=np.uint8)},
            "scalefactors": {
                "tissue_hires_scalef": 1.0 / float(downsample),
                "roi_size_level0": int(roi_size_level0),
                "spot_diameter_fullres": float(roi_size_level0),
            },
        }
    }
    adata.uns["roam_heatmap"] = to_uns(meta)
    return adata


def heatmap(
    data: str | os.PathLike[str],
    checkpoint: Any,
    *,
    out: str | os.PathLike[str],
    slides: str | list[str] | None = None,
    class_name: str | None = None,
    top_k: int = 10,
    bottom_k: int = 5,
    roi_maps: int = 3,
    method: str = "grad_rollout",
    row_normalisation: bool = False,
    colour_by: str = "percentile",
    slide_dir: str | os.PathLike[str] | None = None,
    thumbnail_size: int = 1000,
    alpha: float = 0.4,
    blur: bool = True,
    roi_px: int = 512,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> HeatmapResult:
    """Attention heatmaps of slides: slide overlay, ROI gallery and ROI-level maps.

    Args:
        data: Feature folder (``msfm roam preprocess`` output, or its ``features/`` folder).
        checkpoint: A run directory or ``TrainResult`` (its folds are averaged), a checkpoint directory, a list of
            them, or a ``Loaded`` (see :func:`msfm.roam.load`).
        out: Output folder (one sub-folder per slide).
        slides: Slide ids, or slide files (their stem is the id and the file is drawn); comma-separated entries
            are split. Default: every feature file.
        class_name: Class to show (name or index); default: the ensemble's predicted class.
        top_k: ROIs in the top row of the gallery.
        bottom_k: ROIs in the bottom row (0: none).
        roi_maps: ROI-level maps for this many top ROIs.
        method: ``grad_rollout`` | ``grad_cam`` | ``rollout``.
        row_normalisation: Rollout with true row normalisation instead of the released column-sum quirk.
        colour_by: ``percentile`` (as released: rank within the slide, 0-100) or ``score`` (the raw attention,
            softmax over ROIs). The figure states the raw range either way.
        slide_dir: Folder of the slide files when the recorded ``slide_path`` moved.
        thumbnail_size: Longest side of the slide thumbnail drawn in ``heatmap.png`` and stored in ``rois.h5ad``.
        alpha: Opacity of the heatmap colours.
        blur: Smooth the slide heatmap.
        roi_px: Pixels per side of the ROI images in the gallery and ROI maps.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``.
        overwrite: Replace existing slide output folders (otherwise they are refused before any model loads).
        progress: Show a progress bar over the slides.

    Returns:
        The result: ``table`` with one row per slide (``slide_id``, ``class_shown``, ``predicted_class``,
        ``out``) and ``out``.

    Raises:
        MsfmInputError: Bad options, missing feature files or slide images, existing outputs.
    """
    out, features = Path(out), Path(data)
    slide_dir = Path(slide_dir) if slide_dir is not None else None

    if method not in METHODS:
        msg = f"--method {method!r} is not supported; use one of {', '.join(METHODS)}."
        raise MsfmInputError(msg)
    if colour_by not in ("percentile", "score"):
        msg = f"--colour-by {colour_by!r} is not supported; use 'percentile' or 'score'."
        raise MsfmInputError(msg)
    if top_k < 1 or bottom_k < 0 or roi_maps < 0 or roi_px < 8 or thumbnail_size < 16:
        msg = (
            f"need --top-k >= 1, --bottom-k >= 0, --roi-maps >= 0, --roi-px >= 8 and --thumbnail-size >= 16; got "
            f"{top_k}, {bottom_k}, {roi_maps}, {roi_px}, {thumbnail_size}."
        )
        raise MsfmInputError(msg)
    if out.exists() and not out.is_dir():
        msg = f"--out {out} is a file; pass a folder (one sub-folder per slide is written there)."
        raise MsfmInputError(msg)
    if slide_dir is not None and not slide_dir.is_dir():
        msg = f"--slide-dir {slide_dir} is not a folder."
        raise MsfmInputError(msg)

    # Which slides, and which image file each one is drawn on (a slide file given directly wins).
    entries = _split_slides(slides)
    given: dict[str, Path] = {}
    ids: list[str] = []
    for e in entries:
        p = Path(e)
        if p.suffix.lower() in _SLIDE_SUFFIXES and p.is_file():
            ids.append(p.stem)
            given[p.stem] = p
        else:
            ids.append(e)
    if not ids:
        ids = list_feature_slides(features)
    # Each id names a folder under --out that may be replaced: refuse ids that leave it.
    ids = check_slide_ids(ids, "--slides")
    if len(set(ids)) != len(ids):
        msg = f"--slides lists a slide twice: {sorted({i for i in ids if ids.count(i) > 1})}."
        raise MsfmInputError(msg)
    paths, _ = resolve_feature_files(ids, features)
    # Refuse existing outputs before loading anything.
    for sid in ids:
        check_output_free(out / sid, overwrite=overwrite)

    ens = ensemble_for(checkpoint, device=resolve_device(device))
    names = list(ens.class_names)
    chosen: int | None = None
    if class_name is not None:
        if class_name in names:
            chosen = names.index(class_name)
        elif class_name.isdigit() and int(class_name) < len(names):
            chosen = int(class_name)
        else:
            msg = f"--class {class_name!r} is not a class of the model; its classes are {names}."
            raise MsfmInputError(msg)
    store = FeatureStore(
        paths, encoder=ens.encoder, feature_dim=ens.feature_dim, geometry=training_geometry(ens.metas)
    )
    out.mkdir(parents=True, exist_ok=True)
    official = not row_normalisation
    done: list[dict[str, Any]] = []

    for sid in progress_iter(ids, "roam heatmap", enabled=progress, unit="slide"):
        sf = store.read(sid)
        attrs = dict(getattr(sf, "attrs", {}) or {})
        coords = np.asarray(sf.coords, dtype=np.int64)
        size0 = _attr(attrs, "roi_size_level0")
        if size0 is None:
            msg = (
                f"Feature file of {sid!r} has no 'roi_size_level0' attribute; re-run `msfm roam preprocess`."
            )
            raise MsfmInputError(msg)
        size0 = int(size0)
        image_path = _find_slide_image(sid, given.get(sid), attrs, slide_dir)
        att = slide_attention_scores(ens.models, sf, class_index=chosen)
        shown = names[att.class_index]
        predicted = names[att.predicted_index]
        probabilities = {n: float(p) for n, p in zip(names, att.probabilities)}
        with atomic_dir(out / sid) as tmp, open_slide(image_path) as slide:
            thumb, ds = slide.thumbnail(int(thumbnail_size))
            rois = rois_anndata(
                sid,
                coords,
                size0,
                att.scores,
                att.percentiles,
                thumb,
                ds,
                {
                    "slide_id": sid,
                    "class_shown": shown,
                    "predicted_class": predicted,
                    "probabilities": probabilities,
                    "n_models": att.n_models,
                    "colour_by": colour_by,
                },
            )
            write_h5ad_atomic(rois, tmp / "rois.h5ad", compression="gzip")
            slide_heatmap_figure(rois, colour_by, alpha=alpha, blur=blur, save=tmp / "heatmap.png")
            top_roi_gallery(
                slide,
                coords,
                size0,
                att.scores,
                k=min(top_k, len(coords)),
                bottom_k=min(bottom_k, len(coords)),
                tile_px=min(roi_px, 256),
                title=f"{sid}: attention for {shown} (predicted {predicted})",
                save=tmp / "gallery.png",
            )
            atomic_write_text(tmp / "scores.csv", _scores_csv(coords, att.scores, att.percentiles))
            feats = np.asarray(sf.features)
            top = np.argsort(-att.scores, kind="stable")[: min(roi_maps, len(coords))]
            if len(top):
                (tmp / "roi_maps").mkdir()
            weights = ens.config.scale_weights
            for i in top:
                per_model = [
                    roi_attention_maps(
                        m, feats[i], category=att.class_index, method=method, official_normalisation=official
                    )
                    for m in ens.models
                ]
                # Fold models are averaged scale by scale (the release draws one model's maps).
                maps = {
                    s: np.mean([pm[s] for pm in per_model], axis=0).astype(np.float32) for s in per_model[0]
                }
                img = roi_image(slide, int(coords[i, 0]), int(coords[i, 1]), size0, roi_px)
                fused = roi_heatmap(maps, img.shape[:2], weights)
                roi_maps_figure(
                    img,
                    maps,
                    fused,
                    title=f"{sid} ROI {int(i)} ({method}, {shown}): score {att.scores[i]:.3g}",
                    save=tmp / "roi_maps" / f"roi{int(i)}.png",
                )
                np.savez(tmp / "roi_maps" / f"roi{int(i)}.npz", **maps)
            atomic_write_json(
                tmp / "summary.json",
                {
                    "slide_id": sid,
                    "slide_path": str(image_path),
                    "class_shown": shown,
                    "class_index": att.class_index,
                    "predicted_class": predicted,
                    "probabilities": probabilities,
                    "n_rois": len(coords),
                    "n_models": att.n_models,
                    "checkpoints": [str(s) for s in ens.sources],
                    "method": method,
                    "official_normalisation": official,
                    "colour_by": colour_by,
                    "roi_maps": [int(i) for i in top],
                },
            )
        done.append({"slide_id": sid, "class_shown": shown, "predicted_class": predicted, "out": out / sid})
        logger.info("%s: %s (predicted %s) -> %s", sid, shown, predicted, out / sid)
    logger.info("wrote heatmaps of %d slides to %s", len(ids), out)
    columns = ["slide_id", "class_shown", "predicted_class", "out"]
    return HeatmapResult(pd.DataFrame(done, columns=columns), out)
