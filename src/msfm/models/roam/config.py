"""Typed configuration of the ROAM model (ROI pyramid transformer + class-specific gated-attention MIL)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msfm.runtime.config import MAX_DEPTH, MAX_DIM, MAX_HEADS, MAX_MLP_RATIO, MAX_VOCAB

__all__ = ["SCALES", "TOKENS_PER_ROI", "RoamConfig"]

# Token layout of one ROI (the feature-file contract): 20x 8x8 grid, then 10x 4x4, then 5x 2x2, each row-major.
SCALES: tuple[tuple[str, int, int], ...] = (("20x", 0, 8), ("10x", 64, 4), ("5x", 80, 2))
TOKENS_PER_ROI = 84

_Depth = Annotated[int, Field(ge=1, le=MAX_DEPTH)]


class RoamConfig(BaseModel):
    """Hyper-parameters of :class:`msfm.models.roam.Roam`.

    The defaults are the released glioma-subtyping configuration (``int_glioma_tumor_subtyping.ini``).

    Attributes:
        d_in: Patch-feature dimension (1024 for the truncated ResNet-50).
        dim: Token width inside the ROI transformer and of the ROI embedding.
        heads: Attention heads.
        dim_head: Width of one head (inner width = ``heads * dim_head``).
        mlp_dim: Hidden width of the feed-forward blocks.
        depths: Layers of ``[intra 20x, inter 20x->10x, intra 10x, inter 10x->5x, intra 5x]``.
        n_classes: Number of slide classes (one gated-attention branch and one bag classifier per class).
        scale_weights: Weights of the three CLS outputs in the ROI embedding, in the official order
            ``(5x, 10x, 20x)``. The release uses 0.3333 (not 1/3); the difference is visible at 1e-4.
        dropout: Dropout in the transformer (attention weights, attention output, feed-forward).
        mil_dropout: Dropout after the tanh and sigmoid branches of the gated attention.
        emb_dropout: Dropout after adding the position embedding.
        topk: ROIs per slide in the instance-level loss (top attention of the true class).
        shared_rel_bias: One relative-position bias shared by all heads (the release) or one per head.
        class_names: Optional names of the classes, in logit order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    d_in: int = Field(1024, ge=1, le=MAX_DIM)
    dim: int = Field(256, ge=2, le=MAX_DIM)
    heads: int = Field(8, ge=1, le=MAX_HEADS)
    dim_head: int = Field(64, ge=1, le=MAX_DIM)
    mlp_dim: int = Field(512, ge=1, le=MAX_MLP_RATIO * MAX_DIM)
    depths: tuple[_Depth, _Depth, _Depth, _Depth, _Depth] = (2, 2, 2, 2, 2)
    n_classes: int = Field(3, ge=2, le=MAX_VOCAB)
    scale_weights: tuple[float, float, float] = (0.3333, 0.3333, 0.3333)
    dropout: float = Field(0.2, ge=0, lt=1)
    mil_dropout: float = Field(0.25, ge=0, lt=1)
    emb_dropout: float = Field(0.0, ge=0, lt=1)
    topk: int = Field(4, ge=1, le=MAX_DIM)
    shared_rel_bias: bool = True
    class_names: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> RoamConfig:
        if any(d < 1 for d in self.depths):
            msg = f"depths must all be >= 1 (intra 20x, inter 20->10, intra 10x, inter 10->5, intra 5x); got {self.depths}."
            raise ValueError(msg)
        if self.dim % 2:
            msg = f"dim must be even (the gated attention uses dim/2 hidden units); got {self.dim}."
            raise ValueError(msg)
        if self.class_names is not None and len(self.class_names) != self.n_classes:
            msg = (
                f"class_names has {len(self.class_names)} names but n_classes={self.n_classes}; "
                "give one name per class, in logit order."
            )
            raise ValueError(msg)
        return self
