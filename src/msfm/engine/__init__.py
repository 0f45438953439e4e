"""msfm.engine: Lightning training, checkpoints, atomic IO, resume and distributed prediction.

Names are imported lazily so that ``from msfm.engine import LossOutput`` (used by every family's objective) or the
checkpoint helpers do not import Lightning.
"""

from __future__ import annotations

from msfm._lazy import lazy_exports

_LAZY = {
    # objective contract (torch only)
    "LossOutput": "msfm.engine.objective",
    "Objective": "msfm.engine.objective",
    # checkpoints
    "LoadedCheckpoint": "msfm.engine.checkpoint",
    "gene_panel_sha256": "msfm.engine.checkpoint",
    "is_checkpoint_dir": "msfm.engine.checkpoint",
    "load_checkpoint": "msfm.engine.checkpoint",
    "save_checkpoint": "msfm.engine.checkpoint",
    # atomic IO
    "atomic_dir": "msfm.engine.io",
    "atomic_write": "msfm.engine.io",
    "atomic_write_bytes": "msfm.engine.io",
    "atomic_write_json": "msfm.engine.io",
    "atomic_write_text": "msfm.engine.io",
    "write_h5ad_atomic": "msfm.engine.io",
    "write_safetensors_atomic": "msfm.engine.io",
    # devices
    "autocast_context": "msfm.engine.device",
    "resolve_device": "msfm.engine.device",
    # training (Lightning)
    "MsfmLightningModule": "msfm.engine.module",
    "OptimConfig": "msfm.engine.module",
    "BatchStream": "msfm.engine.sampler",
    "rank_world": "msfm.engine.sampler",
    "ResumableDataLoader": "msfm.engine.sampler",
    "ResumableSampler": "msfm.engine.sampler",
    "ExportCallback": "msfm.engine.trainer",
    "ExportSpec": "msfm.engine.trainer",
    "SafeCheckpointIO": "msfm.engine.trainer",
    "TrainerOptions": "msfm.engine.trainer",
    "build_trainer": "msfm.engine.trainer",
    "fit": "msfm.engine.trainer",
    "last_checkpoint": "msfm.engine.trainer",
    "distributed_predict": "msfm.engine.predict",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports("msfm.engine", _LAZY, globals())
