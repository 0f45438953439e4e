"""Gene sets: read a GMT file, or take a ``{name: [genes]}`` mapping, into one checked form.

GMT (the MSigDB format): one set per line, ``name<TAB>description<TAB>gene<TAB>gene...``. Blank lines are skipped,
empty fields (trailing tabs) are dropped, a gene repeated within a set counts once. Everything else that does not
fit is an error naming the file, the line and the fix: a missing or empty file, a line without genes, bytes that
are not UTF-8, two sets with one name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from msfm.errors import MsfmInputError

__all__ = ["GeneSetsLike", "as_gene_sets", "read_gmt"]

#: A GMT path or a mapping ``{set name: genes}``.
GeneSetsLike = str | os.PathLike[str] | Mapping[str, Iterable[str]]

_GMT_FIX = "Each line of a GMT file is: set name<TAB>description<TAB>gene1<TAB>gene2..."


def read_gmt(path: str | os.PathLike[str]) -> dict[str, tuple[str, ...]]:
    """The gene sets of a GMT file, in file order.

    Returns:
        ``{set name: genes}`` (genes in file order, each once).

    Raises:
        MsfmInputError: the file is missing, not a file, empty, not UTF-8, has a line with fewer than three fields
            or without genes, or names one set twice.
    """
    p = Path(path)
    if not p.exists():
        msg = f"Gene set file {p} does not exist. Pass the path of a GMT file ({_GMT_FIX})."
        raise MsfmInputError(msg)
    if not p.is_file():
        msg = f"Gene set path {p} is not a file. Pass the path of a GMT file ({_GMT_FIX})."
        raise MsfmInputError(msg)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        msg = (
            f"Gene set file {p} is not UTF-8 text: byte {raw[exc.start : exc.start + 1]!r} on line {line}. "
            "Save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or pass gene_sets as a dict {name: [genes]}."
        )
        raise MsfmInputError(msg) from None
    sets: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        name = fields[0]
        genes = [g for g in fields[2:] if g]
        if len(fields) < 3 or not name or not genes:
            shown = line if len(line) <= 80 else line[:77] + "..."
            msg = (
                f"Gene set file {p}, line {number}: {shown!r} has no set name or no genes "
                f"({len(fields)} tab-separated field(s)). {_GMT_FIX} Spaces do not separate fields."
            )
            raise MsfmInputError(msg)
        if name in sets:
            msg = (
                f"Gene set file {p}: the set name {name!r} appears on line {first_line[name]} and again on line "
                f"{number}. Give every set its own name (or merge the two lines)."
            )
            raise MsfmInputError(msg)
        sets[name] = tuple(dict.fromkeys(genes))
        first_line[name] = number
    if not sets:
        msg = f"Gene set file {p} holds no gene set (it is empty or blank). {_GMT_FIX}"
        raise MsfmInputError(msg)
    return sets


def as_gene_sets(gene_sets: GeneSetsLike | Any) -> dict[str, tuple[str, ...]]:
    """Gene sets from a GMT path or a mapping ``{name: [genes]}``, checked the same way.

    Raises:
        MsfmInputError: see :func:`read_gmt`; for a mapping: no set, a name that is not a non-empty string, a set
            given as one string instead of a list, or a set without genes.
    """
    if isinstance(gene_sets, str | os.PathLike):
        return read_gmt(gene_sets)
    if not isinstance(gene_sets, Mapping):
        msg = (
            f"gene_sets must be a GMT file path or a dict {{name: [genes]}}; got {type(gene_sets).__name__}. "
            "Pass e.g. gene_sets='hallmark.gmt' or gene_sets={'ISG': ['ISG15', 'MX1']}."
        )
        raise MsfmInputError(msg)
    if not gene_sets:
        msg = "gene_sets is an empty dict; give at least one set, e.g. {'ISG': ['ISG15', 'MX1']}."
        raise MsfmInputError(msg)
    out: dict[str, tuple[str, ...]] = {}
    for name, genes in gene_sets.items():
        if not isinstance(name, str) or not name.strip():
            msg = f"gene_sets has the set name {name!r}; set names must be non-empty strings."
            raise MsfmInputError(msg)
        if isinstance(genes, str | bytes):
            msg = (
                f"gene_sets[{name!r}] is one string ({genes[:40]!r}); expected a list of gene symbols, "
                f"e.g. {{{name!r}: ['ISG15', 'MX1']}}."
            )
            raise MsfmInputError(msg)
        try:
            symbols = [str(g).strip() for g in genes]
        except TypeError:
            msg = f"gene_sets[{name!r}] is a {type(genes).__name__}; expected a list of gene symbols."
            raise MsfmInputError(msg) from None
        symbols = [g for g in symbols if g]
        if not symbols:
            msg = f"gene_sets[{name!r}] has no genes; give each set at least one gene symbol."
            raise MsfmInputError(msg)
        out[name] = tuple(dict.fromkeys(symbols))
    return out
