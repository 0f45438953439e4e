"""The objective contract: ``(model, batch) -> LossOutput``.

Families implement their masking/sampling and loss as an objective function and the engine stays generic. This
module imports only torch so that ``models/<family>/objective.py`` can use it without pulling in Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import nn

__all__ = ["LossOutput", "Objective"]


@dataclass(frozen=True)
class LossOutput:
    """What an objective returns.

    Attributes:
        loss: The scalar to minimise.
        components: Named scalar terms (each is logged as ``train/<name>`` and ``val/<name>``). Detached copies
            are fine; they are only logged.
        n: Number of samples (cells, slides, ...) the loss averages over; used to weight epoch averages.

    Raises:
        ValueError: If ``loss`` is not a scalar tensor, a component is not a scalar, or ``n`` is not positive.
    """

    loss: torch.Tensor
    components: Mapping[str, torch.Tensor] = field(default_factory=dict)
    n: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.loss, torch.Tensor) or self.loss.numel() != 1:
            shape = (
                tuple(self.loss.shape) if isinstance(self.loss, torch.Tensor) else type(self.loss).__name__
            )
            msg = f"LossOutput.loss must be a scalar tensor; got {shape}. Reduce the loss (e.g. .mean())."
            raise ValueError(msg)
        for name, value in self.components.items():
            if not isinstance(value, torch.Tensor | float | int) or (
                isinstance(value, torch.Tensor) and value.numel() != 1
            ):
                msg = f"LossOutput component {name!r} must be a scalar; got {value!r:.80}."
                raise ValueError(msg)
        if int(self.n) < 1:
            msg = f"LossOutput.n must be a positive sample count; got {self.n}."
            raise ValueError(msg)


Objective: TypeAlias = Callable[[nn.Module, dict[str, Any]], LossOutput]
"""An objective maps ``(model, batch)`` to a :class:`LossOutput`; ``model.training`` tells train from eval."""
