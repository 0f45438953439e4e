"""Typed configuration of the GeST spatial decoder.

The paper (GeST, bioRxiv 2025) gives the depth and head count of its default model (L8H8) but not the width, the
vocabulary size or the position-encoding scale; the defaults below are our choices (``docs/gest.md`` lists them).
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msfm.runtime.config import MAX_DEPTH, MAX_DIM, MAX_HEADS, MAX_MLP_RATIO, MAX_VOCAB

__all__ = ["GestConfig"]


class GestConfig(BaseModel):
    """What the GeST network is: a pre-norm (RMSNorm) decoder over a position-query block and a content block.

    The meta-cell vocabulary sizes are part of the network (the output logits are scored against the meta-cell
    expression table), so a config always matches one :class:`msfm.tokenizers.spatial.MetaCellVocab`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    n_genes: int = Field(2000, gt=0, le=MAX_VOCAB)
    """T: genes of the model's expression space (meta-cell profiles and predictions live in it)."""
    level_sizes: tuple[Annotated[int, Field(ge=1, le=MAX_VOCAB)], ...] = Field(
        (2048, 15, 10, 5), max_length=16
    )
    """Clusters per hierarchy level: level 0 is the meta-cell vocabulary (K), then the nested coarser levels."""
    dim: int = Field(512, gt=0, le=MAX_DIM)
    """Model width d (not given in the paper; 512 with head dim 64 is our default)."""
    depth: int = Field(8, ge=0, le=MAX_DEPTH)
    """Decoder blocks (the paper's default L8)."""
    num_heads: int = Field(8, gt=0, le=MAX_HEADS)
    """Attention heads (the paper's default H8); must divide ``dim``."""
    mlp_ratio: int = Field(4, gt=0, le=MAX_MLP_RATIO)
    """Feed-forward hidden size is ``mlp_ratio * dim``."""
    head_hidden: int | None = Field(None, gt=0, le=MAX_DIM)
    """Hidden width of the output MLP that maps a hidden state to gene space (None: ``dim``)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention probabilities and residual branches."""
    norm_eps: float = Field(1e-6, gt=0.0, lt=1.0)
    """RMSNorm epsilon."""
    position_encoding: Literal["sincos", "constant"] = "sincos"
    """``sincos``: 2-D sine/cosine of the window-normalised coordinates; ``constant``: an all-ones vector (the
    paper's "w/o spatial info" ablation)."""
    pe_resolution: float = Field(100.0, gt=0.0)
    """Normalised coordinates (a window spans [-0.5, 0.5]) are multiplied by this before the sine/cosine, so the
    finest channel resolves about ``side / pe_resolution`` (6 µm for a 600 µm window; CellPLM uses a 100 x 100
    grid)."""
    pe_temperature: float = Field(10000.0, gt=1.0)
    """Base of the geometric frequency ladder of the position encoding (as in ViT)."""

    @model_validator(mode="after")
    def _check(self) -> GestConfig:
        if self.dim % self.num_heads != 0:
            msg = f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads}), e.g. 512 / 8."
            raise ValueError(msg)
        if self.dim % 4 != 0:
            msg = f"dim ({self.dim}) must be a multiple of 4: the 2-D sin/cos encoding uses d/4 frequencies per axis."
            raise ValueError(msg)
        sizes = self.level_sizes
        if not sizes or any(s < 1 for s in sizes) or any(b >= a for a, b in itertools.pairwise(sizes)):
            msg = (
                f"level_sizes must be strictly decreasing positive cluster counts starting with the number of "
                f"meta-cells, e.g. (2048, 15, 10, 5); got {sizes}."
            )
            raise ValueError(msg)
        return self

    @property
    def n_metacells(self) -> int:
        """K: size of the meta-cell vocabulary (level 0)."""
        return self.level_sizes[0]

    @property
    def n_levels(self) -> int:
        """Number of hierarchy levels, the meta-cell level included."""
        return len(self.level_sizes)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.num_heads
