"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, gradient times ``-lambda`` backward.

Placed between a feature extractor and a domain discriminator, it makes the extractor maximise the discriminator's
loss while the discriminator minimises it, in one backward pass (adversarial domain adaptation, as in SCAD).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GradientReversal", "grad_reverse"]


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Identity on ``x``; the gradient flowing back is multiplied by ``-lambd``.

    Shape:
        x: any; returns the same shape.
    """
    return _Reverse.apply(x, float(lambd))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` with a fixed ``lambd`` (no parameters)."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: ``x`` any; returns the same shape."""
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"
