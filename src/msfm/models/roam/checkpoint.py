"""ROAM models as msfm checkpoint directories (safetensors + config + meta), and :func:`convert` of the release.

``msfm.roam.load`` (see :mod:`msfm.models.roam.ensemble`) is the public loader; :func:`read_model` here reads one
checkpoint directory into a :class:`Roam` and its ``meta.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from msfm.models.roam.config import RoamConfig
from msfm.models.roam.model import Roam
from msfm.runtime.atomic import check_output_free
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.config import checkpoint_config
from msfm.runtime.weights_check import build_checked_model

__all__ = ["FAMILY", "convert", "read_model", "save_model"]

FAMILY = "roam"


def save_model(
    model: Roam,
    path: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an msfm checkpoint directory (atomically).

    Args:
        model: The model.
        path: Checkpoint directory to create or replace.
        extra: JSON-serialisable provenance stored in ``meta.json["extra"]``: task name, class names, the patch
            encoder description (``encoder``) and the feature dimension, training fold, ...
        preprocessing: The slide preprocessing config (target mpp, ROI size, stain normalisation, encoder) so
            that new slides are processed the same way.

    Returns:
        The checkpoint directory.
    """
    return save_checkpoint(
        path,
        family=FAMILY,
        config=model.config,
        state_dict=model.state_dict(),
        preprocessing=dict(preprocessing) if preprocessing is not None else None,
        extra_meta=dict(extra or {}),
    )


def read_model(path: str | Path, *, map_location: str = "cpu") -> tuple[Roam, dict[str, Any]]:
    """Read one msfm ROAM checkpoint directory (``msfm.roam.load`` is the public loader).

    Returns:
        ``(model in eval mode, meta)``; ``meta["extra"]`` holds what :func:`save_model` was given.

    Raises:
        CheckpointError: If the directory is not a ROAM checkpoint, a ``config.json`` field is unknown, mistyped
            or out of range, the model is larger than ``msfm.runtime.weights_check.MAX_PARAMETERS``, or tensors
            are missing, unexpected or of another shape or dtype than the config's model.
    """
    ckpt = load_checkpoint(path, family=FAMILY, map_location=map_location, weights=False)
    config = checkpoint_config(RoamConfig, ckpt.config, ckpt.config_file)
    model, _ = build_checked_model(
        lambda: Roam(config),
        ckpt.weights_file,
        header=ckpt.tensors,
        config_file=ckpt.config_file,
        fields=config.model_dump(),
        device=str(map_location),
    )
    return model.eval(), dict(ckpt.meta)


def convert(
    official: str | Path,
    out: str | Path,
    *,
    class_names: list[str] | tuple[str, ...] | str | None = None,
    task: str | None = None,
    encoder: str = "resnet50_trunc",
    fold: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a released ``ROAM_split{k}.pth`` into an msfm checkpoint directory.

    Five converted folds form an ensemble: ``msfm.roam.load([fold0, ..., fold4])``, or pass the list wherever a
    checkpoint is expected.

    Args:
        official: The released state dict file (read with ``weights_only=True``).
        out: Checkpoint directory to write.
        class_names: Class names in logit order, a list or comma-separated (the release's subtyping model:
            astrocytoma, oligodendroglioma, ependymoma).
        task: Task name stored with the weights.
        encoder: Patch encoder the features must come from (the released models: ``resnet50_trunc``, 1024-d).
        fold: Cross-validation fold the file belongs to (provenance only).
        overwrite: Replace an existing ``out``.

    Returns:
        The checkpoint directory.

    Raises:
        MsfmInputError: ``out`` exists and ``overwrite`` is False.
        CheckpointError: The file is missing, unreadable or not a released multi-scale ROAM state dict.
    """
    from msfm.models.roam.official import load_official_checkpoint
    from msfm.runtime.official_weights import source_record

    check_output_free(out, overwrite=overwrite)
    if isinstance(class_names, str):
        class_names = [c.strip() for c in class_names.split(",") if c.strip()]
    overrides: dict[str, Any] = {}
    if class_names is not None:
        overrides["class_names"] = tuple(class_names)
    model = load_official_checkpoint(official, **overrides)
    n_classes = len(model.config.class_names) if model.config.class_names else "?"
    record = source_record(official, what=f"released ROAM fold checkpoint, {n_classes} classes")
    extra = {
        "task": task,
        "class_names": list(model.config.class_names) if model.config.class_names else None,
        "encoder": {"name": encoder, "dim": model.config.d_in},
        "feature_dim": model.config.d_in,
        "source": {
            "official_checkpoint": str(Path(official).resolve()),
            "fold": fold,
            "sha256": record["sha256"],
            "recognised_by": record["recognised_by"],
        },
    }
    return save_model(model, out, extra=extra)
