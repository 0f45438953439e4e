"""Checkpoint checks at load (docs/architecture.md "Checkpoint checks"), in every family.

A tensor cast to another dtype, a missing, extra or wrongly shaped tensor, a config.json field that is unknown,
mistyped, out of range or describes a huge model: each ends in one CheckpointError that names the key or field,
what was expected and what was found, before the model is allocated.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import msfm
from msfm.cli import main
from msfm.errors import CheckpointError
from msfm.runtime.weights_check import (
    MAX_PARAMETERS,
    TensorSpec,
    check_tensors,
    model_tensor_specs,
    read_safetensors_header,
)

FIX = Path(__file__).parents[1] / "fixtures"
FAMILIES = ("scfoundation", "scmulan", "roam", "gest", "scfoundation-classifier")
# A depth field of each family's config.json, and how to write 100000 into it.
DEPTH: dict[str, Callable[[dict], None]] = {
    "scfoundation": lambda c: c.update(encoder_depth=100_000),
    "scmulan": lambda c: c.update(depth=100_000),
    "roam": lambda c: c.update(depths=[100_000, 1, 1, 1, 1]),
    "gest": lambda c: c.update(depth=100_000),
    "scfoundation-classifier": lambda c: c["backbone"].update(encoder_depth=100_000),
}
DEPTH_NAME = {
    "scfoundation": "encoder_depth",
    "scmulan": "depth",
    "roam": "depths[0]",
    "gest": "depth",
    "scfoundation-classifier": "backbone.encoder_depth",
}


def _load(family: str) -> Callable[..., msfm.runtime.Loaded]:
    name = "scfoundation" if family == "scfoundation-classifier" else family
    return getattr(msfm, name).load


def _gest(path: Path) -> Path:
    from msfm.models.gest.config import GestConfig
    from msfm.models.gest.model import Gest
    from msfm.tokenizers.spatial import MetaCellVocab

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(12)]
    vocab = MetaCellVocab.fit(rng.random((80, 12)), genes, n_metacells=8, n_pcs=4, levels=(3, 2), seed=0)
    torch.manual_seed(0)
    model = Gest(GestConfig(n_genes=12, level_sizes=(8, 3, 2), dim=16, depth=1, num_heads=2))
    return msfm.gest.save_model(path, model, vocab, window={"side_um": 100.0})


def _roam(path: Path) -> Path:
    from msfm.models.roam.config import RoamConfig
    from msfm.models.roam.model import Roam

    torch.manual_seed(0)
    config = RoamConfig(d_in=16, dim=16, heads=2, dim_head=8, mlp_dim=32, depths=(1, 1, 1, 1, 1), n_classes=3)
    return msfm.roam.save_model(Roam(config), path, extra={"class_names": ["a", "b", "c"]})


def _classifier(backbone: Path, path: Path) -> Path:
    from msfm.models.scfoundation.finetune import (
        CellClassifierConfig,
        ClassifierCheckpointConfig,
        ScFoundationCellClassifier,
    )
    from msfm.runtime.checkpoint import save_checkpoint

    loaded = msfm.scfoundation.load(backbone, device="cpu")
    head = CellClassifierConfig(num_classes=2, mode="linear")
    model = ScFoundationCellClassifier(loaded.model, head)
    spec = ClassifierCheckpointConfig(backbone=loaded.config, classifier=head, classes=("a", "b"))
    return save_checkpoint(
        path,
        family="scfoundation-classifier",
        config=spec,
        state_dict=model.state_dict(),
        gene_panel=list(loaded.vocab.symbols),
    )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    sf = msfm.scfoundation.convert(FIX / "scfoundation" / "tiny_official.ckpt", root / "scfoundation")
    return {
        "scfoundation": sf,
        "scmulan": msfm.scmulan.convert(FIX / "scmulan" / "tiny_official.pt", root / "scmulan"),
        "roam": _roam(root / "roam"),
        "gest": _gest(root / "gest"),
        "scfoundation-classifier": _classifier(sf, root / "clf"),
    }


def _copy(ckpts: dict[str, Path], family: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpts[family], tmp_path / family))


def _edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=metadata)


def _edit_config(path: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads((path / "config.json").read_text())
    edit(doc["config"])
    (path / "config.json").write_text(json.dumps(doc))


def _model_key(path: Path, *, floating: bool = True) -> str:
    """The largest floating-point model tensor (not a GeST vocabulary tensor)."""
    header = read_safetensors_header(path / "model.safetensors")
    keys = [k for k, s in header.items() if not k.startswith("metacells.") and s.floating == floating]
    return max(keys, key=lambda k: (header[k].numel, k))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float16])
def test_one_tensor_of_another_dtype_is_refused(ckpts, tmp_path, family, dtype) -> None:
    path = _copy(ckpts, family, tmp_path)
    key = _model_key(path)

    def cast(t: dict[str, torch.Tensor]) -> None:
        t[key] = (t[key] * 100).to(dtype)

    _edit_weights(path, cast)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match="wrong dtype") as info:
        _load(family)(path, device="cpu")
    text = str(info.value)
    assert f"{key} (expected float32" in text
    assert f"found {name})" in text
    assert "re-export the checkpoint" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_extra_and_wrongly_shaped_tensors_are_named(ckpts, tmp_path, family) -> None:
    path = _copy(ckpts, family, tmp_path)
    header = read_safetensors_header(path / "model.safetensors")
    keys = sorted(k for k in header if not k.startswith("metacells.") and len(header[k].shape) >= 1)
    gone, reshaped = keys[0], keys[-1]
    shape = list(header[reshaped].shape)

    def damage(t: dict[str, torch.Tensor]) -> None:
        del t[gone]
        t["bogus.weight"] = torch.zeros(2, 3)
        t[reshaped] = torch.zeros(*shape[:-1], shape[-1] + 1)

    _edit_weights(path, damage)
    with pytest.raises(CheckpointError) as info:
        _load(family)(path, device="cpu")
    text = str(info.value)
    assert f"1 missing: {gone} ({header[gone].describe()})" in text
    assert "1 unexpected: bogus.weight (float32[2, 3])" in text
    assert f"{reshaped} (expected {shape}, found {[*shape[:-1], shape[-1] + 1]})" in text
    assert "config.json does not belong to these weights" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_checkpoint_in_bfloat16_loads_cast_to_float32(ckpts, tmp_path, family) -> None:
    # A run trained with precision="bf16-true" exports bfloat16 weights: kept working, cast on load.
    path = _copy(ckpts, family, tmp_path)

    def to_bf16(t: dict[str, torch.Tensor]) -> None:
        for k, v in t.items():
            if v.is_floating_point() and not k.startswith("metacells."):
                t[k] = v.to(torch.bfloat16)

    _edit_weights(path, to_bf16)
    ref = _load(family)(ckpts[family], device="cpu").model.state_dict()
    got = _load(family)(path, device="cpu").model.state_dict()
    for k, v in ref.items():
        assert got[k].dtype == v.dtype, k
        torch.testing.assert_close(got[k], v.to(torch.bfloat16).to(v.dtype), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_huge_depth_fails_fast_naming_the_field(ckpts, tmp_path, family) -> None:
    path = _copy(ckpts, family, tmp_path)
    _edit_config(path, DEPTH[family])
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        _load(family)(path, device="cpu")
    assert time.perf_counter() - t0 < 1.0
    text = str(info.value)
    assert f"field {DEPTH_NAME[family]!r} = 100000 is out of range; expected an integer" in text
    assert "256]" in text
    assert "fix the file or re-export the checkpoint" in text


@pytest.mark.parametrize("family", ["scmulan", "gest"])
def test_a_model_above_the_parameter_limit_is_refused_before_allocation(ckpts, tmp_path, family) -> None:
    # Every field in range, the product far too large: refused from the meta-device build, without allocating.
    path = _copy(ckpts, family, tmp_path)
    _edit_config(path, lambda c: c.update(dim=65_536, depth=256, num_heads=256))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"at most {MAX_PARAMETERS:,} parameters") as info:
        _load(family)(path, device="cpu")
    assert time.perf_counter() - t0 < 5.0
    assert "dim=65536" in str(info.value)
    assert "depth=256" in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_that_disagrees_with_the_weights_is_refused(ckpts, tmp_path, family) -> None:
    # A valid config for another model than the tensors (one more layer): the header check names the tensors.
    path = _copy(ckpts, family, tmp_path)
    field = {"scfoundation": "encoder_depth", "scfoundation-classifier": "encoder_depth"}.get(family, "depth")

    def deeper(c: dict) -> None:
        target = c["backbone"] if family == "scfoundation-classifier" else c
        if family == "roam":
            target["depths"] = [d + 1 for d in target["depths"]]
        else:
            target[field] += 1

    _edit_config(path, deeper)
    with pytest.raises(
        CheckpointError, match=r"do not fit the model that .*config\.json describes.* missing"
    ):
        _load(family)(path, device="cpu")


@pytest.mark.parametrize(
    ("family", "typo", "field"),
    [
        ("scfoundation", "encoder_dept", "encoder_depth"),
        ("scmulan", "dept", "depth"),
        ("roam", "head", "heads"),
        ("gest", "dept", "depth"),
        ("scfoundation-classifier", "clases", "classes"),
    ],
)
def test_unknown_field_is_named_with_the_known_ones(ckpts, tmp_path, family, typo, field) -> None:
    path = _copy(ckpts, family, tmp_path)
    _edit_config(path, lambda c: c.update({typo: 8}))
    with pytest.raises(CheckpointError) as info:
        _load(family)(path, device="cpu")
    text = str(info.value)
    assert f"unknown field {typo!r} (did you mean {field!r}" in text
    known = text.split("known fields: ")[1].split(";")[0].split(", ")
    assert field in known
    assert typo not in known


@pytest.mark.parametrize(
    ("family", "field", "expected"),
    [
        ("scfoundation", "encoder_depth", "an integer in [0, 256]"),
        ("scmulan", "depth", "an integer in [0, 256]"),
        ("gest", "depth", "an integer in [0, 256]"),
        ("roam", "heads", "an integer in [1, 256]"),
    ],
)
def test_mistyped_field_says_what_it_accepts(ckpts, tmp_path, family, field, expected) -> None:
    path = _copy(ckpts, family, tmp_path)
    _edit_config(path, lambda c: c.update({field: "twelve"}))
    with pytest.raises(CheckpointError) as info:
        _load(family)(path, device="cpu")
    assert str(info.value) == (
        f"{path / 'config.json'} is damaged: field {field!r} = 'twelve' is not an integer; expected {expected}; "
        "fix the file or re-export the checkpoint."
    )


def test_dropout_bound_and_nan_are_refused(ckpts, tmp_path) -> None:
    path = _copy(ckpts, "scmulan", tmp_path)
    _edit_config(path, lambda c: c.update(dropout=1.0))
    with pytest.raises(
        CheckpointError, match=r"'dropout' = 1\.0 is out of range; expected a number in \[0\.0, 1\.0\)"
    ):
        msfm.scmulan.load(path, device="cpu")
    _edit_config(path, lambda c: c.update(dropout=0.0, norm_eps=float("nan")))
    with pytest.raises(CheckpointError, match="'norm_eps' = nan is not a finite number"):
        msfm.scmulan.load(path, device="cpu")


def test_cli_reports_a_damaged_checkpoint_in_one_line(ckpts, tmp_path, capsys) -> None:
    path = _copy(ckpts, "scmulan", tmp_path)
    _edit_weights(path, lambda t: t.update({k: v.to(torch.int64) for k, v in list(t.items())[:1]}))
    data = tmp_path / "cells.h5ad"
    import anndata as ad

    ad.AnnData(np.ones((2, 3), dtype=np.float32)).write_h5ad(data)
    with pytest.raises(SystemExit) as info:
        main(["scmulan", "embed", str(data), "-c", str(path), "-o", str(tmp_path / "o.h5ad")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "wrong dtype" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.h5ad").exists()


# --- the shared check on its own --------------------------------------------------------------------------------


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_tied_weights_may_be_stored_once_and_non_persistent_buffers_are_not_expected() -> None:
    expected, tied = model_tensor_specs(_Tied())
    assert tied == {"head.weight": "embed.weight"}
    assert "scratch" not in expected
    found = {k: v for k, v in expected.items() if k != "head.weight"}
    assert check_tensors(expected, found, source="x", tied=tied) is None
    found = {k: v for k, v in expected.items() if k != "embed.weight"}
    assert check_tensors(expected, found, source="x", tied=tied) is None
    with pytest.raises(CheckpointError, match="1 missing: steps"):
        check_tensors(expected, {k: v for k, v in expected.items() if k != "steps"}, source="x", tied=tied)


def test_dtype_rules() -> None:
    f32, i64 = "float32", "int64"
    expected = {"a": TensorSpec((2,), f32), "b": TensorSpec((2,), f32), "c": TensorSpec((), i64)}
    # one precision for every floating tensor: accepted, reported
    same = {"a": TensorSpec((2,), "bfloat16"), "b": TensorSpec((2,), "bfloat16"), "c": TensorSpec((), i64)}
    assert check_tensors(expected, same, source="x") == "bfloat16"
    # an integer buffer of another width is refused even then
    with pytest.raises(CheckpointError, match=r"c \(expected int64, found int32\)"):
        check_tensors(expected, {**same, "c": TensorSpec((), "int32")}, source="x")
    # the odd one out is named, with the dtype of the others
    odd = {**expected, "b": TensorSpec((2,), "float16")}
    with pytest.raises(
        CheckpointError, match=r"1 with the wrong dtype: b \(expected float32, found float16\)"
    ):
        check_tensors(expected, odd, source="x")
    with pytest.raises(CheckpointError, match=r"a \(expected float32, found int64\)"):
        check_tensors(expected, {**expected, "a": TensorSpec((2,), i64)}, source="x")
