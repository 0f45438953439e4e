"""Outputs of every verb: checked before compute, written atomically, never over the input, normal permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from msfm.errors import MsfmInputError
from msfm.runtime.atomic import atomic_path
from msfm.runtime.h5ad import check_output, write_output
from msfm.runtime.h5ad_stream import H5adResultWriter


def _adata() -> ad.AnnData:
    return ad.AnnData(X=np.arange(6, dtype=np.float32).reshape(3, 2))


def test_check_output_refuses_overlaps_and_existing_files(tmp_path: Path) -> None:
    data = tmp_path / "cells.h5ad"
    _adata().write_h5ad(data)
    folder = tmp_path / "visium"
    (folder / "spatial").mkdir(parents=True)
    assert check_output(None, overwrite=False, data=data) is None
    assert check_output(tmp_path / "new.h5ad", overwrite=False, data=data) == tmp_path / "new.h5ad"
    with pytest.raises(MsfmInputError, match="is the input file"):
        check_output(data, overwrite=True, data=data)
    with pytest.raises(MsfmInputError, match="lies inside the input folder"):
        check_output(folder / "out.h5ad", overwrite=True, data=folder)
    with pytest.raises(MsfmInputError, match="holds the input"):
        check_output(tmp_path, overwrite=True, data=data)
    (tmp_path / "taken.h5ad").write_text("x")
    with pytest.raises(MsfmInputError, match="already exists"):
        check_output(tmp_path / "taken.h5ad", overwrite=False, data=_adata())
    with pytest.raises(MsfmInputError, match="does not exist"):
        check_output(tmp_path / "no" / "dir.h5ad", overwrite=False)


def test_write_output_is_atomic_and_guards_the_input(tmp_path: Path) -> None:
    data = tmp_path / "cells.h5ad"
    _adata().write_h5ad(data)
    write_output(_adata(), tmp_path / "out.h5ad", data)
    assert ad.read_h5ad(tmp_path / "out.h5ad").shape == (3, 2)
    with pytest.raises(MsfmInputError, match="input file being read"):
        write_output(_adata(), data, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "out.h5ad"]  # no debris


def test_atomic_path_is_unpredictable_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "x.h5"
    with atomic_path(target, suffix=".h5") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name != target.name
        with h5py.File(tmp, "w") as h5:
            h5["a"] = np.arange(3)
    with h5py.File(target) as h5:
        assert h5["a"][:].tolist() == [0, 1, 2]
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode == 0o666 & ~_umask()

    def killed_mid_write() -> None:
        with atomic_path(tmp_path / "y.h5") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_mid_write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_streamed_writer_merges_uns_records_and_sets_normal_permissions(tmp_path: Path) -> None:
    src = tmp_path / "in.h5ad"
    a = _adata()
    a.uns["k"] = {"embed": {"old": 1}}
    a.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    with H5adResultWriter(src, out) as w:
        ds = w.create_obsm("X_k", 2)
        w.write_rows(ds, np.array([2, 0, 1]), np.ones((3, 2), np.float32))
        w.write_uns("k", "enhance", {"n": 3, "none": None})
    back = ad.read_h5ad(out)
    assert back.uns["k"]["embed"] == {"old": 1}
    assert back.uns["k"]["enhance"] == {"n": 3, "none": ""}
    assert back.obsm["X_k"].shape == (3, 2)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~_umask()
