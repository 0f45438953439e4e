"""Atomic writes: the old content survives a failing writer, no temporary debris is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import (
    atomic_dir,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from msfm.runtime.h5ad import write_h5ad_atomic
from msfm.runtime.safetensors import write_safetensors_atomic


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _debris(tmp_path) == []


def _failing_write(path: Path, mode: str, payload: str | bytes, error: Exception) -> None:
    with atomic_write(path, mode) as fh:  # type: ignore[arg-type]
        fh.write(payload)
        raise error


def _failing_dir(path: Path) -> None:
    with atomic_dir(path) as tmp:
        (tmp / "x.txt").write_text("partial")
        raise ValueError("fail")


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old content")
    with pytest.raises(RuntimeError, match="boom"):
        _failing_write(target, "w", "half of the new content", RuntimeError("boom"))
    assert target.read_text() == "old content"
    assert _debris(tmp_path) == []


def test_atomic_write_no_file_created_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(KeyError):
        _failing_write(target, "wb", b"x", KeyError("stop"))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_errors(tmp_path: Path) -> None:
    with (
        pytest.raises(MsfmInputError, match="does not exist"),
        atomic_write(tmp_path / "missing" / "f.txt", "w"),
    ):
        pass
    with pytest.raises(MsfmInputError, match="mode"), atomic_write(tmp_path / "f.txt", "a"):  # type: ignore[arg-type]
        pass


def test_atomic_write_json_round_trip_and_unserialisable(tmp_path: Path) -> None:
    target = tmp_path / "c.json"
    atomic_write_json(target, {"a": [1, 2], "b": None})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": None}
    with pytest.raises(MsfmInputError, match="JSON"):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": None}
    assert _debris(tmp_path) == []


def test_atomic_dir_builds_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "x.txt").write_text("v1")
        assert not target.exists(), "the target must not appear before the block ends"
    assert (target / "x.txt").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "y.txt").write_text("v2")
        # The old directory stays complete while the new one is being built.
        assert (target / "x.txt").read_text() == "v1"
    assert sorted(p.name for p in target.iterdir()) == ["y.txt"]
    assert _debris(tmp_path) == []


def test_atomic_dir_failure_keeps_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "x.txt").write_text("v1")
    with pytest.raises(ValueError, match="fail"):
        _failing_dir(target)
    assert (target / "x.txt").read_text() == "v1"
    assert _debris(tmp_path) == []


def test_atomic_dir_refuses_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(MsfmInputError, match="a file with that name exists"), atomic_dir(tmp_path / "f"):
        pass


def test_write_h5ad_atomic_and_input_guard(tmp_path: Path) -> None:
    adata = ad.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2))
    out = tmp_path / "out.h5ad"
    write_h5ad_atomic(adata, out)
    np.testing.assert_array_equal(ad.read_h5ad(out).X, adata.X)
    assert _debris(tmp_path) == []

    # The input being read is protected, whether given explicitly or through a backed AnnData.
    with pytest.raises(MsfmInputError, match="input file being read"):
        write_h5ad_atomic(adata, out, overwrite_input_guard=[out])
    with pytest.raises(MsfmInputError, match="input file being read"):
        write_h5ad_atomic(adata, tmp_path / "." / "out.h5ad", overwrite_input_guard=[str(out)])
    backed = ad.read_h5ad(out, backed="r")
    try:
        with pytest.raises(MsfmInputError, match="input file being read"):
            write_h5ad_atomic(backed.to_memory(), out, overwrite_input_guard=[backed.filename])
        with pytest.raises(MsfmInputError, match="input file being read"):
            write_h5ad_atomic(backed, out)
    finally:
        backed.file.close()
    np.testing.assert_array_equal(ad.read_h5ad(out).X, adata.X)


def test_write_safetensors_atomic_handles_aliases_and_views(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"w": base, "tied": base, "t": base.t(), "row": base[1]}
    path = write_safetensors_atomic(tensors, tmp_path / "m.safetensors", metadata={"k": "v"})
    loaded = load_file(path)
    for name, value in tensors.items():
        torch.testing.assert_close(loaded[name], value)
    with pytest.raises(MsfmInputError, match="str to str"):
        write_safetensors_atomic({"a": base}, tmp_path / "n.safetensors", metadata={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(MsfmInputError, match=r"expected a torch\.Tensor"):
        write_safetensors_atomic({"a": [1, 2]}, tmp_path / "n.safetensors")  # type: ignore[dict-item]


def test_read_config_file_formats_and_errors(tmp_path) -> None:
    from msfm.errors import MsfmInputError
    from msfm.runtime.config import read_config_file

    (tmp_path / "a.yaml").write_text("lr: 0.1\nsteps: 3\n")
    (tmp_path / "a.json").write_text('{"lr": 0.1}')
    (tmp_path / "empty.yml").write_text("")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.json").write_text("{not json")
    assert read_config_file(tmp_path / "a.yaml") == {"lr": 0.1, "steps": 3}
    assert read_config_file(tmp_path / "a.json") == {"lr": 0.1}
    assert read_config_file(tmp_path / "empty.yml") == {}
    with pytest.raises(MsfmInputError, match="mapping of XConfig fields"):
        read_config_file(tmp_path / "list.yaml", what="XConfig")
    with pytest.raises(MsfmInputError, match="Cannot parse"):
        read_config_file(tmp_path / "bad.json")
    with pytest.raises(MsfmInputError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
