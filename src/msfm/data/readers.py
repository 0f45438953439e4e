"""Read single-cell files into AnnData: h5ad, 10x h5, 10x matrix folders, CSV/TSV and zarr.

Every reader returns cells x genes. Gene symbols become ``var_names`` (made unique) and Ensembl ids, where the file
has them, stay in ``var["gene_ids"]`` so that :func:`msfm.data.harmonize_genes` can use them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_FORMATS", "as_anndata", "read", "read_many"]

SUPPORTED_FORMATS = (
    ".h5ad (in memory or backed='r')",
    ".h5 (10x Genomics HDF5, CellRanger v2/v3+)",
    "10x matrix folder (matrix.mtx[.gz] + features.tsv[.gz] or genes.tsv[.gz] + barcodes.tsv[.gz])",
    ".csv / .tsv / .txt, optionally .gz (cells x genes, first column = cell ids)",
    ".zarr (AnnData zarr store)",
)


def _formats() -> str:
    return "; ".join(SUPPORTED_FORMATS)


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def as_anndata(data: ad.AnnData | str | os.PathLike[str], *, copy: bool = False) -> ad.AnnData:
    """The AnnData a verb works on: ``data`` itself (or a copy), or the file ``data`` read into memory.

    Every verb's first argument goes through here, so ``verb(adata, ...)`` and ``verb("cells.h5ad", ...)`` both work.

    Args:
        data: an AnnData, or a path in one of :data:`SUPPORTED_FORMATS`.
        copy: return a copy of an AnnData instead of the object itself (files are always new objects).

    Raises:
        MsfmInputError: ``data`` is neither an AnnData nor a readable path.
    """
    if isinstance(data, ad.AnnData):
        return data.copy() if copy else data
    if isinstance(data, str | os.PathLike):
        return read(data)
    msg = (
        f"Expected an AnnData (cells x genes) or the path of a file msfm reads; got {type(data).__name__}. "
        f"Supported files: {_formats()}."
    )
    raise MsfmInputError(msg)


def read(path: str | os.PathLike[str], *, backed: bool | str = False) -> ad.AnnData:
    """Read one single-cell file into an AnnData (cells x genes).

    Args:
        path: a file or folder in one of :data:`SUPPORTED_FORMATS`.
        backed: ``True`` or ``"r"`` opens an ``.h5ad`` read-only without loading ``X`` (for files larger than
            memory). Other formats are always read into memory (a warning says so).

    Returns:
        The AnnData. For 10x inputs ``var_names`` are gene symbols (made unique) and ``var["gene_ids"]`` holds the
        Ensembl ids.

    Raises:
        MsfmInputError: missing path, unknown format or unreadable content (the message lists the formats).
    """
    path = Path(path)
    if not path.exists():
        msg = f"Input path {str(path)!r} does not exist. Supported inputs: {_formats()}."
        raise MsfmInputError(msg)
    if backed not in (False, True, "r"):
        msg = f"backed={backed!r} is not supported; use backed=False (in memory) or backed='r' (read-only)."
        raise MsfmInputError(msg)
    name = path.name.lower()
    is_h5ad = name.endswith(".h5ad") or (name.endswith(".h5") and path.is_file() and _is_h5ad(path))
    if backed and not is_h5ad:
        warnings.warn(
            f"backed mode is only available for .h5ad files; {path.name} is read into memory. Convert it once with "
            "`msfm.data.read(path).write_h5ad('x.h5ad')` to stream it.",
            UserWarning,
            stacklevel=2,
        )
    if is_h5ad:
        return ad.read_h5ad(path, backed="r" if backed else None)
    if path.is_dir():
        if name.endswith(".zarr") or (path / ".zgroup").exists() or (path / "zarr.json").exists():
            return ad.read_zarr(path)
        if any((path / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
            return _read_10x_mtx(path)
        msg = (
            f"Folder {str(path)!r} is neither a zarr store nor a 10x matrix folder (no matrix.mtx[.gz]). "
            f"Supported inputs: {_formats()}."
        )
        raise MsfmInputError(msg)
    if name.endswith(".h5"):
        return _read_10x_h5(path)
    if _strip_gz(name).endswith((".csv", ".tsv", ".txt")):
        return _read_table(path)
    msg = f"Unknown file format for {str(path)!r}. Supported inputs: {_formats()}."
    raise MsfmInputError(msg)


def read_many(
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_key: str = "source",
    join: str = "inner",
) -> ad.AnnData:
    """Read several files and concatenate them (in memory), recording the file of each cell.

    Args:
        paths: files or folders accepted by :func:`read`.
        batch_key: ``obs`` column that receives the file label (the file name, or the full path when names clash).
        join: ``"inner"`` keeps genes present in every file; ``"outer"`` keeps all genes (absent ones become 0).

    Returns:
        The concatenated AnnData; cell names are made unique with the file label when they collide.
        ``uns["msfm_read_many"]["files"]`` lists the inputs.

    Raises:
        MsfmInputError: empty ``paths``, bad ``join`` or an unreadable file.
    """
    if not paths:
        msg = "read_many received no paths; pass a list of files to concatenate."
        raise MsfmInputError(msg)
    if join not in ("inner", "outer"):
        msg = f"join={join!r} is not supported; use 'inner' or 'outer'."
        raise MsfmInputError(msg)
    paths = [Path(p) for p in paths]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    adatas = [read(p) for p in paths]
    names = pd.Index(np.concatenate([a.obs_names.to_numpy() for a in adatas]))
    out = ad.concat(
        dict(zip(labels, adatas, strict=True)),
        label=batch_key,
        join=join,
        merge="same",
        index_unique="-" if names.has_duplicates else None,
    )
    out.uns["msfm_read_many"] = {"files": [str(p) for p in paths], "batch_key": batch_key, "join": join}
    return out


def _is_h5ad(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as fh:
        return "X" in fh and "obs" in fh and "var" in fh


def _read_10x_h5(path: Path) -> ad.AnnData:
    import scanpy as sc

    try:
        with warnings.catch_warnings():
            # scanpy warns on duplicated symbols; msfm makes them unique right below and keeps the ids.
            warnings.filterwarnings("ignore", message=".*not unique.*", category=UserWarning)
            adata = sc.read_10x_h5(path)
    except (KeyError, OSError, ValueError) as err:
        msg = (
            f"Could not read {str(path)!r} as a 10x Genomics HDF5 file ({type(err).__name__}: {err}). "
            f"Supported inputs: {_formats()}."
        )
        raise MsfmInputError(msg) from err
    _unique_symbols(adata)
    return adata


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


def _read_10x_mtx(folder: Path) -> ad.AnnData:
    matrix = _first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"))
    features = _first_existing(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    barcodes = _first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    if matrix is None or features is None or barcodes is None:
        msg = (
            f"10x matrix folder {str(folder)!r} needs matrix.mtx[.gz], features.tsv[.gz] (or genes.tsv[.gz]) and "
            f"barcodes.tsv[.gz]; found {sorted(p.name for p in folder.iterdir())}."
        )
        raise MsfmInputError(msg)
    # scipy reads .mtx and .mtx.gz by file name.
    genes_by_cells = scipy.io.mmread(str(matrix))
    feat = pd.read_csv(features, sep="\t", header=None, dtype=str, compression="infer")
    cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str, compression="infer")[0]
    x = sp.csr_matrix(genes_by_cells.T, dtype=np.float32)
    if x.shape != (len(cells), len(feat)):
        msg = (
            f"{folder}: matrix.mtx is {genes_by_cells.shape[0]} genes x {genes_by_cells.shape[1]} cells, but the folder "
            f"lists {len(feat)} features and {len(cells)} barcodes. The files do not belong together."
        )
        raise MsfmInputError(msg)
    symbols = feat[1] if feat.shape[1] > 1 else feat[0]
    var = pd.DataFrame({"gene_ids": feat[0].to_numpy()}, index=pd.Index(symbols.to_numpy(dtype=str)))
    if feat.shape[1] > 2:
        var["feature_types"] = feat[2].to_numpy()
        # Same default as scanpy (gex_only=True): antibody/CRISPR features are not genes.
        keep = (var["feature_types"] == "Gene Expression").to_numpy()
        if not keep.all():
            logger.info("%s: keeping %d 'Gene Expression' features of %d", folder, keep.sum(), len(keep))
            var, x = var[keep], x[:, np.flatnonzero(keep)]
    if var.index.has_duplicates:
        logger.info("%s: making duplicated gene symbols unique; Ensembl ids stay in var['gene_ids']", folder)
        var.index = ad.utils.make_index_unique(var.index)
    return ad.AnnData(X=x, obs=pd.DataFrame(index=cells.to_numpy(dtype=str)), var=var)


def _unique_symbols(adata: ad.AnnData) -> None:
    if adata.var_names.has_duplicates:
        dups = adata.var_names[adata.var_names.duplicated()].unique()
        logger.info(
            "making %d duplicated gene symbols unique (e.g. %s); Ensembl ids stay in var['gene_ids']",
            len(dups),
            list(dups[:5]),
        )
        adata.var_names_make_unique()


def _read_table(path: Path) -> ad.AnnData:
    stem = _strip_gz(path.name.lower())
    sep = "," if stem.endswith(".csv") else "\t"
    try:
        table = pd.read_csv(path, sep=sep, index_col=0, compression="infer")
    except (ValueError, OSError, pd.errors.ParserError) as err:
        msg = f"Could not parse {str(path)!r} as a {'comma' if sep == ',' else 'tab'}-separated table: {err}."
        raise MsfmInputError(msg) from err
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        msg = (
            f"{path}: expected a numeric cells x genes table with the cell ids in the first column, but "
            f"{len(non_numeric)} columns are not numeric (e.g. {non_numeric[:5]}). Remove metadata columns, or "
            "transpose the table if genes are rows."
        )
        raise MsfmInputError(msg)
    x = sp.csr_matrix(table.to_numpy(dtype=np.float32))
    adata = ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=table.index.astype(str)),
        var=pd.DataFrame(index=table.columns.astype(str)),
    )
    return adata
