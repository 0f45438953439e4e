"""Model registry: every preset builds; tiny presets run forward/backward without NaN."""

from __future__ import annotations

import pytest
import torch

from msfm import registry
from msfm.errors import MsfmInputError
from msfm.models.scfoundation.model import ScFoundation
from msfm.registry import create_model, get_model_entry, list_models, register_model

EXPECTED_PARAMS = {"scfoundation-100m": 119_252_285, "scmulan-368m": 368_800_320}


def test_presets_are_listed() -> None:
    names = list_models()
    assert {"scfoundation-100m", "scfoundation-tiny", "scfoundation-fixture"} <= set(names)
    assert names == sorted(names)
    assert list_models("scfoundation-t*") == ["scfoundation-tiny"]
    assert list_models("nothing-*") == []
    entry = get_model_entry("scfoundation_tiny")  # underscores and case are forgiven
    assert entry.family == "scfoundation"
    assert entry.description


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count > 0
    if name in EXPECTED_PARAMS:
        assert count == EXPECTED_PARAMS[name]


@pytest.mark.parametrize(
    "name", [n for n in list_models("scfoundation-*") if n.endswith(("-tiny", "-fixture"))]
)
def test_small_presets_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    assert isinstance(model, ScFoundation)
    config = model.config
    genes = torch.tensor(
        [[3, 50, 900, config.t_id, config.s_id], [7, config.t_id, config.s_id, config.pad_id, config.pad_id]]
    )
    values = torch.tensor([[1.0, 2.0, 0.5, 4.0, 3.1], [2.2, 4.0, 2.5, 0.0, 0.0]])
    full = torch.zeros(2, config.seq_len)
    full[0, [3, 50, 900]] = torch.tensor([1.0, 2.0, 0.5])
    full[1, 7] = 2.2
    full[:, config.t_id] = 4.0
    full[:, config.s_id] = torch.tensor([3.1, 2.5])
    batch = {"values": values, "gene_ids": genes, "padding_mask": genes == config.pad_id, "full_values": full}
    out = model(batch)
    assert out.expression is not None
    assert out.expression.shape == (2, config.seq_len)
    assert torch.isfinite(out.expression).all()
    assert torch.isfinite(out.hidden[~batch["padding_mask"]]).all()
    out.expression.mean().backward()
    assert model.head.weight.grad is not None
    assert torch.isfinite(model.head.weight.grad).all()


@pytest.mark.parametrize("name", [n for n in list_models("scmulan-*") if n.endswith(("-tiny", "-fixture"))])
def test_small_scmulan_presets_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    assert get_model_entry(name).family == "scmulan"
    ids = torch.tensor([[5, 700, 2206], [0, 12, 2206]])
    levels = torch.tensor([[3, 10, 0], [0, 10, 0]])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    out = model(ids, levels, attention_mask=mask)
    assert out.logits.shape == (2, 3, model.config.vocab_size)
    assert torch.isfinite(out.logits[mask]).all()
    (out.logits[mask].mean() + out.expression[mask].mean()).backward()
    assert model.entity_head.weight.grad is not None
    assert torch.isfinite(model.token_embed.weight.grad).all()


def test_overrides() -> None:
    with torch.device("meta"):
        model = create_model("scfoundation-tiny", encoder_depth=1, decoder_key_max="global")
    assert len(model.encoder.layers) == 1
    assert model.config.decoder_key_max == "global"
    with pytest.raises(MsfmInputError, match="encoder_dimm"):
        create_model("scfoundation-tiny", encoder_dimm=3)
    with pytest.raises(MsfmInputError, match="encoder_head_dim"):
        create_model("scfoundation-tiny", encoder_dim=65)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(MsfmInputError, match="Did you mean 'scfoundation-tiny'"):
        create_model("scfoundation-tiy")
    with pytest.raises(MsfmInputError, match="list_models"):
        create_model("resnet50")


def test_register_model_forms_and_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry._REGISTRY, "_entries", dict(registry._REGISTRY._entries))

    @register_model
    def toy_linear(**overrides: object) -> torch.nn.Module:
        """A toy model."""
        return torch.nn.Linear(2, int(overrides.get("out", 1)))  # type: ignore[call-overload]

    @register_model("toy-named", family="toys")
    def _builder(**overrides: object) -> torch.nn.Module:
        return torch.nn.Identity()

    assert create_model("toy-linear", out=3).out_features == 3
    assert get_model_entry("toy-named").family == "toys"
    assert get_model_entry("toy-linear").description == "A toy model."

    def toy_linear_again(**overrides: object) -> torch.nn.Module:
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model("toy-linear")(toy_linear_again)


def test_family_convert_names_stay_functions() -> None:
    # Importing every submodule must not shadow the package-level API functions (a submodule named like a
    # function would replace it as a package attribute).
    import importlib
    import pkgutil

    import msfm.models.scfoundation as sf
    import msfm.models.scmulan as sm

    for pkg in (sf, sm):
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        assert callable(pkg.convert)
        assert not isinstance(pkg.convert, type(importlib))


def test_preset_config_is_typed_and_family_aware() -> None:
    from msfm.models.scmulan.config import ScMulanConfig
    from msfm.registry import preset_config

    cfg = preset_config("scmulan-tiny", vocab_size=100)
    assert isinstance(cfg, ScMulanConfig)
    assert (cfg.dim, cfg.vocab_size) == (128, 100)
    assert preset_config("tiny", family="scmulan") == preset_config("scmulan-tiny")
    with pytest.raises(MsfmInputError, match="is a roam preset, not a scmulan one"):
        preset_config("roam-tiny", family="scmulan")
    with pytest.raises(MsfmInputError, match=r"has no field\(s\) \['dimm'\]"):
        preset_config("scmulan-tiny", dimm=3)
    assert {"scfoundation-tiny", "scmulan-tiny", "roam-tiny", "gest-tiny"} <= set(list_models("*-tiny"))
