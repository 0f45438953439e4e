"""``Result``: the frozen result type verbs return when their output is more than one AnnData.

A result is a dataclass whose fields are AnnData objects, tables, arrays, figures or plain values. ``save(dir)``
writes each field under its own name, atomically (a half-written folder never appears under the final name):

==================  ================================
field value         file
==================  ================================
``AnnData``         ``<name>.h5ad``
``DataFrame``       ``<name>.csv`` (index kept)
``numpy`` array     ``<name>.npy``
matplotlib figure   ``<name>.png``
everything else     one ``result.json`` of plain values
==================  ================================
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from msfm.runtime.atomic import PathLike, atomic_dir, atomic_write_bytes, atomic_write_json, check_output_free
from msfm.runtime.jsonable import to_jsonable

__all__ = ["Result", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class of msfm result types (subclass it with ``@dataclass(frozen=True)``)."""

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write every field into the folder ``path`` (see the module docstring for the file of each kind).

        Raises:
            MsfmInputError: ``path`` exists and ``overwrite`` is False.
        """
        import pandas as pd
        from anndata import AnnData

        from msfm.runtime.h5ad import write_h5ad_atomic

        target = check_output_free(path, overwrite=overwrite)
        plain: dict[str, Any] = {"type": type(self).__name__}
        with atomic_dir(target) as tmp:
            for field in dataclasses.fields(self):
                value = getattr(self, field.name)
                if isinstance(value, AnnData):
                    write_h5ad_atomic(value, tmp / f"{field.name}.h5ad")
                elif isinstance(value, pd.DataFrame):
                    atomic_write_bytes(tmp / f"{field.name}.csv", value.to_csv().encode("utf-8"))
                elif isinstance(value, np.ndarray):
                    buf = io.BytesIO()
                    np.save(buf, value, allow_pickle=False)
                    atomic_write_bytes(tmp / f"{field.name}.npy", buf.getvalue())
                elif hasattr(value, "savefig"):
                    buf = io.BytesIO()
                    value.savefig(buf, format="png", dpi=150, bbox_inches="tight")
                    atomic_write_bytes(tmp / f"{field.name}.png", buf.getvalue())
                else:
                    plain[field.name] = value
            atomic_write_json(tmp / "result.json", to_jsonable(plain))
        return target


@dataclasses.dataclass(frozen=True)
class TrainResult(Result):
    """What ``train`` and ``fit_classifier`` return in every family.

    It is path-like: pass it wherever a checkpoint is expected (``embed(adata, train(...))``).

    Attributes:
        run_dir: the run folder (resume state, logs, metrics; running ``train`` again on it resumes).
        checkpoint: the exported msfm checkpoint to load (for ROAM: the run, i.e. its fold ensemble).
        metrics: final metrics of the run (plain values).
    """

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.checkpoint)
