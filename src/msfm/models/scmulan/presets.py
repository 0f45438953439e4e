"""Named scMulan configurations, registered in :mod:`msfm.registry`.

* ``scmulan-368m``: the released model (1120 x 24 layers, 20 heads; 368,800,320 parameters).
* ``scmulan-tiny``: CPU-friendly for tests, docs and the demo (128 wide, 4 layers).
* ``scmulan-fixture``: the sizes of the official tiny fixture checkpoint (64 wide, 2 layers, 4 heads).

``vocab_size`` follows the vocabulary: pass ``vocab_size=len(vocab)`` for a custom vocabulary.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from msfm.errors import MsfmInputError
from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.model import ScMulan
from msfm.registry import register_model

__all__ = ["PRESET_CONFIGS", "get_preset_config", "list_preset_configs"]

PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "scmulan-368m": {},
    "scmulan-tiny": {"dim": 128, "depth": 4, "num_heads": 4},
    "scmulan-fixture": {"dim": 64, "depth": 2, "num_heads": 4},
}


def list_preset_configs() -> list[str]:
    """Names of the scMulan presets."""
    return sorted(PRESET_CONFIGS)


def get_preset_config(name: str, **overrides: Any) -> ScMulanConfig:
    """The config of a named preset with optional field overrides (``MsfmInputError`` when unknown/invalid)."""
    key = name.strip().lower().replace("_", "-")
    if not key.startswith("scmulan-"):
        key = f"scmulan-{key}"
    if key not in PRESET_CONFIGS:
        msg = f"unknown scMulan preset {name!r}; expected one of {list_preset_configs()}."
        raise MsfmInputError(msg)
    try:
        return ScMulanConfig(**{**PRESET_CONFIGS[key], **overrides})
    except ValidationError as err:
        msg = f"invalid overrides {overrides} for preset {key!r}:\n{err}"
        raise MsfmInputError(msg) from err


@register_model("scmulan-368m")
def scmulan_368m(**overrides: Any) -> ScMulan:
    """The released scMulan size (368.8M parameters)."""
    return ScMulan(get_preset_config("scmulan-368m", **overrides))


@register_model("scmulan-tiny")
def scmulan_tiny(**overrides: Any) -> ScMulan:
    """Tiny scMulan for CPU tests and the demo (128 wide, 4 layers, 4 heads)."""
    return ScMulan(get_preset_config("scmulan-tiny", **overrides))


@register_model("scmulan-fixture")
def scmulan_fixture(**overrides: Any) -> ScMulan:
    """The sizes of the official tiny fixture checkpoint (64 wide, 2 layers, 4 heads)."""
    return ScMulan(get_preset_config("scmulan-fixture", **overrides))
