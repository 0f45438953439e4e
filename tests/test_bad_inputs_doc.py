"""docs/bad-inputs.md names, for every bad input and fault, the tests that hold it: they must all exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-inputs.md"
NODE = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _rows() -> list[str]:
    return [
        line
        for line in DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and "---" not in line
    ]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_case_row_names_at_least_one_test():
    case_rows = [
        r for r in _rows() if r.count("|") >= 4 and not r.startswith("| case") and not r.startswith("| class")
    ]
    assert len(case_rows) >= 25
    missing = [r.split("|")[1].strip() for r in case_rows if not NODE.search(r)]
    assert not missing, f"rows without a test: {missing}"


def test_every_named_test_exists():
    nodes = NODE.findall(DOC.read_text(encoding="utf-8"))
    assert len(nodes) >= 60
    absent = []
    cache: dict[str, set[str]] = {}
    for file, name in nodes:
        path = ROOT / file
        if not path.is_file():
            absent.append(f"{file} (no such file)")
            continue
        if name not in cache.setdefault(file, _test_names(path)):
            absent.append(f"{file}::{name}")
    assert not absent, f"docs/bad-inputs.md names tests that do not exist: {absent}"
