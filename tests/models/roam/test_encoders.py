"""Patch encoders: registry, resnet50_trunc in torchvision layout, timm wrapper, tiny, colour_stats."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.roam.encoders import (
    ResNet50Trunc,
    available_encoders,
    build_encoder,
    encoder_signature,
    register_encoder,
)


def _patches(n: int = 4, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _torchvision_layout_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A random full ResNet-50 state dict in torchvision's layout (with layer4 and fc, which must be ignored)."""
    torch.manual_seed(seed)
    trunc = ResNet50Trunc()
    state = {k: v.clone() for k, v in trunc.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean") or (k.endswith(("bn1.bias", "bn2.bias", "bn3.bias"))):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
    state["layer4.0.conv1.weight"] = torch.randn(512, 1024, 1, 1)
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_registry_lists_and_rejects() -> None:
    names = available_encoders()
    assert {"resnet50_trunc", "tiny", "colour_stats", "timm:<model>"} <= set(names)
    with pytest.raises(MsfmInputError, match=r"Unknown encoder 'nope'.*resnet50_trunc"):
        build_encoder("nope")
    with pytest.raises(MsfmInputError, match=r"does not take the option\(s\) \['random_init'\].*seed"):
        build_encoder("tiny", random_init=True)
    with pytest.raises(MsfmInputError, match="already registered"):
        register_encoder("tiny")(lambda **kw: None)


def test_resnet50_trunc_is_1024d_and_needs_weights() -> None:
    with pytest.raises(MsfmInputError, match=r"local file.*downloads nothing.*random_init"):
        build_encoder("resnet50_trunc")
    enc = build_encoder("resnet50_trunc", random_init=True, input_size=64)
    assert enc.dim == 1024
    x = enc.preprocess(_patches(2, 80))
    assert x.shape == (2, 3, 64, 64)
    with torch.inference_mode():
        out = enc(x)
    assert out.shape == (2, 1024)
    assert torch.isfinite(out).all()
    desc = enc.describe()
    assert desc["init"].startswith("random")
    assert desc["weights"] == "none"


def test_resnet50_trunc_loads_torchvision_layout_through_weights_path(tmp_path: Path) -> None:
    state = _torchvision_layout_state()
    path = tmp_path / "resnet50-test.pth"
    torch.save(state, path)
    enc = build_encoder("resnet50_trunc", weights=path, input_size=64)
    # The same computation done by hand on a model loaded directly from the dict.
    ref = ResNet50Trunc()
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith(("layer4", "fc"))})
    ref.eval()
    x = enc.preprocess(_patches(3, 64))
    with torch.inference_mode():
        np.testing.assert_allclose(enc(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)
        # Different from a random init: the weights were really used.
        rand = build_encoder("resnet50_trunc", random_init=True, input_size=64)
        assert not torch.allclose(enc(x), rand(x))
    desc = enc.describe()
    assert desc["weights"] == str(path.resolve())
    assert len(desc["weights_sha256"]) == 64
    assert desc["init"] == "pretrained"
    # Moving the weights file does not change the signature.
    moved = tmp_path / "moved.pth"
    path.rename(moved)
    enc2 = build_encoder("resnet50_trunc", weights=moved, input_size=64)
    assert encoder_signature(enc2.describe()) == encoder_signature(desc)
    # A DataParallel-wrapped dict inside {"state_dict": ...} also loads.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    enc3 = build_encoder("resnet50_trunc", weights=wrapped, input_size=64)
    with torch.inference_mode():
        np.testing.assert_allclose(enc3(x).numpy(), enc(x).numpy(), rtol=1e-6, atol=1e-6)


def test_resnet50_trunc_wrong_layout_errors(tmp_path: Path) -> None:
    state = _torchvision_layout_state()
    bad = tmp_path / "renamed.pth"
    torch.save({f"encoder.{k}": v for k, v in state.items()}, bad)
    with pytest.raises(
        MsfmInputError, match=r"not in the expected layout.*conv1\.weight.*torchvision ResNet-50"
    ):
        build_encoder("resnet50_trunc", weights=bad)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer3.5.")}, partial)
    with pytest.raises(MsfmInputError, match=r"missing: layer3\.5\.conv1\.weight"):
        build_encoder("resnet50_trunc", weights=partial)
    deeper = tmp_path / "deeper.pth"
    torch.save({**state, "layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)}, deeper)
    with pytest.raises(MsfmInputError, match="deeper ResNet"):
        build_encoder("resnet50_trunc", weights=deeper)
    shapes = tmp_path / "shapes.pth"
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, shapes)
    with pytest.raises(MsfmInputError, match="shapes do not match"):
        build_encoder("resnet50_trunc", weights=shapes)
    not_torch = tmp_path / "junk.pth"
    not_torch.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        build_encoder("resnet50_trunc", weights=not_torch)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_encoder("resnet50_trunc", weights=tmp_path / "absent.pth")


def test_batchnorm_stays_in_eval_mode() -> None:
    enc = build_encoder("resnet50_trunc", random_init=True, input_size=32)
    enc.train()  # a frozen encoder ignores this
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    assert not any(m.training for m in bns)
    assert not any(p.requires_grad for p in enc.parameters())
    # Running statistics, not batch statistics: one patch gives the same features alone or in a batch.
    x = enc.preprocess(_patches(4, 32))
    with torch.inference_mode():
        np.testing.assert_allclose(enc(x[:1]).numpy(), enc(x)[:1].numpy(), rtol=1e-4, atol=1e-5)


def test_preprocess_uint8_nhwc_numpy() -> None:
    enc = build_encoder("tiny")
    patches = _patches(2, 64)
    x = enc.preprocess(patches)
    assert x.dtype == torch.float32
    assert x.shape == (2, 3, 64, 64)
    expected = (patches[0, :, :, 0].astype(np.float32) / 255.0 - 0.5) / 0.25  # no resize at input_size 64
    np.testing.assert_allclose(x[0, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    # One [H, W, 3] patch, a torch uint8 tensor and a resize all work.
    assert enc.preprocess(patches[0]).shape == (1, 3, 64, 64)
    assert enc.preprocess(torch.from_numpy(patches)).shape == (2, 3, 64, 64)
    assert enc.preprocess(_patches(1, 256)).shape == (1, 3, 64, 64)
    with pytest.raises(MsfmInputError, match="expected uint8"):
        enc.preprocess(patches.astype(np.float32))
    with pytest.raises(MsfmInputError, match=r"\[N, H, W, 3\]"):
        enc.preprocess(np.zeros((2, 3, 64, 64), dtype=np.uint8))


def test_tiny_is_seeded_and_deterministic() -> None:
    a, b, c = build_encoder("tiny"), build_encoder("tiny"), build_encoder("tiny", seed=1)
    p = _patches(5, 64)
    fa, fb, fc = a.embed(p, batch_size=2), b.embed(p), c.embed(p)
    assert fa.shape == (5, 32)
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fa, fc)


def test_colour_stats_weight_free_deterministic_and_meaningful() -> None:
    enc = build_encoder("colour_stats")
    assert enc.dim == 64
    assert enc.describe()["init"] == "weight-free"
    p = _patches(3, 128)
    f1, f2 = enc.embed(p), enc.embed(p)
    assert f1.shape == (3, 64)
    assert np.isfinite(f1).all()
    np.testing.assert_array_equal(f1, f2)
    # Per-channel means come first: a pure red patch has mean R = 1, G = B = 0, and no texture.
    red = np.zeros((1, 128, 128, 3), dtype=np.uint8)
    red[..., 0] = 255
    fr = enc.embed(red)[0]
    np.testing.assert_allclose(fr[:3], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(fr[3:6], 0.0, atol=1e-6)
    white = np.full((1, 128, 128, 3), 255, dtype=np.uint8)
    fw = enc.embed(white)[0]
    assert fw[6:9].max() < 1e-5  # optical density of white is ~0
    with pytest.raises(MsfmInputError, match="has no weights"):
        build_encoder("colour_stats", weights="x.pth")


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(MsfmInputError, match=r"pip install timm.*torchvision.*CUDA"):
        build_encoder("timm:resnet18")
    with pytest.raises(MsfmInputError, match="model name after the colon"):
        build_encoder("timm:")


def test_timm_wrapper_with_a_stand_in_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The wrapper's contract with timm (create_model(num_classes=0), resolve_data_config, num_features)."""

    class Net(nn.Module):
        num_features = 8

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.head = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3))

    calls = {}

    def create_model(name: str, pretrained: bool, num_classes: int, **kw: object) -> nn.Module:
        calls.update(name=name, pretrained=pretrained, num_classes=num_classes)
        if name != "fake_net":
            raise RuntimeError(f"Unknown model ({name})")
        return Net()

    fake = types.ModuleType("timm")
    fake.create_model = create_model
    fake.data = types.ModuleType("timm.data")
    fake.data.resolve_data_config = lambda args, model: {
        "input_size": (3, 48, 48),
        "mean": (0.1, 0.2, 0.3),
        "std": (0.5, 0.5, 0.5),
    }
    monkeypatch.setitem(sys.modules, "timm", fake)
    monkeypatch.setitem(sys.modules, "timm.data", fake.data)
    with pytest.raises(MsfmInputError, match="local file"):
        build_encoder("timm:fake_net")
    torch.manual_seed(3)
    src = Net()
    w = tmp_path / "fake.pth"
    torch.save({**src.state_dict(), "fc.weight": torch.zeros(2, 8)}, w)
    enc = build_encoder("timm:fake_net", weights=w)
    assert calls == {"name": "fake_net", "pretrained": False, "num_classes": 0}
    assert (enc.name, enc.dim, enc.input_size, enc.mean) == ("timm:fake_net", 8, 48, (0.1, 0.2, 0.3))
    x = enc.preprocess(_patches(2, 64))
    assert x.shape == (2, 3, 48, 48)
    with torch.inference_mode():
        np.testing.assert_allclose(enc(x).numpy(), src(x).numpy(), rtol=1e-6)
    torch.save({"other.weight": torch.zeros(1)}, w)
    with pytest.raises(MsfmInputError, match="missing keys"):
        build_encoder("timm:fake_net", weights=w)
    with pytest.raises(MsfmInputError, match="could not create"):
        build_encoder("timm:other", random_init=True)
