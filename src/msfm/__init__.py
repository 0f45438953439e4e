"""msfm: multiscale biological foundation models (scFoundation, scMulan, ROAM, GeST) in one toolkit.

Families are imported lazily so that ``import msfm`` stays fast and side-effect free::

    import msfm
    adata = msfm.datasets.pbmc68k()
    msfm.scfoundation.embed(adata, checkpoint="ckpt_dir")
"""

from __future__ import annotations

from msfm._lazy import lazy_exports
from msfm._version import CHECKPOINT_SCHEMA_VERSION, __version__

_LAZY = {
    "datasets": "msfm.datasets",
    "data": "msfm.data",
    "scfoundation": "msfm.models.scfoundation",
    "scmulan": "msfm.models.scmulan",
    "roam": "msfm.models.roam",
    "gest": "msfm.models.gest",
    "engine": "msfm.engine",
    "eval": "msfm.eval",
    "pl": "msfm.pl",
    "nn": "msfm.nn",
}

__all__ = ["CHECKPOINT_SCHEMA_VERSION", "__version__", *sorted(_LAZY)]

__getattr__, __dir__ = lazy_exports("msfm", _LAZY, globals(), whole_modules=True)
