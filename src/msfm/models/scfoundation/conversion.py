"""``convert``: an official scFoundation ``models.ckpt`` (one variant) -> an msfm checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from msfm.data import GenePanel
from msfm.models.scfoundation.provenance import preprocessing_record
from msfm.runtime.atomic import check_output_free

__all__ = ["convert"]


def convert(
    official: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    variant: Literal["cell", "rde", "gene"] = "cell",
    overwrite: bool = False,
) -> Path:
    """Convert an official scFoundation ``models.ckpt`` into an msfm checkpoint directory.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs); every key is renamed by an
    explicit table and checked, name and shape, against the model before anything is written.

    Args:
        official: the official ``models.ckpt``.
        out: checkpoint directory to write (atomically).
        variant: ``cell`` (cell embeddings), ``rde`` (read-depth enhancement) or ``gene`` (gene embeddings and
            expression; the lowest reconstruction error).
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        MsfmInputError: ``out`` exists (without ``overwrite``) or an unknown variant.
        CheckpointError: the file is not an official scFoundation checkpoint.
    """
    from msfm.models.scfoundation.official import load_official_checkpoint
    from msfm.runtime.checkpoint import save_checkpoint
    from msfm.runtime.official_weights import source_record

    target = check_output_free(out, overwrite=overwrite)
    config, state_dict = load_official_checkpoint(official, variant=variant)
    record = source_record(official, what=f"official scFoundation models.ckpt, variant {variant}")
    panel = GenePanel.scfoundation()
    return save_checkpoint(
        target,
        family="scfoundation",
        config=config,
        state_dict=state_dict,
        gene_panel=list(panel.symbols),
        preprocessing=preprocessing_record(),
        extra_meta={
            "source": "official",
            "official_file": str(Path(official).name),
            "official_sha256": record["sha256"],
            "official_recognised_by": record["recognised_by"],
            "variant": variant,
            "licence_note": "Official scFoundation weights are under the non-commercial 'scFoundation License'.",
        },
    )
