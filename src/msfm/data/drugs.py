"""Drug tables, drug-response tables and drug fingerprints: the data contract of the drug-response tasks.

* Drug table: one row per drug, a drug id and a SMILES string (CSV/TSV, a DataFrame or a ``{id: smiles}`` dict).
* Response table: one row per (cell line, drug) pair with ``ln(IC50)`` (regression, e.g. GDSC ``LN_IC50``) or a
  binary sensitive/resistant label.
* Fingerprints: RDKit Morgan (ECFP-like) bit vectors from the SMILES; RDKit is imported only when they are needed.

Column names are matched case-insensitively, so a GDSC export (``CELL_LINE_NAME``, ``DRUG_NAME``, ``LN_IC50``)
reads with ``cell_column="cell_line_name", drug_column="drug_name", value_column="ln_ic50"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from msfm.errors import MsfmInputError

__all__ = [
    "DrugTable",
    "atom_graph",
    "binary_labels",
    "check_response_ids",
    "morgan_fingerprints",
    "read_drugs",
    "read_responses",
]

TableLike = pd.DataFrame | str | os.PathLike[str]
RDKIT_HINT = (
    "RDKit is needed for drug fingerprints; install it with `pip install rdkit` (msfm is tested with 2026.9)."
)

_SENSITIVE = {"1", "1.0", "true", "sensitive", "s", "yes", "responder"}
_RESISTANT = {"0", "0.0", "false", "resistant", "r", "no", "non-responder", "nonresponder"}


def _rdkit() -> Any:
    """RDKit's ``Chem`` module, or an error with the install command."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError as err:
        raise MsfmInputError(RDKIT_HINT) from err
    RDLogger.DisableLog("rdApp.*")  # parse failures are reported by us, once, naming the drugs
    return Chem


def _read_table(source: TableLike, what: str) -> pd.DataFrame:
    """A DataFrame, or a CSV/TSV file read with its separator guessed from the suffix."""
    if isinstance(source, pd.DataFrame):
        return source.copy()
    if not isinstance(source, str | os.PathLike):
        msg = f"The {what} must be a DataFrame or the path of a CSV/TSV file; got {type(source).__name__}."
        raise MsfmInputError(msg)
    path = Path(source)
    if not path.is_file():
        msg = f"The {what} file {path} does not exist. Pass the path of a CSV/TSV file."
        raise MsfmInputError(msg)
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        msg = f"Cannot read the {what} file {path} as {'TSV' if sep == chr(9) else 'CSV'}: {err}."
        raise MsfmInputError(msg) from err


def _column(df: pd.DataFrame, name: str, what: str, role: str) -> str:
    """The column of ``df`` named ``name`` (case-insensitive)."""
    if name in df.columns:
        return name
    matches = [c for c in df.columns if str(c).strip().lower() == name.strip().lower()]
    if len(matches) == 1:
        return matches[0]
    msg = (
        f"The {what} has no {role} column {name!r}; its columns are {[str(c) for c in df.columns][:20]}. "
        f"Name the column with {role}_column=... (CLI --{role.replace('_', '-')}-column)."
    )
    raise MsfmInputError(msg)


@dataclass(frozen=True)
class DrugTable:
    """Drug ids and their SMILES, in table order.

    Attributes:
        ids: Drug ids (unique strings).
        smiles: SMILES of each drug.
    """

    ids: tuple[str, ...]
    smiles: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        """Drug id -> row."""
        return {d: i for i, d in enumerate(self.ids)}

    def to_frame(self) -> pd.DataFrame:
        """``drug_id, smiles`` as a DataFrame."""
        return pd.DataFrame({"drug_id": list(self.ids), "smiles": list(self.smiles)})

    def subset(self, ids: Sequence[str]) -> DrugTable:
        """The rows of ``ids``, in that order."""
        idx = self.index()
        return DrugTable(tuple(ids), tuple(self.smiles[idx[d]] for d in ids))


