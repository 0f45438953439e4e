"""Settings of the scFoundation perturbation head (``perturb_fit``) and the checkpoint it writes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from msfm.models.scfoundation.config import ScFoundationConfig

__all__ = ["PerturbCheckpointConfig", "PerturbHeadConfig", "PerturbSettings"]


class PerturbHeadConfig(BaseModel):
    """Sizes of :class:`~msfm.models.scfoundation.perturb_model.PerturbationHead`.

    Attributes:
        n_genes: genes the head predicts (the model's genes).
        context_dim: width of the backbone's decoder context embeddings.
        n_labels: non-gene perturbation tokens (drugs, cytokines, ...).
        hidden_dim: width of every gene's state.
        sgc_hops: propagation hops of each SGConv (GEARS uses 1 per graph).
        pos_weight: weight of the co-expression graph term in the per-gene base (0.2 in the official ``v1``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_genes: int = Field(ge=1)
    context_dim: int = Field(ge=1)
    n_labels: int = Field(0, ge=0)
    hidden_dim: int = Field(64, ge=1, le=4096)
    sgc_hops: int = Field(1, ge=1, le=8)
    pos_weight: float = Field(0.2, ge=0)


class PerturbSettings(BaseModel):
    """The training and data settings of ``perturb_fit`` (validated; stored in the run's ``config.json``).

    Attributes:
        hidden_dim, sgc_hops: see :class:`PerturbHeadConfig`.
        direction_lambda: weight of the direction loss next to the MSE.
        max_control_cells: control cells per group whose context embeddings are kept (a seeded sample).
        min_cells: fewest cells each perturbed ``(condition, group)`` must have.
        coexpression_k, coexpression_threshold: the co-expression graph (neighbours per gene, smallest ``|r|``).
        max_memory_gb: largest in-memory store of context embeddings.
        test_fraction: share of conditions held out by ``split="condition"`` without ``test_conditions``.
        batch_size, lr, max_epochs, max_steps: the training loop (AdamW, constant learning rate).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_dim: int = Field(64, ge=1, le=4096)
    sgc_hops: int = Field(1, ge=1, le=8)
    direction_lambda: float = Field(0.1, ge=0)
    max_control_cells: int = Field(256, ge=1)
    min_cells: int = Field(10, ge=1)
    coexpression_k: int = Field(20, ge=1)
    coexpression_threshold: float = Field(0.4, ge=0, le=1)
    max_memory_gb: float = Field(4.0, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    max_epochs: int = Field(20, ge=1)
    max_steps: int = Field(-1, ge=-1)


class PerturbCheckpointConfig(BaseModel):
    """``config.json`` of a perturbation checkpoint (family ``scfoundation-perturb``).

    Attributes:
        backbone: the frozen backbone's configuration (its weights are saved under ``backbone.``).
        head: the head's sizes.
        genes: the model's genes (panel symbols, in the head's order).
        labels: the non-gene perturbation tokens, in the head's order.
        conditions: every condition of the training data (train and held out).
        train_conditions: the conditions trained on.
        groups: the groups whose control means are stored (``control_mean`` rows).
        condition_key, control, match_key: the data contract the model was fit with.
        target_depth: the backbone input mode (``f1``: T = S, the official GEARS setting).
        max_control_cells: control cells per group used for a prediction.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: ScFoundationConfig
    head: PerturbHeadConfig
    genes: tuple[str, ...]
    labels: tuple[str, ...] = ()
    conditions: tuple[str, ...]
    train_conditions: tuple[str, ...]
    groups: tuple[str, ...]
    condition_key: str = "condition"
    control: str = "ctrl"
    match_key: str | None = None
    target_depth: str = "f1"
    max_control_cells: int = Field(256, ge=1)
