"""Gene sets: the GMT reader and the dict form, with one test per bad file."""

from __future__ import annotations

import pytest

from msfm.data.gene_sets import as_gene_sets, read_gmt
from msfm.errors import MsfmInputError


def _gmt(tmp_path, text: str | bytes, name: str = "sets.gmt"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_gmt_sets_in_file_order(tmp_path):
    path = _gmt(
        tmp_path,
        "ISG\thttp://x\tISG15\tMX1\tISG15\t\n\nB_CELL\tmarkers\tMS4A1\tCD79A\n",
    )
    sets = read_gmt(path)
    assert list(sets) == ["ISG", "B_CELL"]
    assert sets["ISG"] == ("ISG15", "MX1")  # repeated gene once, trailing tab dropped
    assert sets["B_CELL"] == ("MS4A1", "CD79A")
    assert as_gene_sets(str(path)) == sets


def test_read_gmt_accepts_a_byte_order_mark(tmp_path):
    path = _gmt(tmp_path, "\ufeffISG\t\tISG15\tMX1\n")
    assert list(read_gmt(path)) == ["ISG"]


def test_gmt_missing_file(tmp_path):
    with pytest.raises(MsfmInputError, match="does not exist"):
        read_gmt(tmp_path / "nope.gmt")


def test_gmt_empty_file(tmp_path):
    with pytest.raises(MsfmInputError, match="holds no gene set"):
        read_gmt(_gmt(tmp_path, "\n  \n"))


def test_gmt_malformed_line(tmp_path):
    # space-separated instead of tab-separated: one field, no genes
    with pytest.raises(MsfmInputError, match=r"line 2: .* no set name or no genes"):
        read_gmt(_gmt(tmp_path, "A\tdesc\tG1\nB desc G2 G3\n"))
    with pytest.raises(MsfmInputError, match="line 1"):
        read_gmt(_gmt(tmp_path, "A\tdesc\t\t\n"))


def test_gmt_not_utf8(tmp_path):
    with pytest.raises(MsfmInputError, match=r"not UTF-8 text: byte b'\\xe9' on line 2"):
        read_gmt(_gmt(tmp_path, b"A\td\tG1\nCaf\xe9\td\tG2\n"))


def test_gmt_duplicate_set_names(tmp_path):
    with pytest.raises(MsfmInputError, match="'A' appears on line 1 and again on line 3"):
        read_gmt(_gmt(tmp_path, "A\td\tG1\nB\td\tG2\nA\td\tG3\n"))


def test_dict_gene_sets_checked():
    assert as_gene_sets({"S": ["A", " B ", "A"]}) == {"S": ("A", "B")}
    with pytest.raises(MsfmInputError, match="one string"):
        as_gene_sets({"S": "ISG15"})
    with pytest.raises(MsfmInputError, match="has no genes"):
        as_gene_sets({"S": []})
    with pytest.raises(MsfmInputError, match="empty dict"):
        as_gene_sets({})
    with pytest.raises(MsfmInputError, match="GMT file path or a dict"):
        as_gene_sets(["ISG15"])
