"""ROAM interpretation: ROI-level maps against the official masks, fusion, slide scores, heatmaps, galleries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from msfm.errors import MsfmInputError
from msfm.models.roam.config import RoamConfig
from msfm.models.roam.interpret import (
    roi_attention_maps,
    roi_heatmap,
    roi_image,
    score_percentiles,
    slide_attention_scores,
    slide_heatmap,
    top_roi_gallery,
)
from msfm.models.roam.model import Roam
from msfm.models.roam.official import load_official_checkpoint
from msfm.pl.maps import resize_map

FIX = Path(__file__).parents[2] / "fixtures" / "roam"
SCALES = {"20x": ("20", 8), "10x": ("10", 4), "5x": ("5", 2)}


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "tiny_official_io.safetensors")


@pytest.fixture(scope="module")
def model() -> Roam:
    return load_official_checkpoint(FIX / "tiny_official.pt")


# ----------------------------------------------------------------------------------------------- ROI level
@pytest.mark.parametrize("category", [0, 1])
@pytest.mark.parametrize(("method", "key"), [("grad_rollout", "rollout"), ("grad_cam", "gradcam")])
def test_roi_maps_match_official_masks(model, io, category: int, method: str, key: str) -> None:
    maps = roi_attention_maps(model, io["A_features"][0, 0], category=category, method=method)
    assert list(maps) == ["20x", "10x", "5x"]
    for scale, (s, w) in SCALES.items():
        assert maps[scale].shape == (w, w)
        assert maps[scale].dtype == np.float32
        np.testing.assert_allclose(
            maps[scale], io[f"A_roi0_{key}_cat{category}_mask{s}"].numpy(), atol=1e-4, rtol=0
        )
        assert maps[scale].max() == pytest.approx(1.0)
        assert maps[scale].min() >= 0.0


def test_recorded_attention_and_score_gradients_match_official_hooks(model, io) -> None:
    x = io["A_features"][0, 0].clone().requires_grad_(True)
    with model.pyramid.record_attention() as layers:
        target = model(x[None, None]).attention[0, 0, 0]
        torch.autograd.grad(target, x)
    for scale, (s, _) in SCALES.items():
        for layer, mod in enumerate(layers[scale]):
            torch.testing.assert_close(
                mod.attn, io[f"A_roi0_rollout_cat0_attn_{s}_l{layer}"], atol=1e-5, rtol=0
            )
            grad = io[f"A_roi0_rollout_cat0_hookgrad_{s}_l{layer}"]
            torch.testing.assert_close(mod.score_grad, grad, atol=1e-5, rtol=0)
            # The release multiplies with the gradient of the PRE-softmax scores, not of the attention weights.
            assert (io[f"A_roi0_rollout_cat0_dattn_{s}_l{layer}"] - grad).abs().max() > 1e-3


def test_row_normalisation_is_the_documented_correction(model, io) -> None:
    x = io["A_features"][0, 0]
    fixed = roi_attention_maps(model, x, category=0, official_normalisation=False)
    diffs = [
        np.abs(fixed[sc] - io[f"A_roi0_rollout_cat0_mask{s}"].numpy()).max() for sc, (s, _) in SCALES.items()
    ]
    # Different from the release by more than the test tolerance, but the same kind of map.
    assert max(diffs) > 1e-3
    assert max(diffs) < 0.05
    for m in fixed.values():
        assert m.max() == pytest.approx(1.0)


def test_plain_rollout_discard_and_no_side_effects(model, io) -> None:
    x = io["A_features"][0, 0].numpy()
    model.train()
    try:
        plain = roi_attention_maps(model, x, category=2, method="rollout")
        assert model.training  # mode restored
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())  # gradients never touch the parameters
    for scale, (_, w) in SCALES.items():
        assert plain[scale].shape == (w, w)
        assert np.all(plain[scale] > 0)  # (A + I)/2 rollout of a softmax is strictly positive
        assert plain[scale].max() == pytest.approx(1.0)
    # Independent of the class (no gradients), and dropout off despite train mode.
    again = roi_attention_maps(model, x, category=0, method="rollout")
    for scale in SCALES:
        np.testing.assert_array_equal(plain[scale], again[scale])
    base = roi_attention_maps(model, x, category=0)
    dropped = roi_attention_maps(model, x, category=0, discard_ratio=0.9)
    assert any(np.abs(base[s] - dropped[s]).max() > 1e-3 for s in SCALES)
    for m in dropped.values():
        assert np.isfinite(m).all()
        assert m.max() == pytest.approx(1.0)


def test_roi_maps_reject_bad_input(model, io) -> None:
    x = io["A_features"][0, 0]
    with pytest.raises(MsfmInputError, match="category"):
        roi_attention_maps(model, x, category=3)
    with pytest.raises(MsfmInputError, match="method"):
        roi_attention_maps(model, x, category=0, method="saliency")
    with pytest.raises(MsfmInputError, match="ONE ROI"):
        roi_attention_maps(model, io["A_features"][0], category=0)
    with pytest.raises(MsfmInputError, match="discard_ratio"):
        roi_attention_maps(model, x, category=0, discard_ratio=1.0)


def test_resize_map_is_bilinear_with_pixel_centres() -> None:
    m = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    up = resize_map(m, 4)
    # align_corners=False (cv2.resize INTER_LINEAR): edge pixels clamp, inner ones interpolate at 1/4 and 3/4.
    np.testing.assert_allclose(up, np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)), atol=1e-7)
    assert resize_map(np.full((8, 8), 0.3), (5, 7)).shape == (5, 7)
    np.testing.assert_allclose(resize_map(np.full((8, 8), 0.3), (5, 7)), 0.3, atol=1e-7)


def test_roi_heatmap_pairs_each_weight_with_its_scale() -> None:
    rng = np.random.default_rng(0)
    maps = {"20x": rng.random((8, 8)), "10x": rng.random((4, 4)), "5x": rng.random((2, 2))}
    ups = {s: resize_map(m, 32) for s, m in maps.items()}
    # Tuple weights follow the config order (w5, w10, w20).
    fused = roi_heatmap(maps, 32, (0.0, 0.0, 1.0))
    np.testing.assert_allclose(fused, ups["20x"], atol=1e-6)
    fused = roi_heatmap(maps, 32, {"5x": 2.0})
    np.testing.assert_allclose(fused, 2.0 * ups["5x"], atol=1e-6)
    fused = roi_heatmap(maps, (32, 48))
    assert fused.shape == (32, 48)
    eq = roi_heatmap(maps, 32)
    np.testing.assert_allclose(eq, sum(ups.values()) / 3.0, atol=1e-6)
    assert 0.0 <= eq.min() <= eq.max() <= 1.0
    with pytest.raises(MsfmInputError):
        roi_heatmap(maps, 32, (1.0, 2.0))
    with pytest.raises(MsfmInputError):
        roi_heatmap({"40x": np.ones((8, 8))}, 32)


# --------------------------------------------------------------------------------------------- slide level
def test_slide_scores_match_official_softmax(model, io) -> None:
    att = slide_attention_scores(model, io["C_features"])
    pred = int(io["C_slide_probs"].argmax())
    assert att.predicted_index == pred
    assert att.class_index == pred
    np.testing.assert_allclose(att.scores, io["C_attn_softmax"][pred].numpy(), atol=1e-5)
    np.testing.assert_allclose(att.weights, io["C_attn_softmax"].numpy(), atol=1e-5)
    np.testing.assert_allclose(att.probabilities, io["C_slide_probs"][0].numpy(), atol=1e-5)
    assert att.scores.sum() == pytest.approx(1.0)
    assert att.percentiles.shape == (20,)
    assert 0 < att.percentiles.min()
    assert att.percentiles.max() == 100.0
    # Percentiles follow the order of the scores.
    order = np.argsort(att.scores)
    assert np.all(np.diff(att.percentiles[order]) > 0)


def test_slide_scores_class_selection_and_fold_average(io) -> None:
    cfg = RoamConfig(
        d_in=64, dim=16, heads=2, dim_head=8, mlp_dim=32, depths=(1, 1, 1, 1, 1), class_names=("a", "b", "c")
    )
    torch.manual_seed(0)
    folds = [Roam(cfg).eval() for _ in range(2)]
    x = io["A_features"][0].numpy()
    by_name = slide_attention_scores(folds, x, class_index="c")
    by_index = slide_attention_scores(folds, x, class_index=2)
    assert by_name.class_index == 2
    assert by_name.class_name == "c"
    np.testing.assert_array_equal(by_name.scores, by_index.scores)
    with torch.no_grad():
        outs = [m(torch.as_tensor(x)[None]) for m in folds]
    raw = torch.stack([o.attention[0].double() for o in outs]).mean(0)
    np.testing.assert_allclose(by_name.scores, raw[:, 2].softmax(0).numpy(), atol=1e-7)
    probs = torch.stack([o.logits[0].double().softmax(-1) for o in outs]).mean(0)
    assert by_name.predicted_index == int(probs.argmax())
    assert by_name.n_models == 2
    for c in range(3):
        assert slide_attention_scores(folds, x, class_index=c).scores.sum() == pytest.approx(1.0)
    ref = slide_attention_scores(folds, x, class_index=0, ref_scores=np.array([0.0, 1.0]))
    np.testing.assert_allclose(ref.percentiles, 50.0)  # every score lies between the two references
    with pytest.raises(MsfmInputError, match="not a class"):
        slide_attention_scores(folds, x, class_index="zz")
    with pytest.raises(MsfmInputError, match="out of range"):
        slide_attention_scores(folds, x, class_index=5)
    with pytest.raises(MsfmInputError, match=r"\[K, 84, 64\]"):
        slide_attention_scores(folds, x[:, :, :10])


def test_score_percentiles_rank_kind() -> None:
    np.testing.assert_allclose(score_percentiles([1.0, 2.0, 3.0, 4.0]), [25.0, 50.0, 75.0, 100.0])
    np.testing.assert_allclose(score_percentiles([2.5], ref_scores=[1, 2, 3, 4]), [50.0])


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    img = np.full((300, 400, 3), 240, np.uint8)
    img[50:250, 40:360] = rng.integers(80, 200, size=(200, 320, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("slide") / "s1.png"
    Image.fromarray(img).save(path)
    return path


COORDS = np.array([[40, 50], [140, 50], [240, 50], [40, 150], [140, 150], [240, 150]])


def test_slide_heatmap_overlay(slide_png: Path, tmp_path: Path) -> None:
    base = np.asarray(Image.open(slide_png).convert("RGB"))
    scores = np.array([0.05, 0.1, 0.4, 0.15, 0.2, 0.1])
    out = slide_heatmap(
        slide_png, COORDS, 100, scores, thumbnail_size=200, blur=False, save=tmp_path / "h.png"
    )
    assert out.dtype == np.uint8
    assert out.shape == (150, 200, 3)
    saved = np.asarray(Image.open(tmp_path / "h.png"))
    np.testing.assert_array_equal(saved, out)
    thumb = np.asarray(Image.fromarray(base).resize((200, 150), Image.Resampling.BOX))
    # Outside every ROI the thumbnail is untouched; inside, colours are blended with alpha 0.4.
    np.testing.assert_array_equal(out[:20], thumb[:20])
    top = out[30:70, 125:165].astype(float)
    red = 0.6 * thumb[30:70, 125:165].astype(float) + 0.4 * np.array([127.5, 0, 0])  # jet(1) = dark red
    assert np.abs(top - red).max() <= 2.0
    blurred = slide_heatmap(np.asarray(base), COORDS, 100, scores, thumbnail_size=200)
    assert blurred.shape == out.shape
    np.testing.assert_array_equal(blurred[:20], thumb[:20])
    assert not np.array_equal(blurred, out)
    with pytest.raises(MsfmInputError, match="one value per ROI"):
        slide_heatmap(slide_png, COORDS, 100, scores[:3])


def test_gallery_and_roi_image(slide_png: Path, tmp_path: Path) -> None:
    scores = np.array([0.05, 0.1, 0.4, 0.15, 0.2, 0.1])
    fig = top_roi_gallery(
        slide_png, COORDS, 100, scores, k=3, bottom_k=2, tile_px=32, save=tmp_path / "g.png"
    )
    assert (tmp_path / "g.png").stat().st_size > 1000
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:3] == ["ROI 2: 0.4", "ROI 4: 0.2", "ROI 3: 0.15"]
    assert titles[3:] == ["ROI 0: 0.05", "ROI 5: 0.1"]
    per_class = np.stack([scores, scores[::-1]])
    fig = top_roi_gallery(
        slide_png, COORDS, 100, per_class, k=2, class_names=["x", "y"], tile_px=32, save=tmp_path / "pc.png"
    )
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["x top", "y top"]
    img = roi_image(slide_png, 40, 50, 100, out_px=50)
    base = np.asarray(Image.open(slide_png).convert("RGB"))[50:150, 40:140]
    expected = np.asarray(Image.fromarray(base).resize((50, 50), Image.Resampling.BOX))
    np.testing.assert_array_equal(img, expected)
    # Regions beyond the slide are white.
    assert np.all(roi_image(slide_png, 380, 280, 100, out_px=100)[30:, 30:] == 255)


def test_slide_plots(tmp_path: Path) -> None:
    from msfm.pl.slides import colorize, overlay_heatmap, slide_heatmap_figure

    img = np.full((20, 30, 3), 200, np.uint8)
    heat = np.tile(np.linspace(0, 1, 30), (20, 1))
    mask = np.zeros((20, 30), bool)
    mask[:, 15:] = True
    out = overlay_heatmap(img, heat, mask=mask, alpha=1.0, vmin=0, vmax=1)
    np.testing.assert_array_equal(out[:, :15], img[:, :15])
    np.testing.assert_array_equal(out[:, 15:], colorize(heat[:, 15:], vmin=0, vmax=1))
    np.testing.assert_array_equal(colorize(np.array([0.0, 1.0]), vmin=0, vmax=1), [[0, 0, 128], [128, 0, 0]])
    fig = slide_heatmap_figure(out, thumbnail=img, title="s", vmin=0, vmax=100, save=tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 500
    assert len(fig.axes) == 3  # thumbnail, overlay, colour bar
    with pytest.raises(MsfmInputError, match="same size"):
        overlay_heatmap(img, heat[:, :10])
    with pytest.raises(MsfmInputError, match="alpha"):
        overlay_heatmap(img, heat, alpha=2.0)
