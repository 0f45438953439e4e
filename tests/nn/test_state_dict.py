"""State-dict helpers used by every converter."""

from __future__ import annotations

import torch

from msfm.nn.state_dict import check_layout, rename_keys, strip_prefix


def test_strip_prefix() -> None:
    t = torch.zeros(1)
    out = strip_prefix({"model.a": t, "b": t, "module._orig_mod.c": t}, ["module.", "_orig_mod.", "model."])
    assert set(out) == {"a", "b", "c"}
    assert strip_prefix({"model.model.x": t}, "model.") == {"x": t}


def test_rename_keys_reports_unknown_and_drops() -> None:
    t = torch.zeros(1)
    out, unknown = rename_keys({"a": t, "b": t, "counter": t}, {"a": "x"}, drop=["counter"])
    assert out == {"x": t}
    assert unknown == ["b"]


def test_check_layout() -> None:
    report = check_layout({"a": torch.zeros(2, 3), "c": torch.zeros(1)}, {"a": (3, 2), "b": (1,)})
    assert not report.ok
    assert report.missing == ["b"]
    assert report.unexpected == ["c"]
    assert report.shape_mismatches == [("a", (2, 3), (3, 2))]
    text = report.describe()
    assert "missing" in text
    assert "unexpected" in text
    assert "found [2, 3], expected [3, 2]" in text
    assert check_layout({"a": torch.zeros(1)}, {"a": (1,)}).ok
