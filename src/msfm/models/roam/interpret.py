"""Interpretation of ROAM: ROI-level attention maps (inside one ROI) and slide-level attention heatmaps.

**ROI level.** For one ROI (84 patch features) given to the model as a one-ROI bag, the target is the raw
gated-attention score of a class (``out.attention[0, 0, c]``, *not* the slide logit), as in the release. Its
gradient is taken with respect to the pre-softmax attention scores of every intra-scale layer (what the
release's deprecated ``register_backward_hook`` on ``nn.Softmax`` returned), and per scale:

* ``grad_rollout`` (default): per layer ``f = mean_heads(clamp(attn * grad, min=0))``, optional discarding of the
  weakest entries, ``a = (f + I) / 2``, normalisation, ``R = a_L ... a_1`` and the map ``R[CLS, patches]`` divided
  by its maximum. The release normalises with a broadcasting quirk inherited from *vit-explain*:
  ``a[i, j] / sum_k a[j, k]`` (the sum of row *j*, not of row *i*). ``official_normalisation=True`` (default)
  reproduces it, so the maps match the released figures; ``False`` gives true row normalisation (the corrected
  variant; up to ~6e-3 different on the fixture maps).
* ``grad_cam``: the last layer only, ``clamp(mean_heads(grad[CLS, patches] * attn[CLS, patches]), min=0)``
  (mean first, then clamp, as released), min-max normalised.
* ``rollout``: plain attention rollout (mean over heads, no gradients), an extra the release ships but does not
  use; it uses the same normalisation switch.

The three maps (8x8 at 20x, 4x4 at 10x, 2x2 at 5x) are fused over the ROI by :func:`roi_heatmap`.

**Slide level** (after CLAM's ``create_heatmaps``): raw attention scores averaged over the fold models, softmaxed
over ROIs, the column of the ensemble-predicted class (or a chosen one), optionally turned into percentiles
against reference scores; drawn over a slide thumbnail (:func:`slide_heatmap`) with a gallery of the top/bottom
ROIs (:func:`top_roi_gallery`).

The ROAM code is GPL-3.0; this module is written from the description of the method, not from that code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from msfm.errors import MsfmInputError
from msfm.models.roam.config import SCALES, TOKENS_PER_ROI
from msfm.models.roam.model import Roam
from msfm.pl.maps import map_size, resize_map

__all__ = [
    "METHODS",
    "SCALE_GRIDS",
    "SlideAttention",
    "resize_map",
    "roi_attention_maps",
    "roi_heatmap",
    "roi_image",
    "score_percentiles",
    "slide_attention_scores",
    "slide_heatmap",
    "top_roi_gallery",
]

Method = Literal["grad_rollout", "grad_cam", "rollout"]
METHODS: tuple[str, ...] = ("grad_rollout", "grad_cam", "rollout")
# Scale name -> side of its patch grid (20x: 8x8 tokens 0..63, 10x: 4x4 tokens 64..79, 5x: 2x2 tokens 80..83).
SCALE_GRIDS: dict[str, int] = {name: w for name, _, w in SCALES}
PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------------------------------------- ROI level
def _as_roi_tensor(roi_features: Tensor | np.ndarray, model: Roam) -> Tensor:
    x = torch.as_tensor(np.asarray(roi_features) if not isinstance(roi_features, Tensor) else roi_features)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    d_in = model.config.d_in
    if x.ndim != 2 or x.shape[0] < TOKENS_PER_ROI or x.shape[1] != d_in:
        msg = (
            f"roi_attention_maps expects the features of ONE ROI, shape [84, {d_in}] (85 tokens are cut to 84); "
            f"got {tuple(x.shape)}. Pass slide_features.features[i] for ROI i."
        )
        raise MsfmInputError(msg)
    param = next(model.parameters())
    return x[:TOKENS_PER_ROI].to(device=param.device, dtype=param.dtype)


def _discard(f: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ``ratio`` fraction of the entries of ``f`` (never the CLS->CLS entry at flat index 0)."""
    if ratio <= 0.0:
        return f
    flat = f.flatten().clone()
    n = int(flat.numel() * ratio)
    n = min(n, flat.numel() - 1)
    if n > 0:
        idx = torch.topk(flat[1:], n, largest=False).indices + 1
        flat[idx] = 0.0
    return flat.view_as(f)


