"""Locate data files shipped with msfm or inside installed packages (never downloads anything).

Two kinds of files are used:

* msfm's own resources under ``msfm/resources/`` (gene panels, the derived HGNC gene-name table);
* data files that other installed wheels ship (celltypist's GENCODE and ortholog tables, scanpy's bundled PBMC
  file). These are located through :func:`importlib.util.find_spec` so that the packages are never imported:
  importing celltypist, for example, creates ``~/.celltypist`` as a side effect.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from msfm.errors import MsfmInputError

#: sha256 of the official scFoundation gene list ``OS_scRNA_gene_index.19264.tsv``.
SCFOUNDATION_GENES_SHA256 = "bb337ea195d94e7b033543abc02a42e7060d6562eba97deb077f7dcecec62661"

#: sha256 of the derived HGNC gene-name table (see ``resources/genes/README.md``).
HGNC_GENE_NAMES_SHA256 = "162bea197c88f16e10364e0da1eaae7ae24c45667dd5c0a5a27c5f4072c08002"

_RESOURCES = Path(__file__).resolve().parents[1] / "resources"


def resource_path(*parts: str) -> Path:
    """Return the path of a file shipped in ``msfm/resources``.

    Args:
        *parts: path components below ``msfm/resources`` (e.g. ``"genes", "hgnc_gene_names.tsv.gz"``).

    Returns:
        The absolute path.

    Raises:
        MsfmInputError: if the file is not there (a broken or partial installation).
    """
    path = _RESOURCES.joinpath(*parts)
    if not path.is_file():
        msg = (
            f"msfm resource file {'/'.join(parts)!r} is missing (looked at {path}). "
            "The installation is incomplete: reinstall msfm (`pip install --force-reinstall msfm`)."
        )
        raise MsfmInputError(msg)
    return path


def package_data_file(package: str, relative: str) -> Path:
    """Return the path of a data file inside an installed package, without importing the package.

    Args:
        package: top-level package name, e.g. ``"celltypist"``.
        relative: path inside the package directory, e.g. ``"data/samples/GENCODEv44_Gene_id2name.csv"``.

    Returns:
        The absolute path of the file.

    Raises:
        MsfmInputError: if the package is not installed or does not ship the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        msg = (
            f"msfm needs a data file from the package {package!r} ({relative}), but {package!r} is not installed. "
            f"Install it with `pip install {package}` (it is a dependency of msfm)."
        )
        raise MsfmInputError(msg)
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    msg = (
        f"The installed package {package!r} (version {package_version(package)}) does not contain {relative!r}. "
        f"Install the version msfm is tested with (see msfm's pyproject.toml)."
    )
    raise MsfmInputError(msg)


def package_version(package: str) -> str:
    """Return the installed version of ``package`` or ``"unknown"`` (read from metadata, no import)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
