"""``Loaded``: what ``msfm.<family>.load(checkpoint)`` returns in every family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Loaded"]


@dataclass(frozen=True)
class Loaded:
    """A checkpoint made ready for inference: the model on its device plus everything needed to feed it.

    Every verb takes a checkpoint path or a ``Loaded``; load once and pass it to several verbs to skip re-reading.

    Attributes:
        family: ``"scfoundation"``, ``"scmulan"``, ``"roam"`` or ``"gest"``.
        model: the network in eval mode (for a ROAM training run: the ensemble of its fold models).
        config: the family's typed model config.
        meta: the checkpoint's ``meta.json`` (msfm version, preprocessing, provenance in ``meta["extra"]``).
        path: the checkpoint directory (None for a model built in memory).
        device: where the model lives.
        vocab: what turns data into model inputs: the gene panel (scFoundation), the cell-sentence vocabulary
            (scMulan), the meta-cell vocabulary (GeST); None for ROAM, whose inputs are feature files.
    """

    family: str
    model: torch.nn.Module
    config: Any
    meta: dict[str, Any]
    path: Path | None
    device: torch.device
    vocab: Any = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How inputs were prepared for this model (``meta["preprocessing"]``)."""
        return dict(self.meta.get("preprocessing") or {})

    @property
    def extra(self) -> dict[str, Any]:
        """Family-specific provenance stored with the weights (``meta["extra"]``)."""
        return dict(self.meta.get("extra") or {})

    def to(self, device: torch.device | str) -> Loaded:
        """The same model moved to ``device`` (a new ``Loaded``; the model object is shared)."""
        dev = torch.device(device)
        self.model.to(dev)
        return dataclasses.replace(self, device=dev)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"Loaded({self.family}, {n:,} parameters, {self.device}, path={self.path})"
