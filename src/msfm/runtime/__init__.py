"""msfm.runtime: the layer below everything (atomic IO, h5ad and safetensors files, checkpoints, settings files,
devices, hardware-aware precision, safe loading of foreign files, plain values, result and loaded-model types, registries, deprecations).

Every other layer may import it; it imports none of them (only ``msfm.errors`` and ``msfm._version``).
"""

from __future__ import annotations

from msfm._lazy import lazy_exports

_LAZY = {
    # atomic writes
    "atomic_dir": "msfm.runtime.atomic",
    "atomic_path": "msfm.runtime.atomic",
    "atomic_write": "msfm.runtime.atomic",
    "atomic_write_bytes": "msfm.runtime.atomic",
    "atomic_write_json": "msfm.runtime.atomic",
    "atomic_write_text": "msfm.runtime.atomic",
    "check_free_space": "msfm.runtime.atomic",
    "check_output_free": "msfm.runtime.atomic",
    "sweep_stale": "msfm.runtime.atomic",
    # files
    "check_output": "msfm.runtime.h5ad",
    "open_hdf5": "msfm.runtime.h5ad",
    "write_h5ad_atomic": "msfm.runtime.h5ad",
    "write_output": "msfm.runtime.h5ad",
    "H5adResultWriter": "msfm.runtime.h5ad_stream",
    "write_safetensors_atomic": "msfm.runtime.safetensors",
    "load_torch_file": "msfm.runtime.safe_load",
    # checkpoints
    "LoadedCheckpoint": "msfm.runtime.checkpoint",
    "is_checkpoint_dir": "msfm.runtime.checkpoint",
    "load_checkpoint": "msfm.runtime.checkpoint",
    "save_checkpoint": "msfm.runtime.checkpoint",
    "Loaded": "msfm.runtime.loaded",
    "Result": "msfm.runtime.results",
    "TrainResult": "msfm.runtime.results",
    # settings
    "build_settings": "msfm.runtime.config",
    "read_config_file": "msfm.runtime.config",
    # devices
    "autocast_context": "msfm.runtime.devices",
    "parse_devices": "msfm.runtime.devices",
    "rank_world": "msfm.runtime.devices",
    "resolve_device": "msfm.runtime.devices",
    # precision
    "CpuCapability": "msfm.runtime.precision",
    "PrecisionChoice": "msfm.runtime.precision",
    "cpu_capability": "msfm.runtime.precision",
    "matmul_rate": "msfm.runtime.precision",
    "resolve_precision": "msfm.runtime.precision",
    # values and names
    "to_jsonable": "msfm.runtime.jsonable",
    "to_uns": "msfm.runtime.jsonable",
    "Registry": "msfm.runtime.registry",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports("msfm.runtime", _LAZY, globals())
