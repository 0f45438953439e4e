"""msfm: multiscale biological foundation models (scFoundation, scMulan, ROAM, GeST) in one toolkit.

Every family has the same shape, and is imported lazily so that ``import msfm`` stays fast and side-effect free::

    import msfm
    adata = msfm.datasets.pbmc68k()
    msfm.scfoundation.embed(adata, "sf_ckpt")            # obsm["X_scfoundation"]
    msfm.scmulan.predict(adata, "mulan_ckpt")             # obs["scmulan_cell_type"], obs["scmulan_confidence"]

See ``docs/architecture.md`` ("One public shape").
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
    "runtime": "msfm.runtime",
    "registry": "msfm.registry",
    "engine": "msfm.engine",
    "eval": "msfm.eval",
    "pl": "msfm.pl",
    "nn": "msfm.nn",
}

__all__ = ["CHECKPOINT_SCHEMA_VERSION", "__version__", *sorted(_LAZY)]

__getattr__, __dir__ = lazy_exports("msfm", _LAZY, globals(), whole_modules=True)
