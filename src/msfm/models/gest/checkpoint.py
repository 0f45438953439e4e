"""Save and load GeST models with their meta-cell vocabulary as one msfm checkpoint directory.

The vocabulary (PCA, meta-cell centroids and profiles, hierarchy) is stored in the same safetensors file as the
weights, under ``metacells.*``, so a checkpoint can quantise new cells exactly as in training. The window settings
(side in µm, ordering) and the expression preprocessing travel in ``meta.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from msfm.errors import CheckpointError
from msfm.models.gest.config import GestConfig
from msfm.models.gest.model import Gest
from msfm.runtime.checkpoint import load_checkpoint, save_checkpoint
from msfm.runtime.devices import resolve_device
from msfm.tokenizers.spatial import MetaCellVocab

__all__ = ["FAMILY", "VOCAB_PREFIX", "LoadedGest", "checkpoint_state", "load_model", "save_model"]

FAMILY = "gest"
VOCAB_PREFIX = "metacells."


@dataclass
class LoadedGest:
    """A GeST model ready for inference.

    Attributes:
        model: the network (eval mode, on ``device``).
        vocab: its meta-cell vocabulary.
        window: window settings used in training (``side_um``, ``order``, ``jitter_um``, ``max_cells``).
        preprocessing: expression preprocessing record.
        meta: the whole ``meta.json``.
        path: checkpoint directory (None when built in memory).
        device: where the model lives.
    """

    model: Gest
    vocab: MetaCellVocab
    window: dict[str, Any]
    preprocessing: dict[str, Any]
    meta: dict[str, Any]
    path: Path | None
    device: torch.device

    @property
    def side_um(self) -> float:
        """Window side in µm."""
        return float(self.window.get("side_um", 600.0))


def checkpoint_state(model: Gest, vocab: MetaCellVocab) -> dict[str, torch.Tensor]:
    """Weights plus vocabulary tensors, as stored in ``model.safetensors``."""
    state = {k: v for k, v in model.state_dict().items()}
    state.update({VOCAB_PREFIX + k: v for k, v in vocab.to_tensors().items()})
    return state


def save_model(
    path: str | Path,
    model: Gest,
    vocab: MetaCellVocab,
    *,
    window: Mapping[str, Any],
    preprocessing: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and ``vocab`` as an msfm checkpoint directory (atomically).

    Args:
        path: directory to create or replace.
        model: the network.
        vocab: its meta-cell vocabulary.
        window: window settings (``side_um`` at least).
        preprocessing: expression preprocessing record.
        extra: further provenance for ``meta.json['extra']``.

    Returns:
        The checkpoint directory.
    """
    return save_checkpoint(
        path,
        family=FAMILY,
        config=model.config,
        state_dict=checkpoint_state(model, vocab),
        gene_panel=vocab.genes,
        gene_panel_name="gest",
        preprocessing=dict(preprocessing or {}),
        extra_meta={"window": dict(window), "vocab": vocab.meta_dict(), **dict(extra or {})},
    )


def load_model(path: str | Path | LoadedGest, *, device: str | torch.device = "auto") -> LoadedGest:
    """Load an msfm GeST checkpoint directory (or pass a loaded one through, moved to ``device``).

    Raises:
        CheckpointError: not a GeST checkpoint, or weights/vocabulary that do not match the config.
    """
    dev = resolve_device(device)
    if isinstance(path, LoadedGest):
        path.model.to(dev)
        path.device = dev
        return path
    ckpt = load_checkpoint(path, family=FAMILY, map_location="cpu")
    try:
        config = GestConfig(**ckpt.config)
    except ValidationError as err:
        msg = f"{path}: config.json is not a valid GeST config ({err.errors()[0]['msg']})."
        raise CheckpointError(msg) from err
    vocab_state = {
        k[len(VOCAB_PREFIX) :]: v for k, v in ckpt.state_dict.items() if k.startswith(VOCAB_PREFIX)
    }
    weights = {k: v for k, v in ckpt.state_dict.items() if not k.startswith(VOCAB_PREFIX)}
    extra = ckpt.meta.get("extra", {})
    if not vocab_state or "vocab" not in extra:
        msg = f"{path} has no meta-cell vocabulary (no '{VOCAB_PREFIX}*' tensors); it cannot tokenise cells."
        raise CheckpointError(msg)
    vocab = MetaCellVocab.from_tensors(vocab_state, extra["vocab"])
    model = Gest(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        msg = f"{path}: weights do not match the GeST config ({str(err).splitlines()[0]})."
        raise CheckpointError(msg) from err
    if vocab.n_metacells != config.n_metacells or vocab.n_genes != config.n_genes:
        msg = (
            f"{path}: vocabulary has K={vocab.n_metacells}, T={vocab.n_genes}; the model expects "
            f"K={config.n_metacells}, T={config.n_genes}."
        )
        raise CheckpointError(msg)
    model.eval().to(dev)
    return LoadedGest(
        model=model,
        vocab=vocab,
        window=dict(extra.get("window", {})),
        preprocessing=dict(ckpt.meta.get("preprocessing") or {}),
        meta=ckpt.meta,
        path=Path(path),
        device=dev,
    )
