"""Write model outputs into an .h5ad file batch by batch, without holding them in memory.

Used for atlas-sized inputs: the input file is copied byte-for-byte (never modified), then results are
added as new on-disk datasets (``obsm/<key>``, ``layers/<key>``, ``obs/<column>``, ``uns/<key>``) that
anndata reads back as usual. The copy is made under a temporary name and renamed into place only when
every batch has been written, so a crash never leaves a half-written output under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from msfm.errors import MsfmInputError
from msfm.runtime.jsonable import to_uns

_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


class H5adResultWriter:
    """Copy ``src`` to ``dst`` and stream arrays into it.

    Example:
        >>> with H5adResultWriter("in.h5ad", "out.h5ad") as w:  # doctest: +SKIP
        ...     w.create_obsm("X_scfoundation", dim=3072)
        ...     w.write_rows("obsm/X_scfoundation", idx, values)
    """

    def __init__(self, src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = True):
        self.src = Path(src).resolve()
        self.dst = Path(dst).resolve()
        if self.src == self.dst:
            msg = (
                f"The output path {self.dst} is the input file. msfm never overwrites input data; "
                "choose a different --out path."
            )
            raise MsfmInputError(msg)
        if self.dst.exists() and not overwrite:
            msg = f"Output {self.dst} exists; pass overwrite=True (CLI: --overwrite) or choose another path."
            raise MsfmInputError(msg)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.dst.name}.", suffix=".tmp", dir=self.dst.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        shutil.copyfile(self.src, self._tmp)
        import h5py

        self._h5 = h5py.File(self._tmp, "r+")
        self.n_obs = _n_obs(self._h5)

    # -- creation -----------------------------------------------------------------------------------------
    def _dataset(self, path: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...] | None) -> None:
        group, _, name = path.rpartition("/")
        g = self._h5.require_group(group)
        if name in g:
            del g[name]
        ds = g.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
        ds.attrs.update(_ARRAY_ATTRS)

    def create_obsm(self, key: str, dim: int, dtype: Any = np.float32) -> str:
        """Create ``obsm/<key>`` of shape ``[n_obs, dim]``; returns the dataset path."""
        _ensure_mapping_group(self._h5, "obsm")
        path = f"obsm/{key}"
        self._dataset(path, (self.n_obs, dim), dtype, (min(self.n_obs, 1024), dim))
        return path

    def create_layer(self, key: str, n_vars: int, dtype: Any = np.float32) -> str:
        """Create a dense ``layers/<key>`` of shape ``[n_obs, n_vars]``; returns the dataset path."""
        _ensure_mapping_group(self._h5, "layers")
        path = f"layers/{key}"
        self._dataset(path, (self.n_obs, n_vars), dtype, (min(self.n_obs, 256), n_vars))
        return path

    def create_obs_column(self, name: str, dtype: Any) -> str:
        """Create an ``obs`` column (numeric or bool) and register it in the column order."""
        obs = self._h5["obs"]
        order = [str(c) for c in obs.attrs.get("column-order", [])]
        if name not in order:
            order.append(name)
        self._dataset(f"obs/{name}", (self.n_obs,), dtype, None)
        obs.attrs["column-order"] = np.array(order, dtype=object)
        return f"obs/{name}"

    # -- writing ------------------------------------------------------------------------------------------
    def write_rows(self, path: str, idx: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` at rows ``idx`` (any order) of the dataset ``path``."""
        ds = self._h5[path]
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        # h5py fancy indexing needs increasing indices; contiguous runs are written as slices (fast).
        if len(sorted_idx) and sorted_idx[-1] - sorted_idx[0] + 1 == len(sorted_idx):
            ds[int(sorted_idx[0]) : int(sorted_idx[-1]) + 1] = values[order]
        else:
            ds[sorted_idx] = values[order]

    def write_uns(self, key: str, verb: str, record: dict[str, Any]) -> None:
        """``uns[key][verb] = record``, as :func:`msfm.runtime.adata.store_uns` does in memory.

        A real ``uns`` mapping (not a JSON string), keeping the records of other verbs the input file holds under
        ``key``.
        """
        from anndata.io import read_elem, write_elem

        if "uns" not in self._h5:
            write_elem(self._h5, "uns", {})
        uns = self._h5["uns"]
        merged: dict[str, Any] = {}
        if key in uns:
            current = read_elem(uns[key])
            merged = dict(current) if isinstance(current, dict) else {}
            del uns[key]
        merged[verb] = to_uns(record)
        write_elem(uns, key, merged)

    # -- finishing ----------------------------------------------------------------------------------------
    def close(self, *, commit: bool = True) -> None:
        self._h5.close()
        if commit:
            # mkstemp made the copy 0600; the output gets the permissions a normal open() would give.
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self._tmp, 0o666 & ~mask)
            os.replace(self._tmp, self.dst)
        else:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> H5adResultWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(commit=exc_type is None)


def _ensure_mapping_group(h5: Any, name: str) -> None:
    if name not in h5:
        g = h5.create_group(name)
        g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})


def _n_obs(h5: Any) -> int:
    obs = h5["obs"]
    index_name = obs.attrs.get("_index", "_index")
    return int(obs[index_name].shape[0])
