"""ROAM's training loss: slide cross-entropy plus the weighted top-k instance loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from msfm.engine.objective import LossOutput

__all__ = ["roam_objective"]


def roam_objective(
    model: torch.nn.Module, batch: Mapping[str, Any], *, roi_weight: float = 1.0
) -> LossOutput:
    """ROAM's loss on a batch of slides.

    Training: ``mean_b CE(logits_b, y_b) + roi_weight * mean_b instance_loss_b`` (the reference's sum over the
    slides of a batch divided by the batch size). Evaluation (the validation loss used to pick the best epoch):
    the slide CE only.

    Args:
        model: A :class:`msfm.models.roam.Roam`.
        batch: Output of :func:`collate_slides`.
        roi_weight: Weight of the instance loss.

    Returns:
        The loss with components ``slide_ce``, ``instance`` (training) and ``acc``.
    """
    labels = batch["labels"]
    use_instance = model.training and roi_weight > 0
    out = model(batch["features"], batch["roi_mask"], labels=labels if use_instance else None)
    logits = out.logits.float()
    ce = F.cross_entropy(logits, labels)
    loss = ce
    components: dict[str, torch.Tensor] = {
        "slide_ce": ce.detach(),
        "acc": (logits.argmax(-1) == labels).float().mean().detach(),
    }
    if use_instance and out.instance_loss is not None:
        inst = out.instance_loss.float()
        loss = ce + roi_weight * inst
        components["instance"] = inst.detach()
    return LossOutput(loss=loss, components=components, n=int(labels.shape[0]))
