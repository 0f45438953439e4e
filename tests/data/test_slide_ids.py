"""Slide ids name files: the shared check refuses every id that could leave its folder."""

from __future__ import annotations

import pytest

from msfm.data.slide_ids import check_slide_id, check_slide_ids
from msfm.errors import MsfmInputError


@pytest.mark.parametrize("good", ["S1", "TCGA-02-0001-01Z-00-DX1", "A01.svs", "slide 7", " padded "])
def test_good_ids_pass_stripped(good: str) -> None:
    assert check_slide_id(good) == good.strip()


@pytest.mark.parametrize("bad", ["", "  ", ".", "..", ".x", "../v", "a/b", "a\\b", "/abs", "a\x00b"])
def test_bad_ids_are_refused_with_the_source(bad: str) -> None:
    with pytest.raises(MsfmInputError, match=r"Invalid slide id .*\(table.csv, row 3\)"):
        check_slide_id(bad, "table.csv, row 3")


def test_list_check_keeps_order() -> None:
    assert check_slide_ids([" b", 3, "a"]) == ["b", "3", "a"]
    with pytest.raises(MsfmInputError):
        check_slide_ids(["ok", "../x"])
