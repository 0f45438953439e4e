"""Guards that keep the layering of ``docs/architecture.md``: data flows one way, families stay apart.

Every ``import`` in ``src/msfm`` counts, including imports inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "msfm"
FAMILIES = ("scfoundation", "scmulan", "roam", "gest")

# layer -> what it must not import (prefixes of msfm module names)
UPPER = ("msfm.cli", "msfm.demo", "msfm.bench", "msfm.view")
MODELS = (*(f"msfm.models.{f}" for f in FAMILIES), "msfm.models", "msfm.registry")
RULES: dict[str, tuple[str, ...]] = {
    # runtime imports nothing above it: only msfm.errors, msfm._version, msfm._lazy and itself
    "msfm.runtime": (
        "msfm.data", "msfm.datasets", "msfm.tokenizers", "msfm.nn", "msfm.engine", "msfm.eval", "msfm.pl",
        *MODELS, *UPPER,
    ),
    "msfm.nn": ("msfm.data", "msfm.datasets", "msfm.tokenizers", "msfm.engine", "msfm.eval", "msfm.pl", *MODELS, *UPPER),
    "msfm.data": ("msfm.tokenizers", "msfm.nn", "msfm.engine", "msfm.eval", "msfm.pl", *MODELS, *UPPER),
    "msfm.datasets": ("msfm.tokenizers", "msfm.nn", "msfm.engine", *MODELS, *UPPER),
    "msfm.tokenizers": ("msfm.nn", "msfm.engine", "msfm.eval", "msfm.pl", *MODELS, *UPPER),
    "msfm.engine": (*MODELS, *UPPER, "msfm.eval", "msfm.pl"),
    "msfm.eval": (*MODELS, *UPPER),
    "msfm.pl": (*MODELS, *UPPER),
    # the viewer is a top layer beside the CLI: it may use the families, but not the CLI, the demo or benchmarks
    "msfm.view": ("msfm.cli", "msfm.demo", "msfm.bench"),
    # a family imports no other family (msfm.registry and shared layers are fine), and never the CLI
    **{f"msfm.models.{f}": (*(f"msfm.models.{g}" for g in FAMILIES if g != f), *UPPER) for f in FAMILIES},
}  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # `from msfm import gest` imports the family module itself
            if mod in ("msfm", "msfm.models"):
                found += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
    # msfm.<family> is the lazy alias of msfm.models.<family>
    aliases = {f"msfm.{f}": f"msfm.models.{f}" for f in FAMILIES}
    out = []
    for line, m in found:
        head = ".".join(m.split(".")[:2])
        if head in aliases:
            m = aliases[head] + m[len(head) :]
        if m.startswith("msfm."):
            out.append((line, m))
    return out


def _violations() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        name = _module_name(path)
        for layer, forbidden in RULES.items():
            if name != layer and not name.startswith(layer + "."):
                continue
            for line, mod in _imports(path):
                if any(mod == bad or mod.startswith(bad + ".") for bad in forbidden):
                    out.append(f"{path.relative_to(SRC.parent)}:{line}: {layer} imports {mod}")
    return out


def test_no_forbidden_import() -> None:
    bad = _violations()
    assert not bad, "forbidden imports (see docs/architecture.md):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("msfm.nn.attention", "from msfm.data import CellSource\n"),
        ("msfm.models.gest.api", "def f():\n    from msfm.models.scmulan import api\n"),
        ("msfm.runtime.atomic", "import msfm.engine.trainer\n"),
        ("msfm.pl.spatial_figures", "from msfm import roam\n"),
        ("msfm.engine.trainer", "from ..cli import main\n"),
    ],
)
def test_the_guard_catches_each_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    # A planted forbidden import in a copy of the tree must be reported (the guard can fail).
    import shutil

    root = tmp_path / "msfm"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("resources", "__pycache__"))
    target = root.joinpath(*source.split(".")[1:]).with_suffix(".py")
    target.write_text(target.read_text(encoding="utf-8") + "\n" + message, encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.SRC", root)
    assert any(str(target.relative_to(root.parent)) in v for v in _violations())
