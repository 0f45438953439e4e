"""msfm checkpoint directories: round trip and every error path of load_checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from msfm._version import CHECKPOINT_SCHEMA_VERSION, __version__
from msfm.errors import CheckpointError, MsfmInputError
from msfm.runtime.checkpoint import gene_panel_sha256, is_checkpoint_dir, load_checkpoint, save_checkpoint


class TinyConfig(BaseModel):
    dim: int = 8
    depth: int = 2
    betas: tuple[float, float] = (0.9, 0.99)


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # tied weights share one storage
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
        self.scale16 = torch.nn.Parameter(torch.randn(3, dtype=torch.float16))


GENES = ["TP53", "GAPDH", "CD3E"]


def _save(path: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    model = Tied()
    defaults = {
        "family": "tiny",
        "config": TinyConfig(),
        "state_dict": model.state_dict(),
        "gene_panel": GENES,
        "preprocessing": {"target_sum": 1e4, "log1p": True},
        "extra_meta": {"global_step": 3},
    }
    defaults.update(kwargs)
    return save_checkpoint(path, **defaults)


def test_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    path = _save(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "genes.txt",
        "meta.json",
        "model.safetensors",
    ]
    assert is_checkpoint_dir(path)

    ckpt = load_checkpoint(path, family="tiny")
    assert ckpt.family == "tiny"
    assert ckpt.path == path
    assert ckpt.config == {"dim": 8, "depth": 2, "betas": [0.9, 0.99]}
    assert TinyConfig(**ckpt.config) == TinyConfig()
    expected = model.state_dict()
    assert ckpt.state_dict.keys() == expected.keys()
    for name, value in expected.items():
        assert ckpt.state_dict[name].dtype == value.dtype, name
        torch.testing.assert_close(ckpt.state_dict[name], value, rtol=0, atol=0)
    # Tied weights come back as two independent tensors with equal values.
    assert ckpt.state_dict["embed.weight"].data_ptr() != ckpt.state_dict["head.weight"].data_ptr()
    fresh = Tied()
    fresh.load_state_dict(ckpt.state_dict)
    torch.testing.assert_close(fresh.head.weight, model.head.weight)

    assert ckpt.gene_panel == GENES
    meta = ckpt.meta
    assert meta["msfm_version"] == __version__
    assert meta["schema_version"] == CHECKPOINT_SCHEMA_VERSION
    assert meta["family"] == "tiny"
    assert meta["created"].endswith("+00:00")
    assert meta["gene_panel"] == {
        "name": None,
        "size": 3,
        "sha256": gene_panel_sha256(GENES),
        "file": "genes.txt",
    }
    assert meta["preprocessing"] == {"target_sum": 1e4, "log1p": True}
    assert meta["extra"] == {"global_step": 3}
    assert (path / "genes.txt").read_text() == "TP53\nGAPDH\nCD3E\n"
    assert json.loads((path / "config.json").read_text())["family"] == "tiny"


def test_without_panel_and_with_dict_config(tmp_path: Path) -> None:
    path = _save(tmp_path / "c", gene_panel=None, config={"dim": 4}, preprocessing=None, extra_meta=None)
    assert not (path / "genes.txt").exists()
    ckpt = load_checkpoint(path)
    assert ckpt.gene_panel is None
    assert ckpt.config == {"dim": 4}
    assert ckpt.meta["gene_panel"] is None
    assert ckpt.meta["extra"] == {}


def test_panel_name_from_argument(tmp_path: Path) -> None:
    path = _save(tmp_path / "c", gene_panel_name="toy3")
    assert load_checkpoint(path).meta["gene_panel"]["name"] == "toy3"
    assert gene_panel_sha256(GENES) != gene_panel_sha256(list(reversed(GENES)))


def test_overwrite_replaces_whole_directory(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    _save(path, gene_panel=None, state_dict={"w": torch.ones(2)})
    assert not (path / "genes.txt").exists()
    assert list(load_checkpoint(path).state_dict) == ["w"]


def test_state_dict_from_gpu_like_views(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    state = {"full": base, "t": base.t(), "slice": base[:, 1:3]}
    ckpt = load_checkpoint(_save(tmp_path / "c", state_dict=state))
    for name, value in state.items():
        torch.testing.assert_close(ckpt.state_dict[name], value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    assert not is_checkpoint_dir(tmp_path / "nope")


def test_missing_files_are_named(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    (path / "meta.json").unlink()
    (path / "model.safetensors").unlink()
    assert not is_checkpoint_dir(path)
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors, meta\.json") as info:
        load_checkpoint(path, family="tiny")
    assert "msfm tiny convert" in str(info.value)


def test_missing_genes_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    (path / "genes.txt").unlink()
    with pytest.raises(CheckpointError, match=r"genes\.txt is missing"):
        load_checkpoint(path)


def test_edited_genes_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    (path / "genes.txt").write_text("TP53\nCD3E\nGAPDH\n")
    with pytest.raises(CheckpointError, match="does not match the panel hash"):
        load_checkpoint(path)


def test_newer_schema_asks_to_upgrade(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = CHECKPOINT_SCHEMA_VERSION + 1
    meta["msfm_version"] = "99.0"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"schema version 2 \(written by msfm 99.0\).*pip install -U msfm"
    ):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", [None, "1", 0, True])
def test_invalid_schema(tmp_path: Path, bad) -> None:
    path = _save(tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    meta["schema_version"] = bad
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="schema_version"):
        load_checkpoint(path)


def test_wrong_family(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    with pytest.raises(
        CheckpointError, match="is a 'tiny' checkpoint, but a 'scfoundation' checkpoint was requested"
    ):
        load_checkpoint(path, family="scfoundation")


@pytest.mark.parametrize("name", ["models.ckpt", "weights.pt", "model.pth"])
def test_foreign_file_suggests_convert(tmp_path: Path, name: str) -> None:
    file = tmp_path / name
    file.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=f"msfm scfoundation convert {file}"):
        load_checkpoint(file, family="scfoundation")
    with pytest.raises(CheckpointError, match="msfm <family> convert"):
        load_checkpoint(file)


def test_weights_file_suggests_folder(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    with pytest.raises(CheckpointError, match=f"Pass its folder instead: {path}"):
        load_checkpoint(path / "model.safetensors")


def test_damaged_files(tmp_path: Path) -> None:
    path = _save(tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="weights file is damaged"):
        load_checkpoint(path)
    path = _save(tmp_path / "d")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    path = _save(tmp_path / "e")
    (path / "config.json").write_text(json.dumps({"family": "other", "config": {}}))
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_checkpoint(path)


def test_save_input_errors(tmp_path: Path) -> None:
    with pytest.raises(MsfmInputError, match="family"):
        _save(tmp_path / "a", family="")
    with pytest.raises(MsfmInputError, match="pydantic model or a dict"):
        _save(tmp_path / "a", config=[1, 2])
    with pytest.raises(MsfmInputError, match="not JSON-serialisable"):
        _save(tmp_path / "a", config={"x": object()})
    with pytest.raises(MsfmInputError, match="unusable symbols"):
        _save(tmp_path / "a", gene_panel=["A", " B"])
    with pytest.raises(MsfmInputError, match="not JSON-serialisable"):
        _save(tmp_path / "a", extra_meta={"x": {1, 2}})
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []


def test_map_location(tmp_path: Path) -> None:
    ckpt = load_checkpoint(_save(tmp_path / "c"), map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())
