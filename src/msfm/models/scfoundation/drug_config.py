"""Settings of the drug-response (DeepCDR-style) and drug-sensitivity (SCAD-style) heads and their checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DrugResponseCheckpointConfig",
    "DrugResponseHeadConfig",
    "EmbeddingSettings",
    "SensitivityCheckpointConfig",
    "SensitivityHeadConfig",
]


class DrugResponseHeadConfig(BaseModel):
    """The fused regressor: a cell-embedding branch and a fingerprint branch, concatenated, then an MLP.

    Attributes:
        cell_dim: Width of the cell embedding (768 for the released model with ``pool="max"``).
        fingerprint_bits: Morgan fingerprint length.
        fingerprint_radius: Morgan radius (2 ~ ECFP4).
        hidden: Hidden width of the three MLPs.
        cell_out: Output width of the cell branch.
        drug_out: Output width of the drug branch.
        dropout: Dropout after every hidden layer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cell_dim: int = Field(ge=1, le=65536)
    fingerprint_bits: int = Field(1024, ge=16, le=16384)
    fingerprint_radius: int = Field(2, ge=0, le=6)
    hidden: int = Field(256, ge=1, le=16384)
    cell_out: int = Field(128, ge=1, le=16384)
    drug_out: int = Field(128, ge=1, le=16384)
    dropout: float = Field(0.1, ge=0, lt=1)


class SensitivityHeadConfig(BaseModel):
    """SCAD's three parts: shared feature extractor, sensitivity predictor, domain discriminator.

    Attributes:
        in_dim: Width of the embeddings (3,072 for the released model with ``pool="all"``).
        hidden: Hidden width of the extractor and the discriminator.
        feature_dim: Width of the shared features.
        dropout: Dropout in the extractor and the predictor.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int = Field(ge=1, le=65536)
    hidden: int = Field(256, ge=1, le=16384)
    feature_dim: int = Field(64, ge=1, le=16384)
    dropout: float = Field(0.3, ge=0, lt=1)


class EmbeddingSettings(BaseModel):
    """How the cell embeddings were made: taken from ``obsm[use_rep]``, or computed with a backbone.

    Attributes:
        use_rep: ``obsm`` key the embeddings were read from (None: computed with ``backbone``).
        backbone: Path of the scFoundation checkpoint used (None with ``use_rep``).
        target_depth: Target-depth spec of the embedding call (``f1``: T = S).
        pool: ``max`` (encoder width) or ``all`` (4 x encoder width).
        pre_normalized: Reading option of the embedding call.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_rep: str | None = None
    backbone: str | None = None
    target_depth: str = "f1"
    pool: Literal["max", "all"] = "max"
    pre_normalized: bool = False


class DrugResponseCheckpointConfig(BaseModel):
    """What a drug-response checkpoint holds besides the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head: DrugResponseHeadConfig
    drug_ids: tuple[str, ...]
    smiles: tuple[str, ...]
    embedding: EmbeddingSettings


class SensitivityCheckpointConfig(BaseModel):
    """What a drug-sensitivity checkpoint holds besides the weights.

    Attributes:
        bulk: Embedding settings of the labelled bulk samples (official: ``f1`` = T = S, pool ``all``).
        single_cell: Embedding settings of the single cells (official: ``t4``, pool ``all``); prediction default.
        bulk_labels_key: ``obs`` column of the bulk labels it learned.
        adv_weight: Weight of the domain-adversarial loss it was trained with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    head: SensitivityHeadConfig
    bulk: EmbeddingSettings
    single_cell: EmbeddingSettings
    bulk_labels_key: str
    adv_weight: float = Field(ge=0)