def read_drugs(
    source: TableLike | Mapping[str, str] | DrugTable,
    *,
    id_column: str = "drug_id",
    smiles_column: str = "smiles",
) -> DrugTable:
    """Read a drug table: a CSV/TSV path, a DataFrame, a ``{drug id: SMILES}`` dict or a :class:`DrugTable`.

    Raises:
        MsfmInputError: Missing columns, empty ids or SMILES, or a drug id listed twice.
    """
    if isinstance(source, DrugTable):
        return source
    if isinstance(source, Mapping):
        df = pd.DataFrame({"drug_id": list(source.keys()), "smiles": list(source.values())})
        id_column, smiles_column = "drug_id", "smiles"
    else:
        df = _read_table(source, "drug table")
    id_col = _column(df, id_column, "drug table", "id")
    smi_col = _column(df, smiles_column, "drug table", "smiles")
    ids = df[id_col].astype("string").str.strip()
    smiles = df[smi_col].astype("string").str.strip()
    empty = ids.isna() | (ids == "")
    if empty.any():
        msg = f"The drug table has {int(empty.sum())} row(s) without a drug id (rows {np.flatnonzero(empty)[:10].tolist()}). Fill or drop them."
        raise MsfmInputError(msg)
    no_smiles = smiles.isna() | (smiles == "")
    if no_smiles.any():
        names = ids[no_smiles].tolist()[:10]
        msg = f"Drugs {names} have no SMILES in the drug table. Add their SMILES (e.g. from PubChem) or drop them."
        raise MsfmInputError(msg)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        msg = f"The drug table lists drug ids more than once: {dup[:10]}. Keep one row per drug."
        raise MsfmInputError(msg)
    return DrugTable(tuple(ids.tolist()), tuple(smiles.tolist()))


def _parse(drugs: DrugTable) -> list[Any]:
    """RDKit molecules of every drug; one error naming every SMILES that does not parse."""
    chem = _rdkit()
    mols = [chem.MolFromSmiles(s) for s in drugs.smiles]
    bad = [(d, s) for d, s, m in zip(drugs.ids, drugs.smiles, mols, strict=True) if m is None]
    if bad:
        listed = ", ".join(f"{d} ({s!r})" for d, s in bad[:10])
        msg = (
            f"{len(bad)} SMILES do not parse with RDKit: {listed}. Fix them (copy the canonical SMILES from PubChem) "
            "or drop these drugs from the drug table."
        )
        raise MsfmInputError(msg)
    return mols


def morgan_fingerprints(drugs: DrugTable, *, radius: int = 2, n_bits: int = 1024) -> np.ndarray:
    """Morgan fingerprint bits of every drug.

    Args:
        drugs: The drug table.
        radius: Morgan radius (2 ~ ECFP4).
        n_bits: Fingerprint length.

    Returns:
        ``[n_drugs, n_bits]`` float32 array of 0/1.

    Raises:
        MsfmInputError: RDKit is not installed, a parameter is out of range, or SMILES do not parse (all named).
    """
    if not 0 <= int(radius) <= 6:
        msg = f"fingerprint radius must be in 0..6; got {radius}."
        raise MsfmInputError(msg)
    if not 16 <= int(n_bits) <= 16384:
        msg = f"fingerprint n_bits must be in 16..16384; got {n_bits}."
        raise MsfmInputError(msg)
    mols = _parse(drugs)
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=int(radius), fpSize=int(n_bits))
    return (
        np.stack([gen.GetFingerprintAsNumPy(m).astype(np.float32) for m in mols])
        if mols
        else np.zeros((0, int(n_bits)), dtype=np.float32)
    )


def atom_graph(drugs: DrugTable) -> list[tuple[np.ndarray, np.ndarray]]:
    """Atom graphs of every drug: ``(atom features [n_atoms, 8] float32, edge_index [2, 2 * n_bonds] int64)``.

    Atom features: atomic number / 100, degree, formal charge, total H count, aromatic, in ring, hybridisation
    index, mass / 100 (plain numbers; enough for a small graph encoder).
    """
    mols = _parse(drugs)
    out = []
    for m in mols:
        x = np.array(
            [
                [
                    a.GetAtomicNum() / 100.0,
                    a.GetDegree(),
                    a.GetFormalCharge(),
                    a.GetTotalNumHs(),
                    float(a.GetIsAromatic()),
                    float(a.IsInRing()),
                    float(int(a.GetHybridization())),
                    a.GetMass() / 100.0,
                ]
                for a in m.GetAtoms()
            ],
            dtype=np.float32,
        )
        pairs = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in m.GetBonds()]
        edges = np.array(pairs + [(j, i) for i, j in pairs], dtype=np.int64).reshape(-1, 2).T
        out.append((x, edges))
    return out


