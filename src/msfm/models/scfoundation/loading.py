"""``load``: an msfm scFoundation checkpoint (a model or a cell-type classifier) made ready for inference.

Every verb takes a checkpoint path, a :class:`~msfm.runtime.results.TrainResult` or a
:class:`~msfm.runtime.loaded.Loaded`; :func:`load` turns any of them into a ``Loaded`` whose ``vocab`` is the
checkpoint's :class:`~msfm.data.GenePanel`. Load once and pass the ``Loaded`` to several verbs to skip re-reading.
"""

from __future__ import annotations

import os
from pathlib import Path

from msfm.data import GenePanel
from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.finetune import ClassifierCheckpointConfig, ScFoundationCellClassifier
from msfm.models.scfoundation.model import ScFoundation
from msfm.runtime.checkpoint import LoadedCheckpoint, load_checkpoint
from msfm.runtime.config import checkpoint_config
from msfm.runtime.devices import resolve_device
from msfm.runtime.loaded import Loaded
from msfm.runtime.weights_check import build_checked_model
from msfm.tokenizers.gene_panel import ScFoundationTokenizer

__all__ = ["CLASSIFIER_FAMILY", "FAMILY", "backbone_of", "is_classifier", "load", "tokenizer_for"]

FAMILY = "scfoundation"
#: ``config.json`` family of the checkpoints ``fit_classifier`` writes.
CLASSIFIER_FAMILY = "scfoundation-classifier"

CheckpointLike = str | os.PathLike[str] | Loaded


def load(checkpoint: CheckpointLike, *, device: str = "auto") -> Loaded:
    """Load an scFoundation checkpoint directory (from ``convert``, ``train`` or ``fit_classifier``).

    Args:
        checkpoint: the checkpoint directory, a ``TrainResult``, or a ``Loaded`` (passed through, moved to
            ``device``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Returns:
        ``Loaded(family="scfoundation", model, config, meta, path, device, vocab=GenePanel)``. For a classifier
        the model is a :class:`ScFoundationCellClassifier` and the config a :class:`ClassifierCheckpointConfig`.

    Raises:
        CheckpointError: not an msfm scFoundation checkpoint (an official ``models.ckpt`` must be converted
            first), a ``config.json`` field that is unknown, mistyped or out of range, a model larger than
            ``msfm.runtime.weights_check.MAX_PARAMETERS``, or tensors missing, unexpected or of another shape or
            dtype than the config's model (checked on the file's header before any weight is read).
    """
    dev = resolve_device(device)
    if isinstance(checkpoint, Loaded):
        if checkpoint.family != FAMILY:
            msg = (
                f"Got a Loaded {checkpoint.family!r} model; scFoundation verbs need an scFoundation checkpoint. "
                "Load it with msfm.scfoundation.load(path)."
            )
            raise CheckpointError(msg)
        return checkpoint if checkpoint.device == dev else checkpoint.to(dev)
    if not isinstance(checkpoint, str | os.PathLike):
        msg = f"checkpoint must be a checkpoint directory, a TrainResult or a Loaded; got {type(checkpoint).__name__}."
        raise MsfmInputError(msg)
    ckpt = _read(Path(checkpoint))
    model, config = _build(ckpt)
    model.to(dev).eval()
    return Loaded(
        family=FAMILY,
        model=model,
        config=config,
        meta=ckpt.meta,
        path=Path(ckpt.path),
        device=dev,
        vocab=_panel(ckpt),
    )


def _read(path: Path) -> LoadedCheckpoint:
    """The checkpoint at ``path``: an scFoundation model or classifier (a folder's family is read, then checked)."""
    # Anything but a checkpoint folder is refused by load_checkpoint, with the hint for this family.
    ckpt = load_checkpoint(path, family=None if (path / "config.json").is_file() else FAMILY, weights=False)
    if ckpt.family not in (FAMILY, CLASSIFIER_FAMILY):
        msg = (
            f"Checkpoint {path} is a {ckpt.family!r} checkpoint; scFoundation verbs need a {FAMILY!r} model "
            f"(convert, train) or a {CLASSIFIER_FAMILY!r} checkpoint (fit_classifier). Use msfm.{ckpt.family} "
            "to load it."
        )
        raise CheckpointError(msg)
    return ckpt


def _build(
    ckpt: LoadedCheckpoint,
) -> tuple[ScFoundation | ScFoundationCellClassifier, ScFoundationConfig | ClassifierCheckpointConfig]:
    """The model of ``ckpt`` with its weights, after its config, its size and its tensors are checked."""
    config: ScFoundationConfig | ClassifierCheckpointConfig
    if ckpt.family == CLASSIFIER_FAMILY:
        config = checkpoint_config(ClassifierCheckpointConfig, ckpt.config, ckpt.config_file)
        clf = config

        def build() -> ScFoundation | ScFoundationCellClassifier:
            return ScFoundationCellClassifier(ScFoundation(clf.backbone), clf.classifier)

        fields = {**clf.backbone.model_dump(), "num_classes": clf.classifier.num_classes}
    else:
        config = checkpoint_config(ScFoundationConfig, ckpt.config, ckpt.config_file)
        backbone = config

        def build() -> ScFoundation | ScFoundationCellClassifier:
            return ScFoundation(backbone)

        fields = backbone.model_dump()
    model, _ = build_checked_model(
        build, ckpt.weights_file, header=ckpt.tensors, config_file=ckpt.config_file, fields=fields
    )
    return model, config  # type: ignore[return-value]


def _panel(ckpt: LoadedCheckpoint) -> GenePanel:
    if not ckpt.gene_panel:
        return GenePanel.scfoundation()
    name = (ckpt.meta.get("gene_panel") or {}).get("name") or "checkpoint"
    return GenePanel.from_symbols(ckpt.gene_panel, name=name)


def is_classifier(loaded: Loaded) -> bool:
    """Whether ``loaded`` holds a cell-type classifier (from ``fit_classifier``)."""
    return isinstance(loaded.model, ScFoundationCellClassifier)


def backbone_of(loaded: Loaded) -> Loaded:
    """The encoder-decoder of ``loaded``: itself for a model, the fine-tuned backbone for a classifier."""
    if not is_classifier(loaded):
        return loaded
    import dataclasses

    return dataclasses.replace(loaded, model=loaded.model.backbone, config=loaded.config.backbone)


def tokenizer_for(loaded: Loaded) -> ScFoundationTokenizer:
    """The tokenizer of ``loaded``'s gene panel."""
    return ScFoundationTokenizer(num_genes=backbone_of(loaded).config.num_genes)
