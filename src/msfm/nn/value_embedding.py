"""scFoundation value auto-discretisation embedding.

Ported from the description of ``AutoDiscretizationEmbedding2`` in ``model/pretrainmodels/mae_autobin.py``
of biomap-research/scFoundation (commit d09626a); paper: Hao et al., "Large-scale foundation model on
single-cell transcriptomics", Nature Methods 2024.

A scalar expression value is turned into soft weights over ``num_bins`` learned bins, and the embedding
is the weighted sum of the bin vectors:

    v1 = LeakyReLU_0.1(Linear(1, b)(v))
    v2 = alpha * v1 + Linear(b, b)(v1)
    w  = softmax(v2)
    E  = w @ bin_table
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AutoDiscretizationEmbedding"]


class AutoDiscretizationEmbedding(nn.Module):
    """Embed continuous values as a softmax-weighted mixture of learned bin embeddings.

    Two special rows replace the mixture: ``emb_mask`` (masked positions) and ``emb_pad`` (padding).
    Positions are selected either by explicit boolean tensors (our code path: no value can collide with
    a sentinel) or, when those are not given, by the official sentinel rule "value exactly equal to
    ``mask_value`` / ``pad_value``" (needed to reproduce the official model).

    Args:
        dim: embedding dimension ``d``.
        num_bins: number of bins ``b``.
        alpha: weight of the residual path ``alpha * v1``.
        mask_value: sentinel value of masked positions (official ``mask_token_id``).
        pad_value: sentinel value of padding (official ``pad_token_id``).
    """

    def __init__(
        self,
        dim: int,
        num_bins: int = 100,
        alpha: float = 1.0,
        mask_value: float = 102.0,
        pad_value: float = 103.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_bins = num_bins
        self.alpha = alpha
        self.mask_value = mask_value
        self.pad_value = pad_value
        self.mlp = nn.Linear(1, num_bins)
        self.mlp2 = nn.Linear(num_bins, num_bins)
        self.act = nn.LeakyReLU(negative_slope=0.1)
        self.emb = nn.Embedding(num_bins, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)

    def bin_weights(self, values: Tensor) -> Tensor:
        """Soft bin assignment of every value.

        Args:
            values: expression values.

        Returns:
            Weights over the bins; each row sums to 1.

        Shape:
            - values: ``[*]``
            - returns: ``[*, num_bins]``
        """
        v1 = self.act(self.mlp(values.unsqueeze(-1)))
        v2 = self.alpha * v1 + self.mlp2(v1)
        return torch.softmax(v2, dim=-1)

    def forward(
        self,
        values: Tensor,
        *,
        mask: Tensor | None = None,
        pad: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Embed values.

        Args:
            values: expression values (float).
            mask: bool, True where the ``emb_mask`` row is used. ``None``: positions whose value equals
                ``mask_value`` (official behaviour).
            pad: bool, True where the ``emb_pad`` row is used. ``None``: positions whose value equals
                ``pad_value`` (official behaviour). Where both apply, ``pad`` wins (as upstream, which
                writes the padding row last).
            return_weights: also return the bin weights.

        Returns:
            The embeddings, or ``(embeddings, bin_weights)`` when ``return_weights`` is True.

        Shape:
            - values, mask, pad: ``[*]``
            - returns: ``[*, d]`` (and ``[*, num_bins]``)
        """
        weights = self.bin_weights(values)
        out = weights @ self.emb.weight
        if mask is None:
            mask = values == self.mask_value
        if pad is None:
            pad = values == self.pad_value
        out = torch.where(mask.unsqueeze(-1), self.emb_mask.weight[0], out)
        out = torch.where(pad.unsqueeze(-1), self.emb_pad.weight[0], out)
        if return_weights:
            return out, weights
        return out