def binary_labels(values: Sequence[Any] | pd.Series, what: str) -> np.ndarray:
    """Sensitive (1) / resistant (0) labels from 0/1, booleans or the words sensitive/resistant.

    Raises:
        MsfmInputError: Missing values or values that are not one of the two classes.
    """
    s = pd.Series(values)
    if s.isna().any():
        msg = f"{what} has {int(s.isna().sum())} missing label(s). Drop those rows or fill them."
        raise MsfmInputError(msg)
    text = s.astype(str).str.strip().str.lower()
    bad = sorted(set(text) - _SENSITIVE - _RESISTANT)
    if bad:
        msg = (
            f"{what} has labels {bad[:10]} that are not binary; expected sensitive/resistant, 1/0 or true/false. "
            "Binarise the labels first (e.g. ln(IC50) below a per-drug threshold = sensitive)."
        )
        raise MsfmInputError(msg)
    return text.isin(_SENSITIVE).to_numpy().astype(np.int64)


def read_responses(
    source: TableLike,
    *,
    kind: Literal["regression", "binary"] = "regression",
    cell_column: str = "cell_line",
    drug_column: str = "drug_id",
    value_column: str = "ln_ic50",
) -> pd.DataFrame:
    """Read a response table into ``cell_line, drug_id, value`` (float ln(IC50), or 0/1 for ``kind="binary"``).

    Raises:
        MsfmInputError: Missing columns, non-numeric or missing ln(IC50) values (rows named), labels that are not
            binary, or a (cell line, drug) pair listed twice.
    """
    df = _read_table(source, "response table")
    cell = _column(df, cell_column, "response table", "cell")
    drug = _column(df, drug_column, "response table", "drug")
    val = _column(df, value_column, "response table", "value")
    out = pd.DataFrame(
        {
            "cell_line": df[cell].astype("string").str.strip().astype(object),
            "drug_id": df[drug].astype("string").str.strip().astype(object),
        }
    )
    if kind == "regression":
        numbers = pd.to_numeric(df[val], errors="coerce")
        bad = numbers.isna() | ~np.isfinite(numbers.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            rows = np.flatnonzero(bad.to_numpy())[:10].tolist()
            examples = [str(v) for v in df[val].iloc[rows].tolist()]
            msg = (
                f"The response table has {int(bad.sum())} ln(IC50) value(s) in column {val!r} that are missing or "
                f"not finite numbers (rows {rows}: {examples}). Drop those rows or fix the values."
            )
            raise MsfmInputError(msg)
        out["value"] = numbers.to_numpy(dtype=np.float64)
    elif kind == "binary":
        out["value"] = binary_labels(df[val], f"Response column {val!r}")
    else:
        msg = f"kind must be 'regression' or 'binary'; got {kind!r}."
        raise MsfmInputError(msg)
    missing = out["cell_line"].isna() | out["drug_id"].isna()
    if missing.any():
        msg = f"The response table has {int(missing.sum())} row(s) without a cell line or drug id. Drop them."
        raise MsfmInputError(msg)
    dup = out.duplicated(["cell_line", "drug_id"])
    if dup.any():
        pairs = out.loc[dup, ["cell_line", "drug_id"]].head(5).values.tolist()
        msg = (
            f"The response table lists {int(dup.sum())} (cell line, drug) pair(s) more than once, e.g. {pairs}. "
            "Average the replicates (or keep one) first."
        )
        raise MsfmInputError(msg)
    return out.reset_index(drop=True)


def check_response_ids(responses: pd.DataFrame, cell_lines: Sequence[str], drugs: DrugTable) -> None:
    """Every cell line of ``responses`` is in the expression data and every drug in the drug table.

    Raises:
        MsfmInputError: Naming the missing cell lines or drugs (up to 10 of each) and how many there are.
    """
    known_cells = set(map(str, cell_lines))
    miss_cells = sorted(set(responses["cell_line"]) - known_cells)
    if miss_cells:
        msg = (
            f"{len(miss_cells)} cell line(s) of the response table are not in the expression data (obs_names): "
            f"{miss_cells[:10]}. Use the same cell-line ids in both (e.g. COSMIC ids or CCLE names), or drop those "
            "rows."
        )
        raise MsfmInputError(msg)
    miss_drugs = sorted(set(responses["drug_id"]) - set(drugs.ids))
    if miss_drugs:
        msg = (
            f"{len(miss_drugs)} drug(s) of the response table are not in the drug table: {miss_drugs[:10]}. Add "
            "their SMILES to the drug table, or drop those rows."
        )
        raise MsfmInputError(msg)
