"""Named GeST configurations, registered in :mod:`msfm.registry`.

* ``gest-l8h8``: the paper's default depth and heads (8 layers, 8 heads) at our default width 512 (the paper does
  not give the width); K = 2048 meta-cells and levels 15/10/5.
* ``gest-small``: 4 layers, 4 heads, 128 wide: trains on a laptop CPU.
* ``gest-tiny``: 2 layers, 4 heads, 64 wide: tests, docs and the demo.

Pass ``n_genes=...`` and ``level_sizes=...`` to match a vocabulary (``train`` does this for you).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from msfm.errors import MsfmInputError
from msfm.models.gest.config import GestConfig
from msfm.models.gest.model import Gest
from msfm.registry import register_model

__all__ = ["PRESET_CONFIGS", "get_preset_config", "list_preset_configs"]

PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "gest-l8h8": {},
    "gest-small": {"dim": 128, "depth": 4, "num_heads": 4},
    "gest-tiny": {"dim": 64, "depth": 2, "num_heads": 4},
}


def list_preset_configs() -> list[str]:
    """Names of the GeST presets."""
    return sorted(PRESET_CONFIGS)


def get_preset_config(name: str, **overrides: Any) -> GestConfig:
    """The config of a preset with overrides applied.

    Raises:
        MsfmInputError: unknown preset or invalid override.
    """
    if name not in PRESET_CONFIGS:
        msg = f"Unknown GeST preset {name!r}; expected one of {list_preset_configs()}."
        raise MsfmInputError(msg)
    try:
        return GestConfig(**{**PRESET_CONFIGS[name], **overrides})
    except ValidationError as err:
        msg = f"Invalid GeST config for preset {name!r}: {err.errors()[0]['msg']}"
        raise MsfmInputError(msg) from err


@register_model("gest-l8h8")
def gest_l8h8(**overrides: Any) -> Gest:
    """The paper's default depth and heads (L8H8) at width 512, K = 2048 meta-cells, levels 15/10/5."""
    return Gest(get_preset_config("gest-l8h8", **overrides))


@register_model("gest-small")
def gest_small(**overrides: Any) -> Gest:
    """Small GeST (4 layers, 4 heads, 128 wide) that trains on a CPU."""
    return Gest(get_preset_config("gest-small", **overrides))


@register_model("gest-tiny")
def gest_tiny(**overrides: Any) -> Gest:
    """Tiny GeST (2 layers, 4 heads, 64 wide) for tests, docs and the demo."""
    return Gest(get_preset_config("gest-tiny", **overrides))
