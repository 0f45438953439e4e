"""Plain values for JSON and uns, the key_added convention, results, registries, deprecations, safe loading."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from msfm.errors import CheckpointError, MsfmInputError
from msfm.runtime.adata import check_key_added, field_key, obsm_key, store_uns
from msfm.runtime.deprecation import deprecated, moved_names
from msfm.runtime.devices import parse_devices
from msfm.runtime.jsonable import to_jsonable, to_uns
from msfm.runtime.loaded import Loaded
from msfm.runtime.registry import Registry
from msfm.runtime.results import Result
from msfm.runtime.safe_load import load_torch_file, unwrap_state_dict


def test_to_jsonable_and_to_uns_differ_only_where_their_targets_differ(tmp_path: Path) -> None:
    value = {
        "a": np.float32(1.5),
        "nan": math.nan,
        "none": None,
        "path": Path("x/y"),
        "t": (1, 2),
        "m": [1, "a"],
    }
    js = to_jsonable(value)
    assert js == {"a": 1.5, "nan": None, "none": None, "path": "x/y", "t": [1, 2], "m": [1, "a"]}
    json.dumps(js, allow_nan=False)
    uns = to_uns(value)
    assert uns["none"] == ""
    assert uns["m"] == {"0": 1, "1": "a"}
    assert uns["t"] == [1, 2]
    a = ad.AnnData(X=np.zeros((2, 2), np.float32))
    a.uns["rec"] = uns
    a.write_h5ad(tmp_path / "a.h5ad")  # storable


def test_key_added_is_one_prefix(tmp_path: Path) -> None:
    assert check_key_added("mulan") == "mulan"
    assert (obsm_key("mulan"), field_key("mulan", "confidence")) == ("X_mulan", "mulan_confidence")
    for bad, what in (
        ("a/b", "'/'"),
        ("X_scf", "Pass key_added='scf'"),
        ("", "non-empty"),
        (" a", "non-empty"),
    ):
        with pytest.raises(MsfmInputError, match=what):
            check_key_added(bad)
    a = ad.AnnData(X=np.zeros((2, 2), np.float32))
    store_uns(a, "k", "embed", {"x": None, "y": 1})
    store_uns(a, "k", "annotate", {"z": "b"})
    assert a.uns["k"] == {"embed": {"x": "", "y": 1}, "annotate": {"z": "b"}}
    a.write_h5ad(tmp_path / "a.h5ad")


@dataclass(frozen=True)
class _Toy(Result):
    cells: ad.AnnData
    table: pd.DataFrame
    arr: np.ndarray
    note: str
    n: int


def test_result_save_writes_each_field_atomically(tmp_path: Path) -> None:
    res = _Toy(ad.AnnData(X=np.ones((2, 3), np.float32)), pd.DataFrame({"a": [1, 2]}), np.arange(3), "hi", 7)
    out = res.save(tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == ["arr.npy", "cells.h5ad", "result.json", "table.csv"]
    assert json.loads((out / "result.json").read_text()) == {"type": "_Toy", "note": "hi", "n": 7}
    assert np.load(out / "arr.npy").tolist() == [0, 1, 2]
    with pytest.raises(MsfmInputError, match="already exists"):
        res.save(out)
    res.save(out, overwrite=True)
    with pytest.raises(AttributeError):
        res.note = "x"  # type: ignore[misc]


def test_registry_suggests_close_names() -> None:
    reg: Registry[int] = Registry("widget", hint="See widgets().")
    reg.register("Big_One", 1)
    assert reg.get("big-one") == 1
    assert "BIG_ONE" in reg
    with pytest.raises(
        MsfmInputError, match=r"Unknown widget 'big-on'. Did you mean 'big-one'\?.*See widgets"
    ):
        reg.get("big-on")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("big-one", 2)
    assert reg.names("big*") == ["big-one"]


def test_deprecations_name_the_new_call() -> None:
    @deprecated("old_fn", "msfm.x.new_fn")
    def old_fn(a: int) -> int:
        return a + 1

    with pytest.warns(DeprecationWarning, match=r"old_fn is deprecated.*use msfm.x.new_fn"):
        assert old_fn(1) == 2
    getattr_ = moved_names("pkg", {"thing": "msfm.runtime.devices:parse_devices"})
    with pytest.warns(DeprecationWarning, match="use msfm.runtime.devices.parse_devices"):
        assert getattr_("thing") is parse_devices
    with pytest.raises(AttributeError):
        getattr_("other")


@pytest.mark.parametrize(
    ("given", "want"),
    [("auto", "auto"), (None, "auto"), ("2", 2), ("-1", -1), (3, 3), ("0,1", [0, 1]), ([1], [1])],
)
def test_parse_devices_one_spelling(given: object, want: object) -> None:
    assert parse_devices(given) == want


def test_parse_devices_refuses_junk() -> None:
    for bad in ("gpu", "1.5", True, [0.5]):
        with pytest.raises(MsfmInputError, match="expected 'auto', a count"):
            parse_devices(bad)


def test_safe_loader_refuses_pickles_and_unwraps(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, good)
    state = unwrap_state_dict(load_torch_file(good, what="weights"), what="weights")
    assert list(state) == ["w"]

    class Evil:
        def __reduce__(self):  # runs on a full unpickle
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"weights_only=True.*never unpickles"):
        load_torch_file(evil, what="weights")
    with pytest.raises(CheckpointError, match=r"does not exist\. Get it here"):
        load_torch_file(tmp_path / "absent.pt", what="weights", hint="Get it here.")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_torch_file(tmp_path, what="weights")
    with pytest.raises(CheckpointError, match="expected a tensor"):
        unwrap_state_dict({"a": 1}, what="weights")


def test_loaded_moves_and_reads_meta() -> None:
    model = torch.nn.Linear(2, 2)
    loaded = Loaded(
        "toy", model, None, {"extra": {"a": 1}, "preprocessing": {"b": 2}}, None, torch.device("cpu")
    )
    assert loaded.extra == {"a": 1}
    assert loaded.preprocessing == {"b": 2}
    again = loaded.to("cpu")
    assert again.model is model
    assert "6 parameters" in repr(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert again.vocab is None
