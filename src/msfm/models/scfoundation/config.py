"""Typed configuration of the scFoundation encoder-decoder (``mae_autobin`` upstream)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msfm.nn.performer import default_nb_features
from msfm.runtime.config import MAX_DEPTH, MAX_DIM, MAX_HEADS, MAX_MLP_RATIO, MAX_VOCAB

__all__ = ["ScFoundationConfig"]


class ScFoundationConfig(BaseModel):
    """What the scFoundation network is: sizes, value embedding and sentinel settings.

    Defaults are the released 100M model. Upstream names are mapped in
    :mod:`msfm.models.scfoundation.official` only. The config is frozen; build a changed copy with
    ``ScFoundationConfig(**{**config.model_dump(), "encoder_depth": 4})``.

    Position ids: genes ``0 .. num_genes - 1``, then ``t_id`` (target depth T), ``s_id`` (source depth S)
    and ``pad_id`` (padding), so the gene embedding has ``num_genes + 3`` rows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    num_genes: int = Field(19264, gt=0, le=MAX_VOCAB)
    """Size of the gene panel; the decoder sees ``num_genes + 2`` positions (genes, T, S)."""

    encoder_dim: int = Field(768, gt=0, le=MAX_DIM)
    """Width of the encoder (and of the value/gene embeddings)."""
    encoder_depth: int = Field(12, ge=0, le=MAX_DEPTH)
    """Number of post-LN transformer layers over the non-zero genes."""
    encoder_num_heads: int = Field(12, gt=0, le=MAX_HEADS)
    """Attention heads of the encoder."""
    encoder_head_dim: int = Field(64, gt=0, le=MAX_DIM)
    """Head dimension of the encoder; ``encoder_num_heads * encoder_head_dim`` must equal ``encoder_dim``."""
    encoder_mlp_ratio: int = Field(4, gt=0, le=MAX_MLP_RATIO)
    """Encoder FFN hidden size is ``encoder_mlp_ratio * encoder_dim`` (ReLU)."""
    encoder_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout of the encoder layers (0.1 upstream, the torch default; inactive in eval mode)."""

    decoder_dim: int = Field(512, gt=0, le=MAX_DIM)
    """Width of the Performer decoder."""
    decoder_depth: int = Field(6, ge=0, le=MAX_DEPTH)
    """Number of pre-LN Performer layers over all ``num_genes + 2`` positions."""
    decoder_num_heads: int = Field(8, gt=0, le=MAX_HEADS)
    """Attention heads of the decoder."""
    decoder_head_dim: int = Field(64, gt=0, le=MAX_DIM)
    """Head dimension of the decoder."""
    decoder_mlp_ratio: int = Field(4, gt=0, le=MAX_MLP_RATIO)
    """Decoder FFN hidden size is ``decoder_mlp_ratio * decoder_dim`` (GELU)."""
    decoder_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout of the decoder layers (0 upstream)."""
    decoder_nb_features: int | None = Field(None, gt=0, le=MAX_DIM)
    """FAVOR+ random features per head; ``None`` = ``int(head_dim * ln(head_dim))`` (266 for 64)."""
    decoder_key_max: Literal["sample", "global"] = "sample"
    """Scope of the FAVOR+ key stabiliser: per cell (batch-independent) or whole batch (upstream)."""

    num_bins: int = Field(100, gt=0, le=MAX_DIM)
    """Number of learned bins of the value auto-discretisation."""
    bin_alpha: float = 1.0
    """Weight of the residual path in the value auto-discretisation."""
    mask_value: float = 102.0
    """Sentinel input value of masked positions (upstream ``mask_token_id``)."""
    pad_value: float = 103.0
    """Sentinel input value of padding (upstream ``pad_token_id``)."""

    @model_validator(mode="after")
    def _check_consistency(self) -> ScFoundationConfig:
        if self.encoder_num_heads * self.encoder_head_dim != self.encoder_dim:
            msg = (
                f"encoder_num_heads * encoder_head_dim must equal encoder_dim, got "
                f"{self.encoder_num_heads} * {self.encoder_head_dim} != {self.encoder_dim}; "
                f"change one of the three fields."
            )
            raise ValueError(msg)
        if self.mask_value == self.pad_value:
            msg = (
                f"mask_value and pad_value must differ, both are {self.mask_value}; "
                f"upstream uses 102.0 and 103.0."
            )
            raise ValueError(msg)
        return self

    @property
    def t_id(self) -> int:
        """Position id of the target-depth token T (19264 for the released panel)."""
        return self.num_genes

    @property
    def s_id(self) -> int:
        """Position id of the source-depth token S (19265)."""
        return self.num_genes + 1

    @property
    def pad_id(self) -> int:
        """Position id of padding (19266); it has its own gene-embedding row."""
        return self.num_genes + 2

    @property
    def seq_len(self) -> int:
        """Decoder sequence length: every gene plus T and S (19266)."""
        return self.num_genes + 2

    @property
    def gene_vocab_size(self) -> int:
        """Rows of the gene embedding: genes, T, S and padding (19267)."""
        return self.num_genes + 3

    @property
    def encoder_mlp_dim(self) -> int:
        """Hidden size of the encoder FFN."""
        return self.encoder_mlp_ratio * self.encoder_dim

    @property
    def nb_features(self) -> int:
        """Resolved number of FAVOR+ random features per decoder head."""
        if self.decoder_nb_features is not None:
            return self.decoder_nb_features
        return default_nb_features(self.decoder_head_dim)
