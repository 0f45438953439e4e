"""msfm.engine: Lightning training: the module, the trainer factory, resumable samplers and streams, resume, and
distributed prediction.

Names are imported lazily so that ``from msfm.engine import LossOutput`` (used by every family's objective) does
not import Lightning. Files, checkpoints and devices live in :mod:`msfm.runtime`; their old names here still work
for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

from msfm._lazy import lazy_exports
from msfm.runtime.deprecation import moved_names

_LAZY = {
    # objective contract (torch only)
    "LossOutput": "msfm.engine.objective",
    "Objective": "msfm.engine.objective",
    # training (Lightning)
    "MsfmLightningModule": "msfm.engine.module",
    "OptimConfig": "msfm.engine.module",
    "BatchStream": "msfm.engine.sampler",
    "ResumableDataLoader": "msfm.engine.sampler",
    "ResumableSampler": "msfm.engine.sampler",
    "ExportCallback": "msfm.engine.trainer",
    "ExportSpec": "msfm.engine.trainer",
    "SafeCheckpointIO": "msfm.engine.trainer",
    "TrainerOptions": "msfm.engine.trainer",
    "build_trainer": "msfm.engine.trainer",
    "fit": "msfm.engine.trainer",
    "last_checkpoint": "msfm.engine.run_layout",
    "check_resume": "msfm.engine.resume",
    "RESUME_SAFE_SETTINGS": "msfm.engine.resume",
    "distributed_predict": "msfm.engine.predict",
}

_MOVED = {
    "LoadedCheckpoint": "msfm.runtime.checkpoint",
    "gene_panel_sha256": "msfm.runtime.checkpoint",
    "is_checkpoint_dir": "msfm.runtime.checkpoint",
    "load_checkpoint": "msfm.runtime.checkpoint",
    "save_checkpoint": "msfm.runtime.checkpoint",
    "atomic_dir": "msfm.runtime.atomic",
    "atomic_write": "msfm.runtime.atomic",
    "atomic_write_bytes": "msfm.runtime.atomic",
    "atomic_write_json": "msfm.runtime.atomic",
    "atomic_write_text": "msfm.runtime.atomic",
    "write_h5ad_atomic": "msfm.runtime.h5ad",
    "write_safetensors_atomic": "msfm.runtime.safetensors",
    "autocast_context": "msfm.runtime.devices",
    "resolve_device": "msfm.runtime.devices",
    "rank_world": "msfm.runtime.devices",
}

__all__ = sorted(_LAZY)

_lazy_getattr, __dir__ = lazy_exports("msfm.engine", _LAZY, globals())
_moved_getattr = moved_names("msfm.engine", _MOVED)


def __getattr__(name: str) -> object:
    if name in _MOVED:
        return _moved_getattr(name)
    return _lazy_getattr(name)
