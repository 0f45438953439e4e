"""ROAM against the official code: the tiny official checkpoint and its recorded outputs (tests/fixtures/roam).

Tolerances follow the fixture README: forward tensors atol/rtol 1e-5 (raw attention 1e-4), indices exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msfm.models.roam.model import Roam, children_index, relative_position_index
from msfm.models.roam.official import (
    config_from_official_state_dict,
    convert_official_state_dict,
    load_official_checkpoint,
    to_official_state_dict,
)
from msfm.registry import create_model, preset_config

FIX = Path(__file__).parents[2] / "fixtures" / "roam"
SLIDES = ("A", "B", "C")
ATOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "tiny_official_io.safetensors")


@pytest.fixture(scope="module")
def model() -> Roam:
    return load_official_checkpoint(FIX / "tiny_official.pt")


@pytest.fixture(scope="module")
def outputs(model: Roam, io) -> dict[str, object]:
    """Forward (with the label, for the instance loss) and pyramid outputs of each slide."""
    res = {}
    with torch.no_grad():
        for s in SLIDES:
            x = io[f"{s}_features"]
            res[s] = (model(x, labels=io[f"{s}_label"]), model.pyramid(x[0]))
    return res


def test_fixture_config_is_the_fixture_preset(model: Roam) -> None:
    meta = json.loads(_metadata()["config"])
    assert model.config.depths == tuple(meta["depths"])
    assert model.config.scale_weights == tuple(meta["embed_weights"])
    preset = preset_config("roam-fixture")
    for field in ("d_in", "dim", "heads", "dim_head", "mlp_dim", "depths", "n_classes", "scale_weights"):
        assert getattr(model.config, field) == getattr(preset, field), field


def _metadata() -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(FIX / "tiny_official_io.safetensors", "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("slide", SLIDES)
def test_slide_outputs_match_official(outputs, io, slide: str) -> None:
    out, pyr = outputs[slide]
    torch.testing.assert_close(out.logits, io[f"{slide}_slide_logits"], **ATOL)
    torch.testing.assert_close(out.logits.softmax(-1), io[f"{slide}_slide_probs"], **ATOL)
    torch.testing.assert_close(out.attention[0], io[f"{slide}_attn_raw"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.attention_weights[0], io[f"{slide}_attn_softmax"], **ATOL)
    torch.testing.assert_close(out.pooled[0], io[f"{slide}_pooled"], **ATOL)
    torch.testing.assert_close(out.roi_embeddings[0], io[f"{slide}_roi_emb"], **ATOL)
    torch.testing.assert_close(pyr.roi, io[f"{slide}_roi_emb"], **ATOL)
    for s in ("20", "10", "5"):
        torch.testing.assert_close(getattr(pyr, f"cls{s}"), io[f"{slide}_cls{s}"], **ATOL)


@pytest.mark.parametrize("slide", SLIDES)
def test_instance_loss_matches_official(outputs, io, slide: str) -> None:
    out, _ = outputs[slide]
    assert torch.equal(out.instance_index[0], io[f"{slide}_inst_topk_idx"])
    torch.testing.assert_close(out.instance_logits[0], io[f"{slide}_inst_logits"], **ATOL)
    torch.testing.assert_close(out.instance_loss, io[f"{slide}_inst_loss"], **ATOL)


def test_intermediates_of_slide_a(model: Roam, io) -> None:
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_mod, _inp, output):
            seen[name] = output.detach()

        return hook

    p = model.pyramid
    mods = {
        "patch_emb20": p.embed_20,
        "patch_emb10": p.embed_10,
        "patch_emb5": p.embed_5,
        "transformer_20_to_10_out": p.inter_20_10,
        "transformer_10_to_5_out": p.inter_10_5,
    }
    handles = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            pyr = p(io["A_features"][0])
    finally:
        for h in handles:
            h.remove()
    for name in mods:
        torch.testing.assert_close(seen[name], io[f"A_dbg_{name}"], **ATOL)
    torch.testing.assert_close(pyr.tokens20, io["A_dbg_transformer_20_out"], **ATOL)
    torch.testing.assert_close(pyr.tokens10, io["A_dbg_transformer_10_out"], **ATOL)
    torch.testing.assert_close(pyr.tokens5, io["A_dbg_transformer_5_out"], **ATOL)


def test_token_layout_tables(io) -> None:
    assert torch.equal(children_index(4), io["layout_children20_of_10"])
    assert torch.equal(children_index(2), io["layout_children10_of_5"])
    for w in (8, 4, 2):
        assert torch.equal(relative_position_index(w), io[f"layout_relpos_index_w{w}"])


def test_released_layout_loads_strictly_into_the_subtyping_preset() -> None:
    layout = json.loads((FIX / "official_layout.json").read_text())
    state = {k: torch.zeros(shape) for k, shape in layout["state_dict"].items()}
    assert len(state) == layout["n_tensors"] == 180
    assert sum(t.numel() for t in state.values()) == layout["n_params"] == 8_773_823
    model = create_model("roam-subtyping")
    assert sum(p.numel() for p in model.parameters()) == 8_773_823
    assert not list(model.state_dict(keep_vars=False).keys() - set(convert_official_state_dict(state)))
    model.load_state_dict(convert_official_state_dict(state), strict=True)
    inferred = config_from_official_state_dict(state)
    preset = preset_config("roam-subtyping")
    for field in ("d_in", "dim", "heads", "dim_head", "mlp_dim", "depths", "n_classes", "shared_rel_bias"):
        assert getattr(inferred, field) == getattr(preset, field), field
    # Every released key maps onto a distinct msfm key and back.
    assert set(to_official_state_dict(convert_official_state_dict(state))) == set(state)


def test_state_dict_round_trip_equals_the_official_file(model: Roam) -> None:
    original = torch.load(FIX / "tiny_official.pt", map_location="cpu", weights_only=True)
    back = to_official_state_dict(model.state_dict())
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_85_tokens_equal_84(model: Roam, io) -> None:
    x = io["A_features"]
    extra = torch.cat([x, torch.randn(1, x.shape[1], 1, x.shape[3]) * 100], dim=2)
    with torch.no_grad():
        a, b = model(x), model(extra)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.attention, b.attention)


def test_padded_batch_equals_one_by_one(model: Roam, io) -> None:
    feats = [io[f"{s}_features"][0] for s in SLIDES]
    kmax = max(f.shape[0] for f in feats)
    batch = torch.full((len(feats), kmax, 84, feats[0].shape[-1]), 7.0)
    mask = torch.zeros(len(feats), kmax, dtype=torch.bool)
    for i, f in enumerate(feats):
        batch[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    labels = torch.cat([io[f"{s}_label"] for s in SLIDES])
    with torch.no_grad():
        out = model(batch, mask, labels=labels)
    for i, s in enumerate(SLIDES):
        k = feats[i].shape[0]
        torch.testing.assert_close(out.logits[i], io[f"{s}_slide_logits"][0], **ATOL)
        torch.testing.assert_close(out.attention_weights[i, :, :k], io[f"{s}_attn_softmax"], **ATOL)
        assert torch.all(out.attention_weights[i, :, k:] == 0)
        assert torch.equal(out.instance_index[i], io[f"{s}_inst_topk_idx"])
    torch.testing.assert_close(
        out.instance_loss, torch.stack([io[f"{s}_inst_loss"] for s in SLIDES]).mean(), **ATOL
    )


def test_chunked_roi_encoding_matches(model: Roam, io) -> None:
    with torch.no_grad():
        out = model(io["C_features"], roi_chunk=3)
    torch.testing.assert_close(out.logits, io["C_slide_logits"], **ATOL)
    torch.testing.assert_close(out.attention[0], io["C_attn_raw"], atol=1e-4, rtol=1e-5)
