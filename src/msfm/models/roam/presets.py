"""Named ROAM configurations, registered in :mod:`msfm.registry`.

* ``roam-subtyping``: the released glioma-subtyping model (d_in 1024, 256 wide, depths 2x5; 8,773,823 parameters).
* ``roam-tiny``: CPU-friendly for tests, docs and the demo (64 wide, one layer per stack).
* ``roam-fixture``: the sizes of the official tiny fixture checkpoint (d_in 64, 32 wide, depths 2/1/2/1/2).

``d_in`` must match the patch encoder (1024 for ``resnet50_trunc``); pass ``d_in=...`` and ``n_classes=...``.
"""

from __future__ import annotations

from msfm.models.roam.config import RoamConfig
from msfm.models.roam.model import Roam
from msfm.registry import register_preset

register_preset(
    "roam-subtyping",
    Roam,
    RoamConfig,
    "The released ROAM size (glioma subtyping, 8.77M parameters at d_in 1024, 3 classes).",
)
register_preset(
    "roam-tiny",
    Roam,
    RoamConfig,
    "Tiny ROAM for CPU tests and the demo (64 wide, one layer per stack).",
    dim=64,
    heads=4,
    dim_head=16,
    mlp_dim=128,
    depths=(1, 1, 1, 1, 1),
    dropout=0.1,
)
register_preset(
    "roam-fixture",
    Roam,
    RoamConfig,
    "The sizes of the official tiny fixture (d_in 64, 32 wide, depths 2/1/2/1/2).",
    d_in=64,
    dim=32,
    heads=2,
    dim_head=16,
    mlp_dim=64,
    depths=(2, 1, 2, 1, 2),
    dropout=0.0,
    mil_dropout=0.0,
)
