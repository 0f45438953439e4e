"""ROAM model: shapes, padding/batching invariance, chunking, instance loss, overfitting, checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

import msfm
from msfm.errors import CheckpointError
from msfm.models.roam.checkpoint import save_model
from msfm.models.roam.config import RoamConfig
from msfm.models.roam.model import Roam, children_index, relative_position_index
from msfm.registry import create_model
from msfm.runtime.loaded import Loaded

SMALL = RoamConfig(d_in=16, dim=16, heads=2, dim_head=8, mlp_dim=32, depths=(1, 1, 1, 1, 1), n_classes=3)


def _model(**kw) -> Roam:
    torch.manual_seed(0)
    return Roam(SMALL.model_copy(update=kw)).eval()


def test_shapes_one_slide_and_batch() -> None:
    model = _model()
    out = model(torch.randn(5, 84, 16))
    assert out.logits.shape == (1, 3)
    assert out.attention.shape == (1, 5, 3)
    assert out.attention_weights.shape == (1, 3, 5)
    assert out.roi_embeddings.shape == (1, 5, 16)
    assert out.pooled.shape == (1, 3, 16)
    assert out.instance_loss is None
    torch.testing.assert_close(out.attention_weights.sum(-1), torch.ones(1, 3))


def test_padded_batch_equals_one_by_one() -> None:
    model = _model()
    slides = [torch.randn(k, 84, 16) for k in (3, 7, 1)]
    labels = torch.tensor([0, 2, 1])
    kmax = max(s.shape[0] for s in slides)
    batch = torch.zeros(3, kmax, 84, 16)
    mask = torch.zeros(3, kmax, dtype=torch.bool)
    for i, s in enumerate(slides):
        batch[i, : s.shape[0]] = s
        batch[i, s.shape[0] :] = 1e3  # padding content must not matter
        mask[i, : s.shape[0]] = True
    out = model(batch, mask, labels=labels)
    losses = []
    for i, s in enumerate(slides):
        one = model(s.unsqueeze(0), labels=labels[i : i + 1])
        k = s.shape[0]
        torch.testing.assert_close(out.logits[i], one.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            out.attention_weights[i, :, :k], one.attention_weights[0], atol=1e-6, rtol=1e-5
        )
        assert torch.all(out.attention_weights[i, :, k:] == 0)
        assert torch.isneginf(out.attention[i, k:]).all()
        losses.append(one.instance_loss)
    torch.testing.assert_close(out.instance_loss, torch.stack(losses).mean(), atol=1e-6, rtol=1e-5)


def test_roi_chunking_and_85_tokens_do_not_change_outputs() -> None:
    model = _model()
    x = torch.randn(1, 9, 85, 16)
    full = model(x[:, :, :84])
    torch.testing.assert_close(model(x).logits, full.logits)
    torch.testing.assert_close(model(x[:, :, :84], roi_chunk=2).logits, full.logits, atol=1e-6, rtol=1e-5)


def test_instance_loss_with_fewer_rois_than_topk() -> None:
    model = _model(topk=4)
    out = model(torch.randn(1, 2, 84, 16), labels=torch.tensor([1]))
    assert out.instance_index[0].numel() == 2
    assert out.instance_logits[0].shape == (2, 3)
    expected = torch.nn.functional.cross_entropy(out.instance_logits[0], torch.tensor([1, 1]))
    torch.testing.assert_close(out.instance_loss, expected)
    # the ROIs are ordered by decreasing attention of the true class
    w = out.attention_weights[0, 1, out.instance_index[0]]
    assert bool((w[:-1] >= w[1:]).all())


def test_token_order_parent_children() -> None:
    # 10x token j = R*4+C owns 20x tokens (2R+a)*8 + (2C+b)
    ch = children_index(4)
    assert ch[0].tolist() == [0, 1, 8, 9]
    assert ch[5].tolist() == [18, 19, 26, 27]
    assert children_index(2)[3].tolist() == [10, 11, 14, 15]
    idx = relative_position_index(2)
    # query 0 (0,0) vs key 3 (1,1): d_row = -1, d_col = -1 -> (0) + (0)*3 = 0; key 0 vs itself -> 1 + 1*3 = 4
    assert idx[0, 3].item() == 0
    assert idx[0, 0].item() == 4


def test_children_receive_gradient_only_from_their_parent_block() -> None:
    """A 20x patch must influence the 10x token that owns it (through the inter-scale block) and the CLS."""
    model = _model()
    x = torch.randn(1, 84, 16, requires_grad=True)
    out = model.pyramid(x)
    out.tokens10[0, 1 + 5].sum().backward()  # 10x token 5 after the 10x intra stack mixes everything...
    assert x.grad is not None
    # ...so check the inter-scale step directly: it only sees the parent and its four children
    model.zero_grad()
    x2 = torch.randn(1, 84, 16, requires_grad=True)
    pyr = model.pyramid
    e20 = pyr.embed_20(x2[:, :64])
    t20 = pyr._intra(pyr.intra_20, pyr.cls_20, pyr.pos_20, e20)
    e10 = pyr.embed_10(x2[:, 64:80])
    up = pyr._inter(pyr.inter_20_10, e10, t20[:, 1:], pyr.children_10)
    g = torch.autograd.grad(up[0, 5].sum(), e10)[0]
    nonzero = g[0].abs().sum(-1) > 0
    assert nonzero.tolist() == [j == 5 for j in range(16)]


def test_tiny_model_overfits_a_batch() -> None:
    torch.manual_seed(0)
    model = Roam(SMALL.model_copy(update={"dropout": 0.0, "mil_dropout": 0.0}))
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    feats = torch.randn(6, 2, 84, 16, generator=gen) + labels.view(6, 1, 1, 1) * 0.3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        out = model(feats, labels=labels)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + out.instance_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert (model(feats).logits.argmax(-1) == labels).all()
    assert loss.item() < 0.2


def test_dropout_active_only_in_training() -> None:
    model = _model(dropout=0.5)
    x = torch.randn(1, 3, 84, 16)
    torch.testing.assert_close(model(x).logits, model(x).logits)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _model(class_names=("a", "b", "c"))
    path = save_model(model, tmp_path / "ckpt", extra={"task": "t", "encoder": {"name": "tiny", "dim": 16}})
    loaded = msfm.roam.load(path, device="cpu")
    assert isinstance(loaded, Loaded)
    assert loaded.family == "roam"
    assert loaded.path == path
    assert loaded.vocab is None
    assert loaded.config == model.config
    assert loaded.extra["task"] == "t"
    assert not loaded.model.training
    x = torch.randn(1, 3, 84, 16)
    torch.testing.assert_close(loaded.model(x).logits, model(x).logits)
    assert msfm.roam.load(loaded, device="cpu") is loaded  # a Loaded passes through
    assert not any("rel_index" in k or "children" in k for k in model.state_dict())


def test_load_rejects_other_family(tmp_path) -> None:
    from msfm.runtime.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "x", family="scmulan", config={"a": 1}, state_dict={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="roam"):
        msfm.roam.load(tmp_path / "x", device="cpu")


def test_bad_input_shapes_are_explained() -> None:
    model = _model()
    with pytest.raises(ValueError, match="d_in=16"):
        model(torch.randn(1, 3, 84, 32))
    with pytest.raises(ValueError, match="84"):
        model(torch.randn(1, 3, 21, 16))
    with pytest.raises(ValueError, match="at least one ROI"):
        model(torch.randn(2, 3, 84, 16), torch.tensor([[True, False, False], [False, False, False]]))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="class_names"):
        RoamConfig(n_classes=2, class_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="depths"):
        RoamConfig(depths=(2, 0, 2, 2, 2))


def test_presets_and_parameter_count() -> None:
    big = create_model("roam-subtyping")
    assert sum(p.numel() for p in big.parameters()) == 8_773_823
    tiny = create_model("roam-tiny", d_in=32, n_classes=2)
    assert tiny.config.d_in == 32
    assert sum(p.numel() for p in tiny.parameters()) < 500_000


def test_public_api_names_resolve() -> None:
    import importlib
    import types

    import msfm.models.roam as roam

    for name in roam.__all__:
        assert getattr(roam, name) is not None, name
    assert msfm.roam.Roam is Roam
    # Importing every submodule must not replace a verb by a module of the same name.
    for mod in ("training", "prediction", "preprocessing", "cascades", "evaluation", "heatmaps", "ensemble"):
        importlib.import_module(f"msfm.models.roam.{mod}")
    for verb in ("load", "convert", "preprocess", "train", "predict", "cascade", "evaluate", "heatmap"):
        assert isinstance(getattr(roam, verb), types.FunctionType), verb
