"""``convert``: the official ``ckpt_scMulan.pt`` into an msfm checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path

from msfm.models.scmulan.loading import preprocessing_record, save_model
from msfm.models.scmulan.model import ScMulan
from msfm.runtime.atomic import check_output_free
from msfm.tokenizers.cell_sentence import CellSentenceVocab

__all__ = ["convert"]


def convert(
    official: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Convert an official scMulan ``ckpt_scMulan.pt`` into an msfm checkpoint directory.

    The file is read with ``weights_only=True``; the official 2,222-token vocabulary is stored with the weights
    and ``meta.json`` records the source file name and its sha256.

    Args:
        official: the official file.
        out: the checkpoint directory to write (atomically).
        overwrite: replace an existing ``out``.

    Returns:
        ``out``, loadable with ``msfm.scmulan.load``.

    Raises:
        MsfmInputError: ``out`` exists (without ``overwrite``).
        CheckpointError: the file is missing or is not an official scMulan checkpoint.
    """
    from msfm.models.scmulan.official import load_official_checkpoint
    from msfm.runtime.official_weights import source_record

    official = Path(official)
    out = Path(out)
    check_output_free(out, overwrite=overwrite)
    config, state_dict = load_official_checkpoint(official)
    model = ScMulan(config)
    model.load_state_dict(state_dict, strict=True)
    record = source_record(
        official, what=f"official scMulan checkpoint ({config.depth} layers of width {config.dim})"
    )
    return save_model(
        out,
        model,
        CellSentenceVocab.official(),
        preprocessing=preprocessing_record(n_levels=config.n_levels),
        extra_meta={
            "source": "official scMulan",
            "official_file": official.name,
            "official_sha256": record["sha256"],
            "official_recognised_by": record["recognised_by"],
            "licence_note": "Official scMulan code and weights: SuperBianC/scMulan (MIT licence).",
        },
    )
