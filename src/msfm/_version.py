"""Version of the msfm package and of its on-disk checkpoint schema."""

__version__ = "0.1.0"
# Bump when the layout of checkpoint directories (model.safetensors + config.json + meta.json) changes.
CHECKPOINT_SCHEMA_VERSION = 1
