"""Gene panels and gene-name harmonisation.

A :class:`GenePanel` is the ordered gene vocabulary of a model (scFoundation: 19,264 HGNC symbols). Input data name
their genes in many ways (current symbols, old symbols, aliases, Ensembl ids, mouse symbols);
:func:`harmonize_genes` maps them onto a panel and returns a :class:`GeneMapping` that re-indexes count matrices
column-wise and reports what was matched and how.

Matching tiers, in priority order (a panel gene claimed by two input genes keeps the higher tier):

1. ``exact``: the input symbol is a panel symbol.
2. ``ensembl_id``: the Ensembl gene id (version suffix stripped) has a GENCODE v44 symbol (celltypist's shipped
   ``GENCODEv44_Gene_id2name.csv``) that is a panel symbol, directly or through tier 4.
3. ``ortholog`` (only with ``species="mouse"``): the mouse symbol has exactly one human ortholog (celltypist's
   ``Ensembl105_Human2Mouse_Genes.csv``) that is a panel symbol, directly or through tier 5. Curated orthology
   ranks above the case-insensitive heuristic for mouse data.
4. ``case_insensitive``: the upper-cased input symbol equals exactly one upper-cased panel symbol.
5. ``alias``: the input symbol is a previous or alias HGNC symbol of exactly one gene whose name is in the panel
   (msfm's shipped HGNC table, see ``resources/genes/README.md``). A name that is some gene's approved symbol
   never maps through another gene's alias, and ambiguous aliases are not used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from msfm.data.resources import (
    HGNC_GENE_NAMES_SHA256,
    SCFOUNDATION_GENES_SHA256,
    package_data_file,
    package_version,
    resource_path,
    sha256_file,
)
from msfm.errors import MsfmInputError
from msfm.runtime.jsonable import to_uns

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "GeneMapping", "GenePanel", "harmonize_genes"]

#: Matching methods in priority order (lower index wins a conflict).
METHODS = ("exact", "ensembl_id", "ortholog", "case_insensitive", "alias")
_PRIORITY = {m: i for i, m in enumerate(METHODS)}

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?(_PAR_Y)?$")
_SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "gene_name",
    "gene_names",
    "symbol",
    "symbols",
)
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl_gene_id", "feature_id")
_GENCODE_FILE = "data/samples/GENCODEv44_Gene_id2name.csv"
_ORTHOLOG_FILE = "data/samples/Ensembl105_Human2Mouse_Genes.csv"
_MAX_EXAMPLES = 20
_MAX_CONFLICTS = 50


# --------------------------------------------------------------------------------------------------------------
# Gene panel
# --------------------------------------------------------------------------------------------------------------


class GenePanel:
    """An ordered, hashed list of unique gene symbols: a model's gene vocabulary.

    Args:
        symbols: gene symbols in model order (position ``i`` = gene id ``i``).
        name: short name recorded in reports and checkpoints.

    Raises:
        MsfmInputError: if the list is empty or has duplicated or empty symbols.

    Example:
        >>> panel = GenePanel.scfoundation()
        >>> len(panel), panel.symbols[0], panel.index_of("ACTB")
        (19264, 'A1BG', 203)
    """

    def __init__(self, symbols: Iterable[str], *, name: str = "custom") -> None:
        symbols = tuple(str(s) for s in symbols)
        if not symbols:
            msg = "A GenePanel needs at least one gene symbol; received an empty list."
            raise MsfmInputError(msg)
        counts = Counter(symbols)
        dups = [s for s, c in counts.items() if c > 1]
        if dups:
            msg = (
                f"A GenePanel needs unique symbols; received {len(dups)} duplicated: {dups[:10]}. "
                "Remove the duplicates (each symbol must name exactly one model position)."
            )
            raise MsfmInputError(msg)
        if any(not s.strip() for s in symbols):
            msg = "A GenePanel cannot contain empty symbols; remove the empty entries."
            raise MsfmInputError(msg)
        self._symbols = symbols
        self._index = {s: i for i, s in enumerate(symbols)}
        self.name = name

    @classmethod
    @functools.cache
    def scfoundation(cls) -> GenePanel:
        """The official scFoundation panel (19,264 genes), read from the shipped TSV with its checksum verified."""
        path = resource_path("scfoundation", "OS_scRNA_gene_index.19264.tsv")
        digest = sha256_file(path)
        if digest != SCFOUNDATION_GENES_SHA256:
            msg = (
                f"The shipped scFoundation gene list {path} has sha256 {digest}, expected {SCFOUNDATION_GENES_SHA256}. "
                "The file was modified or corrupted: reinstall msfm."
            )
            raise MsfmInputError(msg)
        table = pd.read_csv(
            path, sep="\t", dtype={"gene_name": str, "index": np.int64}, keep_default_na=False
        )
        order = table["index"].to_numpy()
        if not np.array_equal(order, np.arange(len(table))):
            msg = f"{path}: the 'index' column must run 0..n-1 in file order; reinstall msfm."
            raise MsfmInputError(msg)
        return cls(table["gene_name"], name="scfoundation_19264")

    @classmethod
    def from_file(cls, path: str | Path, *, column: str | None = None, name: str | None = None) -> GenePanel:
        """Read a panel from a text file.

        Args:
            path: a TSV/CSV with a header (the symbol column is ``column``, else ``gene_name``/``gene``/``symbol``,
                else the first column) or a plain list with one symbol per line (``.txt``).
            column: the column holding the symbols.
            name: panel name (default: the file stem).

        Returns:
            The panel in file order.

        Raises:
            MsfmInputError: if the file is missing or the column is not there.
        """
        path = Path(path)
        if not path.is_file():
            msg = f"Gene panel file {str(path)!r} does not exist; pass the path of a TSV/CSV/TXT gene list."
            raise MsfmInputError(msg)
        name = name or path.stem
        if path.suffix == ".txt" and column is None:
            symbols = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            return cls(symbols, name=name)
        sep = "," if path.suffix == ".csv" else "\t"
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        if column is None:
            column = next(
                (c for c in ("gene_name", "gene", "symbol") if c in table.columns), table.columns[0]
            )
        if column not in table.columns:
            msg = (
                f"{path}: no column {column!r}; columns are {list(table.columns)}. Pass column=<one of them>."
            )
            raise MsfmInputError(msg)
        return cls(table[column], name=name)

    @classmethod
    def from_symbols(cls, symbols: Sequence[str], *, name: str = "custom") -> GenePanel:
        """Build a panel from a sequence of symbols (same as the constructor)."""
        return cls(symbols, name=name)

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbols in model order."""
        return self._symbols

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the newline-joined symbols: identifies the panel content and order."""
        return hashlib.sha256("\n".join(self._symbols).encode()).hexdigest()

    def index_of(self, symbol: str) -> int:
        """Position of ``symbol`` in the panel.

        Raises:
            MsfmInputError: if the symbol is not in the panel.
        """
        try:
            return self._index[symbol]
        except KeyError:
            msg = f"Gene {symbol!r} is not in the panel {self.name!r} ({len(self)} genes)."
            raise MsfmInputError(msg) from None

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._index

    def __len__(self) -> int:
        return len(self._symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenePanel) and self._symbols == other._symbols

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        return f"GenePanel(name={self.name!r}, n_genes={len(self)}, sha256={self.sha256[:12]}...)"


# --------------------------------------------------------------------------------------------------------------
# Offline lookup tables (cached per process)
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _gencode_id_to_symbol() -> dict[str, str]:
    path = package_data_file("celltypist", _GENCODE_FILE)
    table = pd.read_csv(path, header=None, names=["id", "symbol"], dtype=str, keep_default_na=False)
    table = table[table["symbol"] != ""].drop_duplicates("id")
    return dict(zip(table["id"], table["symbol"], strict=True))


@functools.cache
def _mouse_to_human() -> dict[str, str]:
    """Mouse symbol -> its single human ortholog (one-to-many orthologs are ambiguous and left out)."""
    path = package_data_file("celltypist", _ORTHOLOG_FILE)
    table = pd.read_csv(path, header=None, names=["human", "mouse"], dtype=str, keep_default_na=False)
    table = table[(table["human"] != "") & (table["mouse"] != "")].drop_duplicates()
    n_human = table.groupby("mouse")["human"].transform("nunique")
    table = table[n_human == 1]
    return dict(zip(table["mouse"], table["human"], strict=True))


@functools.cache
def _hgnc_names() -> pd.DataFrame:
    path = resource_path("genes", "hgnc_gene_names.tsv.gz")
    digest = sha256_file(path)
    if digest != HGNC_GENE_NAMES_SHA256:
        msg = (
            f"The shipped HGNC gene-name table {path} has sha256 {digest}, expected {HGNC_GENE_NAMES_SHA256}. "
            "Reinstall msfm, or pass use_aliases=False to harmonise without it."
        )
        raise MsfmInputError(msg)
    return pd.read_csv(
        path, sep="\t", dtype={"hgnc_id": np.int64, "name": str, "kind": str}, keep_default_na=False
    )


@functools.lru_cache(maxsize=8)
def _alias_map(panel: GenePanel) -> dict[str, str]:
    """Non-panel name -> panel symbol via HGNC previous/alias symbols, for one panel.

    A gene "owns" the panel symbol that is its approved name (else its unique previous name in the panel). A name is
    resolved through the genes where it has its strongest kind (approved > previous > alias): exactly one such gene
    with a panel symbol maps; several genes make it ambiguous and it is dropped.
    """
    table = _hgnc_names()
    rank = table["kind"].map({"approved": 0, "previous": 1, "alias": 2}).to_numpy()
    in_panel = table["name"].isin(set(panel.symbols)).to_numpy()
    owner = table[in_panel & (rank <= 1)].assign(rank=rank[in_panel & (rank <= 1)])
    owner = owner[owner["rank"] == owner.groupby("hgnc_id")["rank"].transform("min")]
    owner = owner[owner.groupby("hgnc_id")["name"].transform("size") == 1]
    gene_to_panel = dict(zip(owner["hgnc_id"], owner["name"], strict=True))

    names = table.assign(rank=rank)
    names = names[names["rank"] == names.groupby("name")["rank"].transform("min")]
    names = names[names.groupby("name")["hgnc_id"].transform("nunique") == 1]
    names = names.assign(target=names["hgnc_id"].map(gene_to_panel)).dropna(subset=["target"])
    names = names[~names["name"].isin(set(panel.symbols))]
    return dict(zip(names["name"], names["target"], strict=True))


@functools.lru_cache(maxsize=8)
def _upper_map(panel: GenePanel) -> dict[str, str]:
    upper = Counter(s.upper() for s in panel.symbols)
    return {s.upper(): s for s in panel.symbols if upper[s.upper()] == 1}


def _strip_version(gene_id: str) -> str:
    return gene_id.split(".", 1)[0] if gene_id.startswith("ENS") else gene_id


def _is_ensembl(values: Iterable[Any]) -> np.ndarray:
    return np.array([isinstance(v, str) and bool(_ENSEMBL_RE.match(v)) for v in values], dtype=bool)


# --------------------------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GeneMapping:
    """How input genes (columns of a count matrix) map onto a :class:`GenePanel`.

    Attributes:
        panel: the target panel.
        input_names: the input gene names (``var_names``), in input column order.
        input_to_panel: ``[n_input]`` int64 panel position of each input gene, ``-1`` where unmapped.
        methods: ``[n_input]`` matching method of each input gene (``""`` where unmapped).
        report: JSON-serialisable coverage report (see :func:`harmonize_genes`).
    """

    panel: GenePanel
    input_names: np.ndarray
    input_to_panel: np.ndarray
    methods: np.ndarray
    report: dict[str, Any] = field(repr=False)

    @property
    def n_input(self) -> int:
        """Number of input genes."""
        return len(self.input_names)

    @property
    def n_mapped(self) -> int:
        """Number of input genes that map onto a panel gene."""
        return int((self.input_to_panel >= 0).sum())

    def apply(self, matrix: sp.spmatrix | sp.sparray | np.ndarray) -> sp.csr_matrix:
        """Re-index the columns of a cells x input-genes matrix into panel order (no densifying).

        Unmapped input genes are dropped; panel genes absent from the input are implicit zeros. The values are copied
        unchanged (a pure index remap), so the dtype is kept.

        Args:
            matrix: ``[n, n_input]`` sparse or dense matrix whose columns follow ``input_names``.

        Returns:
            ``[n, len(panel)]`` CSR matrix with sorted indices.

        Raises:
            MsfmInputError: if the number of columns differs from the number of input genes.
        """
        csr = matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))
        if csr.shape[1] != self.n_input:
            msg = (
                f"GeneMapping.apply received a matrix with {csr.shape[1]} columns, but the mapping was built for "
                f"{self.n_input} input genes. Apply it to the matrix whose var_names were harmonised "
                "(same genes, same order)."
            )
            raise MsfmInputError(msg)
        target = self.input_to_panel[csr.indices]
        keep = target >= 0
        row_of = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        counts = np.bincount(row_of[keep], minlength=csr.shape[0])
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out = sp.csr_matrix((csr.data[keep], target[keep], indptr), shape=(csr.shape[0], len(self.panel)))
        out.sort_indices()
        return out

    def to_frame(self) -> pd.DataFrame:
        """Per input gene: the panel symbol it maps to (or ``None``) and the method."""
        symbols = np.asarray(self.panel.symbols, dtype=object)
        panel_gene = np.where(self.input_to_panel >= 0, symbols[np.maximum(self.input_to_panel, 0)], None)
        return pd.DataFrame(
            {"panel_gene": panel_gene, "method": np.where(self.methods == "", None, self.methods)},
            index=pd.Index(self.input_names, name="input_gene"),
        )

    def to_uns(self) -> dict[str, Any]:
        """The report in a form ``adata.write_h5ad`` accepts, for ``adata.uns[key]["gene_mapping"]``.

        h5ad cannot store ``None`` or lists of dicts, so ``None`` becomes ``""`` and ``conflicts`` becomes a dict
        of columns (``panel_gene``, ``kept``, ``kept_method``, ``dropped``, ``dropped_method``).
        """
        out = to_uns({k: v for k, v in self.report.items() if k != "conflicts"})
        columns = ("panel_gene", "kept", "kept_method", "dropped", "dropped_method")
        out["conflicts"] = {c: [str(row[c]) for row in self.report["conflicts"]] for c in columns}
        return out


@dataclass
class _Inputs:
    names: np.ndarray  # var_names (display)
    symbols: np.ndarray  # symbol per gene or None
    ensembl: np.ndarray  # version-stripped Ensembl id per gene or None
    symbol_source: str
    id_source: str | None


def _read_inputs(var: Any, gene_column: str | None, panel: GenePanel) -> _Inputs:
    if hasattr(var, "var") and hasattr(var, "var_names"):  # an AnnData
        var = var.var
    if isinstance(var, pd.DataFrame):
        names = var.index.astype(str).to_numpy(dtype=object)
        columns = var
    else:
        names = pd.Index([str(v) for v in var]).to_numpy(dtype=object)
        columns = pd.DataFrame(index=names)
    if len(names) == 0:
        msg = "harmonize_genes received 0 input genes; expected the var_names (or var DataFrame) of the data."
        raise MsfmInputError(msg)

    names_are_ids = _is_ensembl(names).mean() > 0.5
    if gene_column is not None:
        if gene_column not in columns.columns:
            msg = (
                f"gene_column={gene_column!r} is not a column of var; available: {list(columns.columns)}. "
                "Pass the column that holds gene symbols, or gene_column=None to use var_names."
            )
            raise MsfmInputError(msg)
        symbols = columns[gene_column].to_numpy(dtype=object)
        symbol_source = f"var[{gene_column!r}]"
    else:
        # var_names, or a conventional symbol column when it names more panel genes (CELLxGENE: Ensembl var_names
        # + feature_name; scanpy read_10x_h5(var_names="gene_ids"): ids + gene_symbols).
        symbols, symbol_source = names.copy(), "var_names"
        best = -1 if names_are_ids else sum(n in panel for n in names)
        for col in (c for c in _SYMBOL_COLUMNS if c in columns.columns):
            values = columns[col].astype(str).to_numpy(dtype=object)
            hits = sum(v in panel for v in values)
            if hits > best:
                symbols, symbol_source, best = values, f"var[{col!r}]", hits
    symbols = np.array(
        [s if isinstance(s, str) and s and not _ENSEMBL_RE.match(s) else None for s in symbols], dtype=object
    )

    ensembl = np.full(len(names), None, dtype=object)
    id_source = None
    for col in _ID_COLUMNS:
        if col in columns.columns:
            values = columns[col].to_numpy(dtype=object)
            if _is_ensembl(values).mean() > 0.5:
                ensembl = values
                id_source = f"var[{col!r}]"
                break
    if id_source is None and names_are_ids:
        ensembl, id_source = names, "var_names"
    ok = _is_ensembl(ensembl)
    ensembl = np.array(
        [_strip_version(e) if k else None for e, k in zip(ensembl, ok, strict=True)], dtype=object
    )
    return _Inputs(names, symbols, ensembl, symbol_source, id_source)


def harmonize_genes(
    var: pd.DataFrame | pd.Index | Sequence[str] | Any,
    panel: GenePanel,
    *,
    gene_column: str | None = None,
    species: Literal["human", "mouse"] = "human",
    use_aliases: bool = True,
    min_panel_fraction: float = 0.01,
    warn_panel_fraction: float = 0.5,
) -> GeneMapping:
    """Map input genes onto a gene panel (symbols, Ensembl ids, case, HGNC aliases, mouse orthologs).

    Args:
        var: ``adata.var`` (preferred: Ensembl id and symbol columns are used), ``adata.var_names``, a list of
            names, or an AnnData.
        panel: the target panel, e.g. :meth:`GenePanel.scfoundation`.
        gene_column: ``var`` column holding gene symbols. Default: ``var_names``, or the column among
            ``gene_symbols``/``feature_name``/``gene_name``/``symbol`` that names more panel genes (always such a
            column when ``var_names`` are Ensembl ids). Ensembl ids
            are taken from ``gene_ids``/``gene_id``/``ensembl_id``/``feature_id`` or from Ensembl-like ``var_names``.
        species: ``"mouse"`` enables the mouse -> human ortholog tier.
        use_aliases: use the shipped HGNC previous/alias symbol table (tier ``alias``).
        min_panel_fraction: below this fraction of panel genes found, raise.
        warn_panel_fraction: below this fraction of panel genes found, warn.

    Returns:
        The :class:`GeneMapping`. Its ``report`` holds ``n_input_genes``, ``n_mapped``, ``n_panel``,
        ``fraction_of_panel_found``, ``matched_by_method``, ``n_unmatched``, ``unmatched_examples`` (<= 20),
        ``n_conflicts`` and ``conflicts`` (<= 50; two input genes for one panel gene, the higher tier is kept),
        plus the panel name/sha256 and the options.

    Raises:
        MsfmInputError: bad options, no input genes, or fewer than ``min_panel_fraction`` of the panel found (the
            message gives the fraction, unmatched examples and the likely cause).
    """
    if species not in ("human", "mouse"):
        msg = f"species={species!r} is not supported; expected 'human' or 'mouse'."
        raise MsfmInputError(msg)
    if not 0.0 <= min_panel_fraction <= warn_panel_fraction <= 1.0:
        msg = (
            f"Expected 0 <= min_panel_fraction <= warn_panel_fraction <= 1; received {min_panel_fraction} and "
            f"{warn_panel_fraction}."
        )
        raise MsfmInputError(msg)
    inputs = _read_inputs(var, gene_column, panel)
    n = len(inputs.names)
    index = panel._index
    upper = _upper_map(panel)
    aliases = _alias_map(panel) if use_aliases else {}
    id_to_symbol = _gencode_id_to_symbol() if any(e is not None for e in inputs.ensembl) else {}
    orthologs = _mouse_to_human() if species == "mouse" else {}

    def via_symbol(symbol: str, *, allow_alias: bool) -> int:
        pos = index.get(symbol, -1)
        if pos < 0 and allow_alias and symbol in aliases:
            pos = index[aliases[symbol]]
        return pos

    candidate = np.full(n, -1, dtype=np.int64)
    methods = np.full(n, "", dtype=object)
    for i in range(n):
        symbol, gene_id = inputs.symbols[i], inputs.ensembl[i]
        pos, method = -1, ""
        if symbol is not None and symbol in index:
            pos, method = index[symbol], "exact"
        if pos < 0 and gene_id is not None and gene_id in id_to_symbol:
            pos, method = via_symbol(id_to_symbol[gene_id], allow_alias=use_aliases), "ensembl_id"
        if pos < 0 and symbol is not None and symbol in orthologs:
            pos, method = via_symbol(orthologs[symbol], allow_alias=use_aliases), "ortholog"
        if pos < 0 and symbol is not None and symbol.upper() in upper:
            pos, method = index[upper[symbol.upper()]], "case_insensitive"
        if pos < 0 and symbol is not None and symbol in aliases:
            pos, method = index[aliases[symbol]], "alias"
        if pos >= 0:
            candidate[i], methods[i] = pos, method

    # Resolve conflicts: per panel gene keep the best tier, then the first input column.
    input_to_panel = np.full(n, -1, dtype=np.int64)
    conflicts: list[dict[str, Any]] = []
    winner: dict[int, int] = {}
    order = sorted(np.flatnonzero(candidate >= 0), key=lambda i: (_PRIORITY[methods[i]], i))
    for i in order:
        pos = int(candidate[i])
        if pos in winner:
            j = winner[pos]
            conflicts.append(
                {
                    "panel_gene": panel.symbols[pos],
                    "kept": str(inputs.names[j]),
                    "kept_method": str(methods[j]),
                    "dropped": str(inputs.names[i]),
                    "dropped_method": str(methods[i]),
                }
            )
            methods[i] = ""
        else:
            winner[pos] = i
            input_to_panel[i] = pos
    unmatched = [str(inputs.names[i]) for i in range(n) if input_to_panel[i] < 0 and candidate[i] < 0]
    n_mapped = int((input_to_panel >= 0).sum())
    fraction = n_mapped / len(panel)
    by_method = Counter(methods[input_to_panel >= 0])
    report: dict[str, Any] = {
        "panel": panel.name,
        "panel_sha256": panel.sha256,
        "n_input_genes": n,
        "n_mapped": n_mapped,
        "n_panel": len(panel),
        "fraction_of_panel_found": round(fraction, 6),
        "matched_by_method": {m: int(by_method.get(m, 0)) for m in METHODS},
        "n_unmatched": len(unmatched),
        "unmatched_examples": unmatched[:_MAX_EXAMPLES],
        "n_conflicts": len(conflicts),
        "conflicts": conflicts[:_MAX_CONFLICTS],
        "symbol_source": inputs.symbol_source,
        "ensembl_id_source": inputs.id_source,
        "species": species,
        "use_aliases": use_aliases,
        "resources": _resource_versions(use_aliases=use_aliases),
    }
    mapping = GeneMapping(panel, inputs.names, input_to_panel, methods.astype(str), report)
    logger.info(
        "gene harmonisation: %d/%d input genes mapped, %.1f%% of panel %s (%s)",
        n_mapped,
        n,
        100 * fraction,
        panel.name,
        report["matched_by_method"],
    )

    _warn_mouse_case(inputs, by_method, n_mapped, species)
    if fraction < min_panel_fraction:
        msg = (
            f"Only {n_mapped} of {len(panel)} panel genes ({fraction:.2%}) were found in the {n} input genes; at least "
            f"{min_panel_fraction:.2%} is required (min_panel_fraction). Unmatched examples: {unmatched[:10]}. "
            f"{_likely_cause(inputs, species)}"
        )
        raise MsfmInputError(msg)
    if fraction < warn_panel_fraction:
        warnings.warn(
            f"Only {fraction:.1%} of the {len(panel)} panel genes ({n_mapped}) were found in the input "
            f"({n} genes, {len(unmatched)} unmatched, e.g. {unmatched[:5]}). Missing panel genes are treated as zero "
            "expression, which can degrade embeddings; a full transcriptome (not only highly variable genes) is best.",
            UserWarning,
            stacklevel=2,
        )
    return mapping


_MOUSE_SYMBOL = re.compile(r"^[A-Z][a-z0-9]+[a-z0-9-]*$")


def _mouse_like_fraction(names: Iterable[Any]) -> float:
    """Share of symbols written as mouse genes are (capital then lower case: 'Actb', 'Cd3e')."""
    flags = [bool(_MOUSE_SYMBOL.match(s)) and s != s.upper() for s in names if isinstance(s, str) and s]
    return float(np.mean(flags)) if flags else 0.0


def _warn_mouse_case(inputs: _Inputs, by_method: Counter, n_mapped: int, species: str) -> None:
    """Warn when human mapping leaned on case folding for symbols that look like mouse genes."""
    n_case = int(by_method.get("case_insensitive", 0))
    if species != "human" or n_mapped == 0 or n_case <= 0.5 * n_mapped:
        return
    if _mouse_like_fraction(inputs.symbols) <= 0.5:
        return
    examples = [s for s in inputs.symbols if isinstance(s, str) and _MOUSE_SYMBOL.match(s)][:3]
    warnings.warn(
        f"{n_case} of the {n_mapped} matched genes matched only after case folding, and the symbols look like mouse "
        f"genes (e.g. {examples}). Mapped as human genes of the same name, mouse genes without a same-named human "
        "ortholog are lost or mismatched. If the data are from mouse, pass species='mouse' (CLI: --species mouse) "
        "to map them through curated orthologs; if they are human, ignore this warning.",
        UserWarning,
        stacklevel=3,
    )


def _likely_cause(inputs: _Inputs, species: str) -> str:
    names = [str(s) for s in inputs.names]
    ids = _is_ensembl(names)
    if ids.mean() > 0.5:
        if any(s.startswith("ENSMUSG") for s in names):
            return (
                "Likely cause: var_names are mouse Ensembl ids (ENSMUSG...), which msfm cannot map offline. "
                "Pass gene_column=<column with mouse gene symbols> and species='mouse'."
            )
        return (
            "Likely cause: var_names are Ensembl ids without a usable symbol column, or ids unknown to GENCODE "
            "v44. Pass gene_column=<column with gene symbols>."
        )
    if _mouse_like_fraction(names) > 0.5 and species == "human":
        return "Likely cause: the genes look like mouse symbols (e.g. 'Cd3e'); pass species='mouse'."
    return (
        "Likely cause: the input holds few genes of the panel (e.g. a targeted panel or only a small gene subset), "
        "or the gene names are not symbols. Pass gene_column=<symbol column> if var has one."
    )


def _resource_versions(*, use_aliases: bool) -> dict[str, str]:
    out = {"ensembl_and_orthologs": f"celltypist {package_version('celltypist')} (GENCODE v44, Ensembl 105)"}
    if use_aliases:
        out["aliases"] = f"msfm resources/genes/hgnc_gene_names.tsv.gz sha256:{HGNC_GENE_NAMES_SHA256[:16]}"
    return out
