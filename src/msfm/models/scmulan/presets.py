"""Named scMulan configurations, registered in :mod:`msfm.registry`.

* ``scmulan-368m``: the released model (1120 x 24 layers, 20 heads; 368,800,320 parameters).
* ``scmulan-tiny``: CPU-friendly for tests, docs and the demo (128 wide, 4 layers).
* ``scmulan-fixture``: the sizes of the official tiny fixture checkpoint (64 wide, 2 layers, 4 heads).

``vocab_size`` follows the vocabulary: pass ``vocab_size=len(vocab)`` for a custom vocabulary.
"""

from __future__ import annotations

from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.model import ScMulan
from msfm.registry import register_preset

register_preset("scmulan-368m", ScMulan, ScMulanConfig, "The released scMulan size (368.8M parameters).")
register_preset(
    "scmulan-tiny",
    ScMulan,
    ScMulanConfig,
    "Tiny scMulan for CPU tests and the demo (128 wide, 4 layers, 4 heads).",
    dim=128,
    depth=4,
    num_heads=4,
)
register_preset(
    "scmulan-fixture",
    ScMulan,
    ScMulanConfig,
    "The sizes of the official tiny fixture checkpoint (64 wide, 2 layers, 4 heads).",
    dim=64,
    depth=2,
    num_heads=4,
)
