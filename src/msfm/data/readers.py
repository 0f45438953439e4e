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
from typing import Any

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


# What anndata, h5py and zarr raise on a damaged or foreign file (each reader turns it into one MsfmInputError).
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError)


def _cause(err: BaseException) -> str:
    """``Type: first line of the message`` of a library error, for one-line msfm errors."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


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
        if copy and data.isbacked:
            # anndata cannot copy a backed object without a new file name; the copy a verb needs is in memory.
            return data.to_memory()
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

    ``.h5ad`` files are checked before anndata reads them: an empty file, a file of another kind (PNG, JPEG, gzip,
    zip, text: told by its magic bytes), a truncated or corrupt HDF5 file, an HDF5 file without AnnData groups and
    text that is not UTF-8 (the ``obs``/``var`` column is named) each raise one message saying what the file is and
    how to fix it. float16 matrices are read as float32 (exact; scipy.sparse has no float16; backed float16 ``X`` is
    cast block by block in :class:`msfm.data.CellSource`). A CSV/TSV whose first row looks like numbers rather than
    a header of gene names is refused.

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
        return _read_h5ad(path, backed=bool(backed))
    if path.is_dir():
        if name.endswith(".zarr") or (path / ".zgroup").exists() or (path / "zarr.json").exists():
            return _read_zarr(path)
        if any((path / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
            return _read_10x_mtx(path)
        msg = (
            f"Folder {str(path)!r} is neither a zarr store nor a 10x matrix folder (no matrix.mtx[.gz]). "
            f"Supported inputs: {_formats()}."
        )
        raise MsfmInputError(msg)
    if name.endswith(".h5"):
        _check_hdf5_signature(path, "a 10x Genomics HDF5 (.h5)")
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

    try:
        with h5py.File(path, "r") as fh:
            return "X" in fh and "obs" in fh and "var" in fh
    except OSError:  # not HDF5, or damaged: the 10x reader reports what the file is
        return False


# -- what a file really is ---------------------------------------------------------------------------------------

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Magic bytes of files that are often given by mistake, and what to call them.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first, e.g. `gunzip`)"),
    (b"PK\x03\x04", "a zip archive (extract it first, e.g. `unzip`)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"BZh", "a bzip2-compressed file (decompress it first)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file (decompress it first)"),
)


def _file_kind(path: Path) -> str | None:
    """What a file that should be HDF5 actually is (None: it is HDF5).

    HDF5 files start with an 8-byte signature at offset 0, 512, 1024, 2048, ... (after an optional user block).
    """
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with path.open("rb") as fh:
        head = fh.read(4096)
        offset = 512
        if head.startswith(_HDF5_SIGNATURE):
            return None
        while offset < min(size, 1 << 24):
            fh.seek(offset)
            if fh.read(8) == _HDF5_SIGNATURE:
                return None
            offset *= 2
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            first = text.splitlines()[0] if text.strip() else ""
            return f"a text file (first line: {first[:80]!r})"
    return f"not an HDF5 file (it starts with the bytes {head[:8]!r})"


def _check_hdf5_signature(path: Path, what: str) -> None:
    if path.is_dir():
        msg = (
            f"{str(path)!r} is a folder, not {what} file. If it is an AnnData zarr store, name it '*.zarr'; "
            f"supported inputs: {_formats()}."
        )
        raise MsfmInputError(msg)
    kind = _file_kind(path)
    if kind is None:
        return
    fix = (
        "Copy or download the file again if it was damaged, or pass a file in a supported format"
        if kind.startswith(("empty", "not an HDF5"))
        else "Pass the data file itself, or a file in a supported format"
    )
    msg = f"{str(path)!r} should be {what} file (HDF5), but it is {kind}. {fix}: {_formats()}."
    raise MsfmInputError(msg)


def _h5ad_layout(path: Path) -> list[str]:
    """Check that an HDF5 file opens and holds an AnnData; return the float16 matrices it stores.

    Raises:
        MsfmInputError: the HDF5 file cannot be opened (truncated, damaged) or holds no AnnData.
    """
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        msg = (
            f"{str(path)!r} is an HDF5 file but cannot be opened ({err}); it is truncated or damaged (an interrupted "
            "copy or download, or a writer that was killed). Copy or write the file again; msfm cannot read a partial "
            "HDF5 file."
        )
        raise MsfmInputError(msg) from err
    with fh:
        try:
            keys = sorted(fh.keys())
            encoding = fh.attrs.get("encoding-type", "")
            encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            if not ("obs" in fh and "var" in fh) and encoding != "anndata":
                hint = (
                    " It looks like a 10x Genomics matrix: give it a '.h5' name (msfm reads it as 10x HDF5)."
                    if "matrix" in keys
                    or any(isinstance(fh[k], h5py.Group) and "barcodes" in fh[k] for k in keys)
                    else ""
                )
                msg = (
                    f"{str(path)!r} is an HDF5 file but not an AnnData (.h5ad): it has no 'obs' and 'var' groups "
                    f"(top-level keys: {keys[:10]}).{hint} Write the data with anndata (`adata.write_h5ad(path)`) or "
                    f"pass a file in a supported format: {_formats()}."
                )
                raise MsfmInputError(msg)
            return [name for name in _matrix_names(fh) if _is_float16(fh[name])]
        except (OSError, KeyError, RuntimeError) as err:
            msg = (
                f"{str(path)!r} is an HDF5 file whose contents cannot be read ({type(err).__name__}: {err}); it is "
                "damaged. Copy or write the file again."
            )
            raise MsfmInputError(msg) from err


def _matrix_names(fh: Any) -> list[str]:
    names = [n for n in ("X", "raw/X") if n in fh]
    if "layers" in fh:
        names += [f"layers/{k}" for k in fh["layers"]]
    return names


def _is_float16(elem: Any) -> bool:
    import h5py

    data = elem["data"] if isinstance(elem, h5py.Group) and "data" in elem else elem
    return isinstance(data, h5py.Dataset) and data.dtype == np.float16


def _read_h5ad(path: Path, *, backed: bool) -> ad.AnnData:
    """``anndata.read_h5ad`` with msfm errors for files it cannot read, and float16 matrices read as float32."""
    _check_hdf5_signature(path, "an AnnData (.h5ad)")
    float16 = _h5ad_layout(path)
    try:
        if float16 and not backed:
            return _read_upcast(path, float16)
        return ad.read_h5ad(path, backed="r" if backed else None)
    except UnicodeDecodeError as err:
        raise MsfmInputError(_not_utf8_message(path, err)) from err
    except MsfmInputError:
        raise
    except _READ_ERRORS as err:
        msg = (
            f"{str(path)!r} is an HDF5 file with AnnData groups, but anndata cannot read it ({_cause(err)}). "
            "The file is damaged, or was written by a tool that "
            "does not follow the AnnData layout. Write it again with anndata (`adata.write_h5ad(path)`)."
        )
        raise MsfmInputError(msg) from err


def _upcast_callback(read_func: Any, elem_name: str, elem: Any, *, iospec: Any) -> Any:
    """anndata read callback: float16 matrices (scipy.sparse has no float16) become float32 (exact)."""
    if iospec.encoding_type in ("csr_matrix", "csc_matrix") and elem["data"].dtype == np.float16:
        cls = sp.csr_matrix if iospec.encoding_type == "csr_matrix" else sp.csc_matrix
        shape = tuple(int(v) for v in elem.attrs["shape"])
        data = np.asarray(elem["data"][...], dtype=np.float32)
        return cls((data, np.asarray(elem["indices"][...]), np.asarray(elem["indptr"][...])), shape=shape)
    if iospec.encoding_type == "array" and getattr(elem, "dtype", None) == np.float16:
        return np.asarray(elem[...], dtype=np.float32)
    return read_func(elem)


def _read_upcast(path: Path, float16: list[str]) -> ad.AnnData:
    """Read an h5ad whose matrices include float16 ones as float32 (lossless)."""
    import h5py
    from anndata.experimental import read_dispatched

    logger.info("%s: reading the float16 matrices %s as float32 (exact)", path.name, float16)
    with h5py.File(path, "r") as fh:
        return read_dispatched(fh, _upcast_callback)


def _not_utf8_message(path: Path, err: UnicodeDecodeError) -> str:
    where, example = _find_non_utf8(path)
    bad = f" (e.g. {example!r})" if example is not None else ""
    return (
        f"{str(path)!r}: the {where} holds text that is not valid UTF-8{bad}: {err.reason} at byte {err.start}. "
        "h5ad files store text as UTF-8. Fix: re-encode those names as UTF-8 in the tool that wrote the file (for "
        "bytes written in Latin-1: `name.decode('latin-1')`), then write the file again."
    )


def _find_non_utf8(path: Path) -> tuple[str, bytes | None]:
    """Which obs/var column (or index) holds bytes that do not decode as UTF-8, and one such value."""
    import h5py

    def bad_value(ds: Any) -> bytes | None:
        if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "OS":
            return None
        for value in np.ravel(ds[()]):
            if isinstance(value, bytes):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return value
        return None

    labels = {
        "obs": ("obs index (cell names)", "obs column"),
        "var": ("var index (gene names)", "var column"),
    }
    with h5py.File(path, "r") as fh:
        for group in ("var", "obs", "raw/var"):
            if group not in fh or not isinstance(fh[group], h5py.Group):
                continue
            g = fh[group]
            index_name = g.attrs.get("_index", "_index")
            index_name = index_name.decode() if isinstance(index_name, bytes) else str(index_name)
            index_label, column_label = labels[group.split("/")[-1]]
            if group == "raw/var":
                index_label, column_label = "raw var index (gene names)", "raw var column"
            for key in g:
                elem = g[key]
                candidates = [elem] if isinstance(elem, h5py.Dataset) else [elem[k] for k in elem]
                for ds in candidates:
                    value = bad_value(ds)
                    if value is not None:
                        return (index_label if key == index_name else f"{column_label} {key!r}"), value
    return "a text field (in uns or another element)", None


def _read_zarr(path: Path) -> ad.AnnData:
    try:
        try:
            return ad.read_zarr(path)
        except ValueError as err:
            if "float16" not in str(err):
                raise
            import zarr
            from anndata.experimental import read_dispatched

            logger.info("%s: reading float16 matrices as float32 (exact)", path.name)
            return read_dispatched(zarr.open_group(str(path), mode="r"), _upcast_callback)
    except UnicodeDecodeError as err:
        msg = (
            f"{str(path)!r}: the zarr store holds text that is not valid UTF-8 ({err.reason} at byte {err.start}). "
            "Re-encode the names as UTF-8 in the tool that wrote the store, then write it again."
        )
        raise MsfmInputError(msg) from err
    except _READ_ERRORS as err:
        msg = (
            f"{str(path)!r} cannot be read as an AnnData zarr store ({_cause(err)}). "
            "The store is incomplete or damaged; write it "
            "again with anndata (`adata.write_zarr(path)`)."
        )
        raise MsfmInputError(msg) from err


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
    _check_header(path, table, sep)
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


def _check_header(path: Path, table: pd.DataFrame, sep: str) -> None:
    """Refuse a table whose first row is data rather than a header of gene names.

    Without a header row pandas takes the first cell's values as column names, and every later message would speak
    of unknown gene symbols. A header is taken for data when most of its names are numbers and they repeat or are
    not all positive integers (so a header of unique numeric gene ids, such as Entrez ids, still reads).
    """
    names = [str(c) for c in table.columns]
    if not names:
        return
    raw = pd.read_csv(
        path, sep=sep, header=None, nrows=1, dtype=str, compression="infer", keep_default_na=False
    ).iloc[0]
    corner, first = str(raw.iloc[0]).strip(), [str(v) for v in raw.tolist()[1:]]
    numbers = pd.to_numeric(pd.Series(first, dtype=object), errors="coerce")
    numeric = numbers.notna().to_numpy()
    # An empty first cell is the corner of a header (pandas writes it so); a data row starts with its cell id.
    if not corner or not first or numeric.mean() < 0.5:
        return
    values = numbers[numeric].to_numpy(dtype=np.float64)
    integers = bool(np.all(values == np.rint(values)))
    ids_like = len(set(first)) == len(first) and integers and bool(np.all(values > 0))
    sequential = (
        integers and numeric.all() and np.array_equal(values, np.arange(values[0], values[0] + len(values)))
    )
    if ids_like or sequential:
        return
    kind = "comma" if sep == "," else "tab"
    example = (",".join if sep == "," else "<TAB>".join)(["cell_id", "GENE1", "GENE2", "..."])
    msg = (
        f"{path}: the first row looks like numbers ({', '.join(first[:5])}{', ...' if len(first) > 5 else ''}), "
        f"not a header row; expected a {kind}-separated header row '{example}' (cells x genes: the first column "
        "holds cell ids, the other column names are gene symbols or Ensembl ids). Fix: add the header row of gene "
        "names as the first line of the file (e.g. in pandas: `t = pd.read_csv(path, header=None, index_col=0); "
        "t.columns = genes; t.to_csv(path)`)."
    )
    raise MsfmInputError(msg)
