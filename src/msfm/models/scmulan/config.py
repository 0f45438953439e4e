"""Typed configuration of the scMulan GPT (``MulanConfig`` upstream)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msfm.runtime.config import MAX_DEPTH, MAX_DIM, MAX_HEADS, MAX_MLP_RATIO, MAX_VOCAB

__all__ = ["ScMulanConfig"]


class ScMulanConfig(BaseModel):
    """What the scMulan network is: a pre-LN GPT over (entity, level) words without position embedding.

    Defaults are the released 368.8M model (1120 wide, 24 layers, 20 heads, 2,222 tokens, 10 levels).
    Upstream names (``n_embd``, ``n_layer``, ``n_head``, ``expression_level``) are mapped in
    :mod:`msfm.models.scmulan.official` only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    vocab_size: int = Field(2222, gt=1, le=MAX_VOCAB)
    """Number of entity tokens (``<E>``, genes, metadata values, task tokens)."""
    dim: int = Field(1120, gt=0, le=MAX_DIM)
    """Model width (``n_embd``)."""
    depth: int = Field(24, ge=0, le=MAX_DEPTH)
    """Number of transformer blocks (``n_layer``)."""
    num_heads: int = Field(20, gt=0, le=MAX_HEADS)
    """Attention heads (``n_head``); must divide ``dim``."""
    mlp_ratio: int = Field(4, gt=0, le=MAX_MLP_RATIO)
    """MLP hidden size is ``mlp_ratio * dim`` (tanh-approximated GELU)."""
    n_levels: int = Field(10, gt=0, le=1024)
    """Expression levels 1..n_levels for gene words; level 0 is reserved for metadata and task words."""
    max_length: int = Field(2048, gt=1, le=1_048_576)
    """Longest sentence (prompt plus generated words) accepted. The model has no position table, so this is a
    guard against inputs far outside the training distribution (released corpus maximum: 1,550), not a shape."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention probabilities and residual branches (0 in the release)."""
    norm_eps: float = Field(1e-5, gt=0.0, lt=1.0)
    """LayerNorm epsilon (the release uses bias-free LayerNorm with eps 1e-5)."""

    @model_validator(mode="after")
    def _check(self) -> ScMulanConfig:
        if self.dim % self.num_heads != 0:
            msg = (
                f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads}); "
                f"the release uses 1120 / 20 (head dim 56)."
            )
            raise ValueError(msg)
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.num_heads

    @property
    def num_level_embeddings(self) -> int:
        """Rows of the level embedding: levels 0..n_levels."""
        return self.n_levels + 1
