"""Named scFoundation configurations, registered in :mod:`msfm.registry`.

* ``scfoundation-100m``: the released model (encoder 768 x 12 layers, decoder 512 x 6 layers, 266
  random features per head; 119,252,285 parameters, of which 14.8M are the gene-embedding table).
* ``scfoundation-tiny``: CPU-friendly for tests and docs (full 19,264-gene panel, small widths).
* ``scfoundation-fixture``: the sizes of the official tiny fixture checkpoint
  (``tests/fixtures/scfoundation/tiny_official.ckpt``).
"""

from __future__ import annotations

from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.model import ScFoundation
from msfm.registry import register_preset

register_preset(
    "scfoundation-100m",
    ScFoundation,
    ScFoundationConfig,
    "The released scFoundation model size (119M parameters incl. the 14.8M gene table).",
)
register_preset(
    "scfoundation-tiny",
    ScFoundation,
    ScFoundationConfig,
    "Tiny scFoundation for CPU tests and docs (full gene panel, 64/32-wide, 2+2 layers).",
    encoder_dim=64,
    encoder_depth=2,
    encoder_num_heads=4,
    encoder_head_dim=16,
    decoder_dim=32,
    decoder_depth=2,
    decoder_num_heads=2,
    decoder_head_dim=16,
)
register_preset(
    "scfoundation-fixture",
    ScFoundation,
    ScFoundationConfig,
    "The sizes of the official tiny fixture checkpoint (encoder 32 x 2, decoder 16 x 2).",
    encoder_dim=32,
    encoder_depth=2,
    encoder_num_heads=4,
    encoder_head_dim=8,
    decoder_dim=16,
    decoder_depth=2,
    decoder_num_heads=2,
    decoder_head_dim=8,
    decoder_nb_features=16,
)
