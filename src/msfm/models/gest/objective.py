"""GeST training objective: hierarchical cross-entropy over nested meta-cell levels (paper §4.2).

For level ``i`` the meta-cell probabilities are summed within each level-``i`` cluster,
``p_i(k) = sum_c 1[l_i(c) = k] p(c)``, and ``L = sum_i alpha_i CE(p_i, l_i(target))`` (``alpha_i = 0.25`` for the
paper's four levels). Level 0 is the plain cross-entropy over meta-cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from msfm.engine.objective import LossOutput

__all__ = [
    "GestLossConfig",
    "gest_objective",
    "hierarchical_cross_entropy",
    "hierarchical_log_probs",
    "window_batch",
]

#: Floor on a cluster's summed probability before the log: a cluster whose mass underflows float32 gets a large
#: but finite loss (about 87 nats) instead of inf.
_TINY = 1e-38


class GestLossConfig(BaseModel):
    """Weights of the hierarchical cross-entropy.

    Attributes:
        level_weights: ``alpha_i`` per level, meta-cell level first; None gives ``1 / n_levels`` each (0.25 for
            the paper's four levels). A single weight ``(1.0,)`` is the "w/o hierarchy" ablation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    level_weights: tuple[float, ...] | None = None

    def weights(self, n_levels: int) -> tuple[float, ...]:
        """Resolved weights for a model with ``n_levels`` levels (missing trailing levels weigh 0)."""
        if self.level_weights is None:
            return (1.0 / n_levels,) * n_levels
        if len(self.level_weights) > n_levels:
            msg = f"level_weights has {len(self.level_weights)} entries but the model has {n_levels} levels."
            raise ValueError(msg)
        return tuple(self.level_weights) + (0.0,) * (n_levels - len(self.level_weights))


def hierarchical_log_probs(logits: Tensor, hierarchy: Tensor, level_sizes: Sequence[int]) -> list[Tensor]:
    """Log-probabilities of the clusters at every level.

    Args:
        logits: meta-cell logits.
        hierarchy: level labels of every meta-cell (row 0 = identity).
        level_sizes: clusters per level.

    Returns:
        One tensor per level; ``exp`` of each sums to 1 over its last axis.

    Shape:
        - logits: ``[..., K]``
        - hierarchy: ``[n_levels, K]``
        - returns: list of ``[..., K_i]``
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = [logits - lse]
    if len(level_sizes) == 1:
        return out
    m = logits.amax(dim=-1, keepdim=True)
    e = (logits - m).exp()
    flat = e.reshape(-1, e.shape[-1])
    for level in range(1, len(level_sizes)):
        sums = flat.new_zeros(flat.shape[0], level_sizes[level]).index_add_(1, hierarchy[level], flat)
        sums = sums.view(*e.shape[:-1], level_sizes[level])
        out.append(sums.clamp_min(_TINY).log() + m - lse)
    return out


def hierarchical_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    hierarchy: Tensor,
    level_sizes: Sequence[int],
    weights: Sequence[float],
    *,
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of per-level cross-entropies, averaged over valid targets.

    Args:
        logits: meta-cell logits.
        targets: target meta-cell ids.
        hierarchy: level labels (row 0 = identity).
        level_sizes: clusters per level.
        weights: ``alpha_i`` per level.
        valid: True where a target is real (None: all).

    Returns:
        The loss and named components (``ce_l{i}`` and ``acc_l0``).

    Shape:
        - logits: ``[..., K]``
        - targets, valid: ``[...]``
    """
    if valid is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    n = valid.sum().clamp_min(1)
    logps = hierarchical_log_probs(logits, hierarchy, level_sizes)
    loss = logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    for level, (logp, w) in enumerate(zip(logps, weights, strict=True)):
        tgt = targets if level == 0 else hierarchy[level][targets]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        ce = (nll * valid).sum() / n
        parts[f"ce_l{level}"] = ce.detach()
        if w:
            loss = loss + w * ce
    acc = ((logps[0].argmax(-1) == targets) & valid).sum() / n
    parts["acc_l0"] = acc.detach().float()
    return loss, parts


def window_batch(model_inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Split a batch of right-padded serialised windows into decoder inputs and targets.

    Args:
        model_inputs: ``pos [b, N, 2]`` (window-normalised), ``tokens [b, N]`` and ``mask [b, N]`` (True = real,
            real cells first).

    Returns:
        ``(inputs, targets, valid)``: the keyword inputs of :meth:`Gest.forward` for rows ``0..N-2``, the tokens of
        cells ``1..N-1`` and where those are real.
    """
    pos, tokens, mask = model_inputs["pos"], model_inputs["tokens"], model_inputs["mask"]
    inputs = {"query_pos": pos[:, 1:], "content_pos": pos[:, :-1], "tokens": tokens[:, :-1]}
    # Right padding: a real row never attends to a later (padded) row, so no key mask is needed.
    return inputs, tokens[:, 1:], mask[:, 1:] & mask[:, :-1]


def gest_objective(model: Any, batch: dict[str, Tensor], config: GestLossConfig | None = None) -> LossOutput:
    """Next-cell hierarchical cross-entropy of a batch of windows (the engine's objective contract).

    Args:
        model: a :class:`msfm.models.gest.model.Gest`.
        batch: see :func:`window_batch`.
        config: loss weights.

    Returns:
        The loss, its per-level components and the number of predicted cells.
    """
    config = config or GestLossConfig()
    inputs, targets, valid = window_batch(batch)
    out = model(**inputs)
    c = model.config
    loss, parts = hierarchical_cross_entropy(
        out.logits, targets, model.hierarchy, c.level_sizes, config.weights(c.n_levels), valid=valid
    )
    return LossOutput(loss=loss, components=parts, n=max(int(valid.sum()), 1))