def _rollout(fused: Sequence[Tensor], discard_ratio: float, official: bool) -> np.ndarray:
    """Roll ``(f + I) / 2`` through the layers (forward order) and return the max-normalised CLS row map."""
    n = fused[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    result = eye.clone()
    for f in fused:
        a = (_discard(f.double(), discard_ratio) + eye) / 2.0
        rows = a.sum(dim=-1)
        # official: a[i, j] / rows[j] (the released broadcasting quirk); corrected: a[i, j] / rows[i].
        a = a / rows[None, :] if official else a / rows[:, None]
        result = a @ result
    mask = result[0, 1:]
    w = math.isqrt(mask.numel())
    peak = mask.max()
    mask = mask / peak if peak > 0 else torch.zeros_like(mask)
    return mask.reshape(w, w).float().numpy()


def _grad_cam(attn: Tensor, grad: Tensor) -> np.ndarray:
    m = (grad[:, 0, 1:] * attn[:, 0, 1:]).mean(dim=0).clamp(min=0).double()
    w = math.isqrt(m.numel())
    lo, hi = m.min(), m.max()
    # A constant map (e.g. all gradients negative) carries no information: return zeros instead of 0/0.
    m = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    return m.reshape(w, w).float().numpy()


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def roi_attention_maps(
    model: Roam,
    roi_features: Tensor | np.ndarray,
    *,
    category: int,
    method: Method = "grad_rollout",
    discard_ratio: float = 0.0,
    official_normalisation: bool = True,
) -> dict[str, np.ndarray]:
    """Attention maps inside one ROI, one per scale, for one class (the released ROI-level interpretation).

    The ROI is given to the model as a one-ROI bag in eval mode. For the gradient methods the backward pass is
    taken with respect to the input only (``torch.autograd.grad``), so the parameters' ``.grad`` stay untouched.

    Args:
        model: A ROAM model (its train/eval mode is restored afterwards).
        roi_features: Patch features of one ROI.
        category: Class whose raw gated-attention score is explained.
        method: ``"grad_rollout"`` (released default), ``"grad_cam"`` or ``"rollout"`` (no gradients).
        discard_ratio: Fraction of the weakest fused-attention entries set to 0 in each layer (released config: 0;
            the CLS->CLS entry is never discarded). Rollout methods only.
        official_normalisation: Reproduce the released column-sum normalisation (True) or use true row
            normalisation (False). Rollout methods only.

    Returns:
        ``{"20x": [8, 8], "10x": [4, 4], "5x": [2, 2]}`` float32 maps in [0, 1], row-major like the token grid.

    Shape:
        roi_features: ``[84, d_in]`` (or ``[1, 84, d_in]``; extra tokens beyond 84 are ignored).
    """
    if method not in METHODS:
        msg = f"method={method!r} is not supported; use one of {', '.join(METHODS)}."
        raise MsfmInputError(msg)
    n_classes = model.config.n_classes
    if not isinstance(category, int | np.integer) or not 0 <= int(category) < n_classes:
        msg = f"category={category!r} must be a class index in 0..{n_classes - 1}."
        raise MsfmInputError(msg)
    if not 0.0 <= discard_ratio < 1.0:
        msg = f"discard_ratio must be in [0, 1); got {discard_ratio}."
        raise MsfmInputError(msg)
    x = _as_roi_tensor(roi_features, model).unsqueeze(0)  # [1, 84, d]: one ROI
    with _eval_mode(model), model.pyramid.record_attention() as layers:
        if method == "rollout":
            with torch.no_grad():
                model(x.unsqueeze(0))
        else:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                target = model(x.unsqueeze(0)).attention[0, 0, int(category)]
                torch.autograd.grad(target, x)
        maps: dict[str, np.ndarray] = {}
        for scale, mods in layers.items():
            attns = [m.attn[0] for m in mods]  # each [heads, T, T]
            if method == "rollout":
                fused = [a.mean(dim=0) for a in attns]
                maps[scale] = _rollout(fused, discard_ratio, official_normalisation)
                continue
            grads = [m.score_grad[0] if m.score_grad is not None else None for m in mods]
            if any(g is None for g in grads):
                msg = (
                    f"No attention gradient was recorded for the {scale} layers; the model graph is detached."
                )
                raise RuntimeError(msg)
            if method == "grad_cam":
                maps[scale] = _grad_cam(attns[-1], grads[-1])
            else:
                fused = [(a * g).clamp(min=0).mean(dim=0) for a, g in zip(attns, grads)]
                maps[scale] = _rollout(fused, discard_ratio, official_normalisation)
    return maps


def _scale_weights(weights: Mapping[str, float] | Sequence[float] | None) -> dict[str, float]:
    if weights is None:
        return {s: 1.0 / 3.0 for s in SCALE_GRIDS}
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(SCALE_GRIDS)
        if unknown:
            msg = f"scale weights have unknown scales {sorted(unknown)}; expected keys among {list(SCALE_GRIDS)}."
            raise MsfmInputError(msg)
        return {s: float(weights.get(s, 0.0)) for s in SCALE_GRIDS}
    w = [float(v) for v in weights]
    if len(w) != 3:
        msg = f"scale weights must be 3 numbers in the config order (w5x, w10x, w20x); got {len(w)}."
        raise MsfmInputError(msg)
    return {"5x": w[0], "10x": w[1], "20x": w[2]}


def roi_heatmap(
    maps: Mapping[str, np.ndarray],
    roi_size: int | tuple[int, int],
    weights: Mapping[str, float] | Sequence[float] | None = None,
) -> np.ndarray:
    """Fuse the per-scale maps over the ROI: ``sum_s w_s * resize(map_s)``.

    Each weight goes with its own scale (``w20`` with the 20x map, ...). The release lists the maps as
    (20, 10, 5) but the weights as ``embed_weights = (w5, w10, w20)`` and zips them, so ``w5`` multiplies the
    20x map; that only matters with unequal weights (the released weights are all 0.3333). We pair them
    correctly.

    Args:
        maps: Output of :func:`roi_attention_maps` (any subset of the scales).
        roi_size: Output size in pixels (``H`` or ``(H, W)``).
        weights: ``{"20x": w20, "10x": w10, "5x": w5}``, or 3 numbers in the config order ``(w5, w10, w20)``
            (``model.config.scale_weights``); default 1/3 each.

    Returns:
        float32 map; values in ``[0, sum of weights]`` when the inputs are in [0, 1].

    Shape:
        ``[H, W]``.
    """
    if not maps:
        msg = "roi_heatmap got no maps; pass the dict returned by roi_attention_maps."
        raise MsfmInputError(msg)
    w = _scale_weights(weights)
    h, wd = map_size(roi_size)
    out = np.zeros((h, wd), dtype=np.float32)
    for scale, m in maps.items():
        if scale not in SCALE_GRIDS:
            msg = f"unknown scale {scale!r} in maps; expected {list(SCALE_GRIDS)}."
            raise MsfmInputError(msg)
        out += np.float32(w[scale]) * resize_map(m, (h, wd))
    return out


# ----------------------------------------------------------------------------------------------- slide level
@dataclass
class SlideAttention:
    """Slide-level attention of one slide (fold-averaged).

    Attributes:
        scores: Softmax over ROIs of the chosen class's fold-averaged raw attention; sums to 1. ``[K]``
        percentiles: Percentile (0..100) of each score among the reference scores (the slide's own scores when
            no reference was given). ``[K]``
        class_index: The class shown (the ensemble prediction unless one was chosen).
        class_name: Its name when the model config has class names.
        probabilities: Ensemble slide probabilities (mean over models of the softmax of the logits). ``[C]``
        predicted_index: Argmax of ``probabilities``.
        weights: Softmax over ROIs for every class. ``[C, K]``
        attention_logits: Fold-reduced raw gated-attention scores. ``[K, C]``
        n_models: Number of models averaged.
    """

    scores: np.ndarray
    percentiles: np.ndarray
    class_index: int
    class_name: str | None
    probabilities: np.ndarray
    predicted_index: int
    weights: np.ndarray
    attention_logits: np.ndarray
    n_models: int


def score_percentiles(scores: np.ndarray, ref_scores: np.ndarray | None = None) -> np.ndarray:
    """Percentile (0..100) of each score among ``ref_scores`` (CLAM's ``score2percentile``, ``kind="rank"``).

    CLAM's ``use_ref_scores`` compares the scores of overlapping heatmap patches with those of the
    non-overlapping grid; without a reference the scores are ranked among themselves.

    Shape:
        scores: ``[K]``; ref_scores: ``[M]`` -> ``[K]`` float64.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ref = s if ref_scores is None else np.asarray(ref_scores, dtype=np.float64).reshape(-1)
    if ref.size == 0:
        msg = "score_percentiles needs at least one reference score."
        raise MsfmInputError(msg)
    ref = np.sort(ref)
    below = np.searchsorted(ref, s, side="left")  # strictly smaller
    upto = np.searchsorted(ref, s, side="right")  # smaller or equal
    # scipy.stats.percentileofscore(kind="rank"): mean rank of the ties, written with counts (no scipy import).
    return (below + upto + (upto > below)) * (50.0 / ref.size)


def _features_tensor(slide_features: Any, d_in: int) -> Tensor:
    feats = getattr(slide_features, "features", slide_features)
    x = feats if isinstance(feats, Tensor) else torch.as_tensor(np.asarray(feats))
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < TOKENS_PER_ROI or x.shape[2] != d_in:
        msg = (
            f"slide features must have shape [K, 84, {d_in}] (K >= 1 ROIs); got {tuple(x.shape)}. Check that "
            f"the feature file comes from an encoder with {d_in}-d output."
        )
        raise MsfmInputError(msg)
    return x.float()


def _resolve_class(class_index: int | str | None, names: Sequence[str] | None, n_classes: int) -> int | None:
    if class_index is None:
        return None
    if isinstance(class_index, str):
        if names and class_index in names:
            return list(names).index(class_index)
        if class_index.lstrip("-").isdigit():
            class_index = int(class_index)
        else:
            msg = f"class {class_index!r} is not a class of the model; its classes are {list(names or [])}."
            raise MsfmInputError(msg)
    idx = int(class_index)
    if not 0 <= idx < n_classes:
        msg = f"class index {idx} is out of range; the model has {n_classes} classes (0..{n_classes - 1})."
        raise MsfmInputError(msg)
    return idx


def slide_attention_scores(
    models: Roam | Sequence[Roam],
    slide_features: Any,
    *,
    class_index: int | str | None = None,
    reduce: Literal["mean", "median"] = "mean",
    ref_scores: np.ndarray | None = None,
    roi_chunk: int | None = 64,
) -> SlideAttention:
    """Per-ROI attention scores of a slide, averaged over fold models (the released slide heatmap scores).

    The raw gated-attention scores of every model are reduced over models (``reduce``), softmaxed over the ROIs
    per class, and the column of ``class_index`` is returned; by default the class predicted by the ensemble
    (mean of the models' softmax probabilities).

    Args:
        models: One model, the fold models (same config) or a ``RoamEnsemble``.
        slide_features: A :class:`~msfm.models.roam.features.SlideFeatures` or its features array/tensor.
        class_index: Class to show (index or class name); None = the ensemble prediction.
        reduce: How the raw scores are combined over models.
        ref_scores: Reference scores for the percentiles (CLAM ``use_ref_scores``); None ranks the scores
            among themselves.
        roi_chunk: Encode at most this many ROIs at once.

    Shape:
        slide features ``[K, 84, d_in]``; see :class:`SlideAttention` for the outputs.
    """
    # One model, a list of fold models, or a RoamEnsemble (its ``models``).
    ms = [models] if isinstance(models, Roam) else list(getattr(models, "models", models))
    if not ms:
        msg = "slide_attention_scores needs at least one model."
        raise MsfmInputError(msg)
    if reduce not in ("mean", "median"):
        msg = f"reduce={reduce!r} is not supported; use 'mean' or 'median'."
        raise MsfmInputError(msg)
    cfg = ms[0].config
    for m in ms[1:]:
        if (m.config.d_in, m.config.n_classes) != (cfg.d_in, cfg.n_classes):
            msg = "all fold models must share d_in and n_classes to be averaged."
            raise MsfmInputError(msg)
    x = _features_tensor(slide_features, cfg.d_in)
    raw, probs = [], []
    for m in ms:
        param = next(m.parameters())
        with _eval_mode(m), torch.no_grad():
            out = m(x.to(device=param.device, dtype=param.dtype).unsqueeze(0), roi_chunk=roi_chunk)
        raw.append(out.attention[0].double().cpu())  # [K, C]
        probs.append(out.logits[0].double().softmax(-1).cpu())
    stacked = torch.stack(raw)
    logits = stacked.mean(0) if reduce == "mean" else stacked.median(0).values
    weights = logits.T.softmax(dim=-1)  # [C, K]: softmax over ROIs
    p = torch.stack(probs).mean(0)
    predicted = int(p.argmax())
    chosen = _resolve_class(class_index, cfg.class_names, cfg.n_classes)
    c = predicted if chosen is None else chosen
    scores = weights[c].numpy()
    return SlideAttention(
        scores=scores,
        percentiles=score_percentiles(scores, ref_scores),
        class_index=c,
        class_name=cfg.class_names[c] if cfg.class_names else None,
        probabilities=p.numpy(),
        predicted_index=predicted,
        weights=weights.numpy(),
        attention_logits=logits.numpy(),
        n_models=len(ms),
    )


# ------------------------------------------------------------------------------------------- slide images
class _ArraySlide:
    """An in-memory RGB image used as a one-level slide (tests, small images)."""

    def __init__(self, image: np.ndarray) -> None:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
            msg = f"an image used as a slide must be uint8 [h, w, 3]; got dtype {img.dtype} and shape {img.shape}."
            raise MsfmInputError(msg)
        self.image = img[..., :3]
        self.dimensions = (img.shape[1], img.shape[0])

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        from PIL import Image

        w, h = self.dimensions
        ds = max(1.0, max(w, h) / max_size)
        size = (max(1, round(w / ds)), max(1, round(h / ds)))
        if size == (w, h):
            return self.image.copy(), 1.0
        return np.asarray(Image.fromarray(self.image).resize(size, Image.Resampling.BOX)), ds

    def region(self, x: int, y: int, size0: int) -> np.ndarray:
        out = np.full((size0, size0, 3), 255, np.uint8)
        w, h = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size0, w), min(y + size0, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.image[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        return None


@contextmanager
def _open(slide: Any) -> Iterator[Any]:
    """A slide-like object: an msfm ``Slide`` (kept open), a path (opened and closed here) or an image array."""
    if isinstance(slide, str | os.PathLike):
        from msfm.data.slides import open_slide

        s = open_slide(Path(slide))
        try:
            yield s
        finally:
            s.close()
        return
    if isinstance(slide, np.ndarray):
        yield _ArraySlide(slide)
        return
    if hasattr(slide, "convert") and hasattr(slide, "size"):  # a PIL image
        yield _ArraySlide(np.asarray(slide.convert("RGB")))
        return
    if hasattr(slide, "read_region") and hasattr(slide, "thumbnail"):
        yield slide
        return
    msg = f"expected a slide path, an msfm Slide or an RGB image array; got {type(slide).__name__}."
    raise MsfmInputError(msg)


def _read_lowres(src: Any, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
    """A square level-0 region ``(x, y, size0)`` read from the coarsest adequate level, resized to ``out_px``."""
    from PIL import Image

    if isinstance(src, _ArraySlide):
        region = src.region(x, y, size0)
    else:
        ds_wanted = size0 / out_px
        level = src.best_level_for_downsample(ds_wanted)
        ds = float(src.level_downsamples[level])
        n = max(1, math.ceil(size0 / ds))
        region = src.read_region((int(x), int(y)), level, (n, n))
    if region.shape[0] == out_px and region.shape[1] == out_px:
        return region
    resample = Image.Resampling.BOX if region.shape[0] > out_px else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(region).resize((out_px, out_px), resample))


def roi_image(slide: Any, x: int, y: int, roi_size_level0: int, out_px: int = 512) -> np.ndarray:
    """One ROI read from a slide (path, msfm ``Slide`` or level-0 image array) at ``out_px`` pixels a side.

    Shape:
        returns ``[out_px, out_px, 3]`` uint8.
    """
    with _open(slide) as src:
        return _read_lowres(src, int(x), int(y), int(roi_size_level0), int(out_px))


def _check_coords(
    coords: np.ndarray, scores: np.ndarray, roi_size_level0: int
) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(coords, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        msg = f"coords must be [K, 2] level-0 (x, y) top-left corners; got shape {c.shape}."
        raise MsfmInputError(msg)
    if s.shape[-1] != c.shape[0]:
        msg = f"scores ({s.shape}) must have one value per ROI ({c.shape[0]} coords) in the last dimension."
        raise MsfmInputError(msg)
    if int(roi_size_level0) < 1:
        msg = f"roi_size_level0 must be a positive number of level-0 pixels; got {roi_size_level0}."
        raise MsfmInputError(msg)
    return c, s


def slide_heatmap(
    slide: Any,
    coords: np.ndarray,
    roi_size_level0: int,
    scores: np.ndarray,
    *,
    thumbnail_size: int = 2000,
    cmap: str = "jet",
    alpha: float = 0.4,
    blur: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    save: PathLike | None = None,
) -> np.ndarray:
    """Draw per-ROI scores over a slide thumbnail (CLAM-style ``drawHeatmap``).

    Each ROI's square is filled with its score; overlapping ROIs are averaged. With ``blur`` the score field is
    smoothed by a normalised Gaussian (sigma = a quarter of the ROI side), so edges between ROIs soften but the
    values do not fade toward uncovered tissue. Only pixels covered by an ROI are coloured.

    Args:
        slide: Slide path, open msfm ``Slide`` or a level-0 RGB image array.
        coords: Level-0 ``(x, y)`` top-left corners of the ROIs (feature-file ``coords``).
        roi_size_level0: ROI side in level-0 pixels (feature-file attrs ``roi_size_level0``).
        scores: One score per ROI (attention scores or percentiles).
        thumbnail_size: Longest side of the drawing in pixels (CLAM ``max_size``).
        cmap: Colour map (``jet`` as released).
        alpha: Opacity of the colours (0.4 as released).
        blur: Smooth the score field.
        vmin: Score at the bottom of the colour map (default: the minimum score).
        vmax: Score at the top (default: the maximum score).
        save: Write the overlay as a PNG here (atomically).

    Returns:
        The RGB overlay.

    Shape:
        coords: ``[K, 2]``; scores: ``[K]`` -> ``[h, w, 3]`` uint8 (longest side ``<= thumbnail_size``).
    """
    from msfm.pl.slide_heatmap import rasterize_rois, smooth_field
    from msfm.pl.slides import overlay_heatmap, save_png

    c, s = _check_coords(coords, scores, roi_size_level0)
    if s.ndim != 1:
        msg = f"slide_heatmap needs one score per ROI ([K]); got shape {s.shape}. Pick one class's column."
        raise MsfmInputError(msg)
    with _open(slide) as src:
        thumb, ds = src.thumbnail(int(thumbnail_size))
    side = float(roi_size_level0) / ds
    field, covered = rasterize_rois(thumb.shape[:2], c / ds, side, s)
    if blur and covered.any():
        field = smooth_field(field, covered, side)
    lo = float(s.min()) if vmin is None else float(vmin)
    hi = float(s.max()) if vmax is None else float(vmax)
    overlay = overlay_heatmap(thumb, field, mask=covered, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)
    if save is not None:
        save_png(overlay, save)
    return overlay


def top_roi_gallery(
    slide: Any,
    coords: np.ndarray,
    roi_size_level0: int,
    scores: np.ndarray,
    *,
    k: int = 10,
    bottom_k: int = 0,
    class_names: Sequence[str] | None = None,
    tile_px: int = 224,
    title: str = "",
    save: PathLike | None = None,
):
    """A grid of the ``k`` highest-scoring ROIs (and optionally the ``bottom_k`` lowest), read at low resolution.

    Args:
        slide: Slide path, open msfm ``Slide`` or a level-0 RGB image array.
        coords: Level-0 ``(x, y)`` top-left corners.
        roi_size_level0: ROI side in level-0 pixels.
        scores: ``[K]`` one row, or ``[C, K]`` (e.g. :attr:`SlideAttention.weights`): one row of top-k per class.
        k: ROIs per top row.
        bottom_k: ROIs in a "lowest" row per score row (0 = none).
        class_names: Row labels for ``[C, K]`` scores.
        tile_px: Side of each tile in pixels.
        title: Figure title.
        save: Write the PNG here (atomically).

    Returns:
        The matplotlib ``Figure``.

    Shape:
        coords: ``[K, 2]``; scores: ``[K]`` or ``[C, K]``.
    """
    from msfm.pl.slides import roi_gallery

    c, s = _check_coords(coords, scores, roi_size_level0)
    if s.ndim == 1:
        s = s[None]
        labels = [""]
    elif s.ndim == 2:
        labels = list(class_names) if class_names is not None else [f"class {i}" for i in range(s.shape[0])]
        if len(labels) != s.shape[0]:
            msg = f"class_names has {len(labels)} names for {s.shape[0]} score rows."
            raise MsfmInputError(msg)
    else:
        msg = f"scores must be [K] or [C, K]; got shape {s.shape}."
        raise MsfmInputError(msg)
    if k < 1 or bottom_k < 0:
        msg = f"k must be >= 1 and bottom_k >= 0; got k={k}, bottom_k={bottom_k}."
        raise MsfmInputError(msg)
    rows_img: list[list[np.ndarray]] = []
    rows_title: list[list[str]] = []
    row_labels: list[str] = []
    with _open(slide) as src:
        for label, row in zip(labels, s):
            order = np.argsort(-row, kind="stable")
            groups = [("top", order[:k])]
            if bottom_k:
                groups.append(("bottom", order[::-1][:bottom_k]))
            for kind, idx in groups:
                rows_img.append(
                    [_read_lowres(src, int(c[i, 0]), int(c[i, 1]), roi_size_level0, tile_px) for i in idx]
                )
                rows_title.append([f"ROI {int(i)}: {row[i]:.3g}" for i in idx])
                row_labels.append(f"{label} {kind}".strip())
    return roi_gallery(rows_img, rows_title, row_labels=row_labels, title=title, save=save)
