"""The GEARS-style perturbation head on scFoundation decoder context embeddings (tensors in, tensors out).

Per gene: ``base = MLP(BN(context)) + pos_weight * SGConv_coexpression(position embedding)`` (the official ``v1``
mode: the cell-specific context embeddings replace GEARS' learned gene embedding). The perturbation state is the
sum, over the perturbed tokens, of learned gene-perturbation embeddings propagated by SGConv over the perturbation
graph (GO if given, else co-expression), plus one learned embedding per non-gene label; it is added to every gene's
state. A per-gene linear read-out gives the delta; the prediction is the control expression plus the delta.
"""

from __future__ import annotations

import torch
from torch import nn

from msfm.models.scfoundation.perturb_config import PerturbHeadConfig

__all__ = ["PerturbationHead", "perturbation_loss"]


class PerturbationHead(nn.Module):
    """Predict post-perturbation expression from a control cell's context embeddings.

    Args:
        config: sizes.
        coexpression_edges: ``[2, E1]`` int64 edges of the co-expression graph over the genes.
        coexpression_weights: ``[E1]`` float edge weights.
        perturbation_edges: ``[2, E2]`` edges of the graph that propagates gene-perturbation embeddings.
        perturbation_weights: ``[E2]`` weights.

    The graphs are buffers (saved with the weights).
    """

    def __init__(
        self,
        config: PerturbHeadConfig,
        coexpression_edges: torch.Tensor,
        coexpression_weights: torch.Tensor,
        perturbation_edges: torch.Tensor,
        perturbation_weights: torch.Tensor,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import SGConv  # lazy: `import msfm` stays fast

        self.config = config
        g, d, h = config.n_genes, config.context_dim, config.hidden_dim
        self.context_norm = nn.BatchNorm1d(d)
        self.context_mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h))
        self.position = nn.Embedding(g, h)
        self.position_conv = SGConv(h, h, K=config.sgc_hops)
        self.gene_perturbation = nn.Embedding(g, h)
        self.perturbation_conv = SGConv(h, h, K=config.sgc_hops)
        self.label_perturbation = nn.Embedding(max(1, config.n_labels), h)
        self.perturbation_mlp = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h))
        self.gene_mlp = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        # Per-gene read-out (GEARS' indv_w1/b1). Zero init: training starts from "no change".
        self.readout_weight = nn.Parameter(torch.zeros(g, h))
        self.readout_bias = nn.Parameter(torch.zeros(g))
        self.register_buffer("coexpression_edges", coexpression_edges.long().clone())
        self.register_buffer("coexpression_weights", coexpression_weights.float().clone())
        self.register_buffer("perturbation_edges", perturbation_edges.long().clone())
        self.register_buffer("perturbation_weights", perturbation_weights.float().clone())

    def forward(
        self, context: torch.Tensor, control: torch.Tensor, perturbation: torch.Tensor
    ) -> torch.Tensor:
        """Predicted expression after the perturbation.

        Args:
            context: decoder context embeddings of the control cells.
            control: the control cells' log-normalised expression.
            perturbation: multi-hot perturbation tokens: genes first, then labels.

        Shape:
            context ``[b, G, D]``, control ``[b, G]``, perturbation ``[b, G + L]`` -> ``[b, G]``.
        """
        b, g, d = context.shape
        h = self.config.hidden_dim
        base = self.context_mlp(self.context_norm(context.reshape(b * g, d))).reshape(b, g, h)
        pos = self.position_conv(self.position.weight, self.coexpression_edges, self.coexpression_weights)
        state = base + self.config.pos_weight * pos.unsqueeze(0)
        genes = self.perturbation_conv(
            self.gene_perturbation.weight, self.perturbation_edges, self.perturbation_weights
        )
        pert = perturbation[:, :g] @ genes
        if self.config.n_labels:
            pert = pert + perturbation[:, g:] @ self.label_perturbation.weight
        state = state + self.perturbation_mlp(pert).unsqueeze(1)
        delta = (self.gene_mlp(state) * self.readout_weight).sum(-1) + self.readout_bias
        return control + delta


def perturbation_loss(
    pred: torch.Tensor, target: torch.Tensor, control: torch.Tensor, *, direction_lambda: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE plus ``direction_lambda`` x a direction loss; returns ``(loss, mse, direction)``.

    GEARS' direction term compares ``sign(y - ctrl)`` with ``sign(pred - ctrl)``, whose gradient is zero; ``tanh``
    of the deltas keeps its meaning (penalise deltas of the wrong sign) and gives it a gradient.

    Shape:
        pred, target, control ``[b, G]`` -> three scalars.
    """
    mse = torch.mean((pred - target) ** 2)
    direction = torch.mean((torch.tanh(target - control) - torch.tanh(pred - control)) ** 2)
    return mse + direction_lambda * direction, mse, direction
