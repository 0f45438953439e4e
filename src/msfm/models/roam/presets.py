"""Named ROAM configurations, registered in :mod:`msfm.registry`.

* ``roam-subtyping``: the released glioma-subtyping model (d_in 1024, 256 wide, depths 2x5; 8,773,823 parameters).
* ``roam-tiny``: CPU-friendly for tests, docs and the demo (64 wide, one layer per stack).
* ``roam-fixture``: the sizes of the official tiny fixture checkpoint (d_in 64, 32 wide, depths 2/1/2/1/2).

``d_in`` must match the patch encoder (1024 for ``resnet50_trunc``); pass ``d_in=...`` and ``n_classes=...``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from msfm.errors import MsfmInputError
from msfm.models.roam.config import RoamConfig
from msfm.models.roam.model import Roam
from msfm.registry import register_model

__all__ = ["PRESET_CONFIGS", "get_preset_config", "list_preset_configs"]

PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "roam-subtyping": {},
    "roam-tiny": {
        "dim": 64,
        "heads": 4,
        "dim_head": 16,
        "mlp_dim": 128,
        "depths": (1, 1, 1, 1, 1),
        "dropout": 0.1,
    },
    "roam-fixture": {
        "d_in": 64,
        "dim": 32,
        "heads": 2,
        "dim_head": 16,
        "mlp_dim": 64,
        "depths": (2, 1, 2, 1, 2),
        "dropout": 0.0,
        "mil_dropout": 0.0,
    },
}


def list_preset_configs() -> list[str]:
    """Names of the ROAM presets."""
    return sorted(PRESET_CONFIGS)


def get_preset_config(name: str, **overrides: Any) -> RoamConfig:
    """The config of a named preset with optional field overrides (``MsfmInputError`` when unknown/invalid)."""
    key = name.strip().lower().replace("_", "-")
    if not key.startswith("roam-"):
        key = f"roam-{key}"
    if key not in PRESET_CONFIGS:
        msg = f"unknown ROAM preset {name!r}; expected one of {list_preset_configs()}."
        raise MsfmInputError(msg)
    try:
        return RoamConfig(**{**PRESET_CONFIGS[key], **overrides})
    except ValidationError as err:
        msg = f"invalid overrides {overrides} for preset {key!r}:\n{err}"
        raise MsfmInputError(msg) from err


@register_model("roam-subtyping")
def roam_subtyping(**overrides: Any) -> Roam:
    """The released ROAM size (glioma subtyping, 8.77M parameters at d_in 1024, 3 classes)."""
    return Roam(get_preset_config("roam-subtyping", **overrides))


@register_model("roam-tiny")
def roam_tiny(**overrides: Any) -> Roam:
    """Tiny ROAM for CPU tests and the demo (64 wide, one layer per stack)."""
    return Roam(get_preset_config("roam-tiny", **overrides))


@register_model("roam-fixture")
def roam_fixture(**overrides: Any) -> Roam:
    """The sizes of the official tiny fixture (d_in 64, 32 wide, depths 2/1/2/1/2)."""
    return Roam(get_preset_config("roam-fixture", **overrides))
