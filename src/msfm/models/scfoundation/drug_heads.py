"""Heads over scFoundation cell embeddings: a DeepCDR-style IC50 regressor and SCAD's adversarial classifier.

Tensors in, tensors out. Inputs are standardised inside the modules (``Standardize`` buffers, set from the
training data), so a saved head carries its own scaling.
"""

from __future__ import annotations

import torch
from torch import nn

from msfm.models.scfoundation.drug_config import DrugResponseHeadConfig, SensitivityHeadConfig
from msfm.nn.gradient_reversal import grad_reverse

__all__ = ["DrugResponseNet", "ScadNet", "Standardize"]


class Standardize(nn.Module):
    """``(x - mean) / std`` with stored (not trained) statistics.

    Shape:
        x: ``[b, d]``; returns ``[b, d]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> None:
        """Set the statistics from ``x`` ``[n, d]`` (constant features keep std 1)."""
        std = x.std(0, unbiased=False)
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class DrugResponseNet(nn.Module):
    """ln(IC50) of a (cell, drug) pair: cell branch over the embedding, drug encoder MLP over the Morgan
    fingerprint, both concatenated into a regressor (the DeepCDR layout with its expression branch replaced by
    the scFoundation embedding). The target is predicted on a standardised scale and mapped back.

    Shape:
        cell: ``[b, cell_dim]``; fingerprint: ``[b, fingerprint_bits]``; returns ``[b]`` ln(IC50).
    """

    def __init__(self, config: DrugResponseHeadConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.cell_norm = Standardize(c.cell_dim)
        self.cell = nn.Sequential(_mlp(c.cell_dim, c.hidden, c.cell_out, c.dropout), nn.ReLU())
        self.drug = nn.Sequential(_mlp(c.fingerprint_bits, c.hidden, c.drug_out, c.dropout), nn.ReLU())
        self.regressor = _mlp(c.cell_out + c.drug_out, c.hidden, 1, c.dropout)
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def set_target_scale(self, y: torch.Tensor) -> None:
        """Standardise the target with the training values ``y`` ``[n]``."""
        self.y_mean.copy_(y.mean())
        self.y_std.copy_(y.std(unbiased=False).clamp_min(1e-6))

    def scaled(self, cell: torch.Tensor, fingerprint: torch.Tensor) -> torch.Tensor:
        """Prediction on the standardised target scale (what the loss uses). Shape: ``[b]``."""
        z = torch.cat([self.cell(self.cell_norm(cell)), self.drug(fingerprint)], dim=-1)
        return self.regressor(z).squeeze(-1)

    def forward(self, cell: torch.Tensor, fingerprint: torch.Tensor) -> torch.Tensor:
        return self.scaled(cell, fingerprint) * self.y_std + self.y_mean


class ScadNet(nn.Module):
    """SCAD: shared feature extractor, sensitivity predictor (trained on labelled bulk) and a domain
    discriminator (bulk vs single cell) that reaches the extractor through gradient reversal.

    Shape:
        x: ``[b, in_dim]``; ``forward`` returns ``[b]`` sensitivity logits; ``domain_logits`` ``[b]``.
    """

    def __init__(self, config: SensitivityHeadConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.norm = Standardize(c.in_dim)
        self.features = nn.Sequential(_mlp(c.in_dim, c.hidden, c.feature_dim, c.dropout), nn.ReLU())
        self.predictor = _mlp(c.feature_dim, max(c.feature_dim // 2, 1), 1, c.dropout)
        self.discriminator = _mlp(c.feature_dim, c.hidden, 1, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.features(self.norm(x))).squeeze(-1)

    def domain_logits(self, x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
        """Logit of "single cell" (vs bulk); the extractor's gradient from it is reversed and scaled by
        ``lambd``."""
        return self.discriminator(grad_reverse(self.features(self.norm(x)), lambd)).squeeze(-1)
