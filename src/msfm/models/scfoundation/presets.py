"""Named scFoundation configurations, registered in :mod:`msfm.registry`.

* ``scfoundation-100m``: the released model (encoder 768 x 12 layers, decoder 512 x 6 layers, 266
  random features per head; 119,252,285 parameters, of which 14.8M are the gene-embedding table).
* ``scfoundation-tiny``: CPU-friendly for tests and docs (full 19,264-gene panel, small widths).
* ``scfoundation-fixture``: the sizes of the official tiny fixture checkpoint
  (``tests/fixtures/scfoundation/tiny_official.ckpt``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from msfm.errors import MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.model import ScFoundation
from msfm.registry import register_model

__all__ = ["PRESET_CONFIGS", "get_preset_config", "list_preset_configs"]

# Only the fields that differ from the ScFoundationConfig defaults (which are the released model).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "scfoundation-100m": {},
    "scfoundation-tiny": {
        "encoder_dim": 64,
        "encoder_depth": 2,
        "encoder_num_heads": 4,
        "encoder_head_dim": 16,
        "decoder_dim": 32,
        "decoder_depth": 2,
        "decoder_num_heads": 2,
        "decoder_head_dim": 16,
    },
    "scfoundation-fixture": {
        "encoder_dim": 32,
        "encoder_depth": 2,
        "encoder_num_heads": 4,
        "encoder_head_dim": 8,
        "decoder_dim": 16,
        "decoder_depth": 2,
        "decoder_num_heads": 2,
        "decoder_head_dim": 8,
        "decoder_nb_features": 16,
    },
}


def list_preset_configs() -> list[str]:
    """Names of the scFoundation presets."""
    return sorted(PRESET_CONFIGS)


def get_preset_config(name: str, **overrides: Any) -> ScFoundationConfig:
    """The config of a named preset, with optional field overrides.

    Args:
        name: preset name, e.g. ``"scfoundation-tiny"``.
        **overrides: config fields to replace.

    Returns:
        The validated config.

    Raises:
        MsfmInputError: for an unknown preset or invalid overrides.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in PRESET_CONFIGS:
        msg = f"unknown scFoundation preset {name!r}; expected one of {list_preset_configs()}."
        raise MsfmInputError(msg)
    try:
        return ScFoundationConfig(**{**PRESET_CONFIGS[key], **overrides})
    except ValidationError as err:
        msg = f"invalid overrides {overrides} for preset {key!r}:\n{err}"
        raise MsfmInputError(msg) from err


@register_model("scfoundation-100m")
def scfoundation_100m(**overrides: Any) -> ScFoundation:
    """The released scFoundation model size (119M parameters incl. the 14.8M gene table)."""
    return ScFoundation(get_preset_config("scfoundation-100m", **overrides))


@register_model("scfoundation-tiny")
def scfoundation_tiny(**overrides: Any) -> ScFoundation:
    """Tiny scFoundation for CPU tests and docs (full gene panel, 64/32-wide, 2+2 layers)."""
    return ScFoundation(get_preset_config("scfoundation-tiny", **overrides))


@register_model("scfoundation-fixture")
def scfoundation_fixture(**overrides: Any) -> ScFoundation:
    """The sizes of the official tiny fixture checkpoint (encoder 32 x 2, decoder 16 x 2)."""
    return ScFoundation(get_preset_config("scfoundation-fixture", **overrides))
