"""Named GeST configurations, registered in :mod:`msfm.registry`.

* ``gest-l8h8``: the paper's default depth and heads (8 layers, 8 heads) at our default width 512 (the paper does
  not give the width); K = 2048 meta-cells and levels 15/10/5.
* ``gest-small``: 4 layers, 4 heads, 128 wide: trains on a laptop CPU.
* ``gest-tiny``: 2 layers, 4 heads, 64 wide: tests, docs and the demo.

Pass ``n_genes=...`` and ``level_sizes=...`` to match a vocabulary (``train`` does this for you).
"""

from __future__ import annotations

from msfm.models.gest.config import GestConfig
from msfm.models.gest.model import Gest
from msfm.registry import register_preset

register_preset(
    "gest-l8h8",
    Gest,
    GestConfig,
    "The paper's default depth and heads (L8H8) at width 512, K = 2048 meta-cells, levels 15/10/5.",
)
register_preset(
    "gest-small",
    Gest,
    GestConfig,
    "Small GeST (4 layers, 4 heads, 128 wide) that trains on a CPU.",
    dim=128,
    depth=4,
    num_heads=4,
)
register_preset(
    "gest-tiny",
    Gest,
    GestConfig,
    "Tiny GeST (2 layers, 4 heads, 64 wide) for tests, docs and the demo.",
    dim=64,
    depth=2,
    num_heads=4,
)
