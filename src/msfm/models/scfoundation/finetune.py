"""Cell-type annotation on the scFoundation encoder: linear probe, partial or full fine-tuning.

Follows upstream's ``LinearProbingClassifier`` (``model/finetune_model.py``, biomap-research/scFoundation,
commit ``d09626a``): encoder only, every encoder layer frozen except the second-to-last, embeddings frozen,
head ``max-pool -> BatchNorm1d(affine=False, eps=1e-6) -> Linear(d, 256) -> ReLU -> Linear(256, k)``.

Fixed here compared with upstream:

* inputs come from the msfm tokenizer, so T and S are present (upstream's example built gene ids
  with ``arange(19264)`` and dropped them);
* pooling ignores padding and finds T/S by position id (:meth:`ScFoundation.pool_cell_embedding`);
* frozen modules stay in eval mode while the classifier trains, so frozen layers add no dropout noise
  and the decoder's random features are never redrawn;
* the decoder is never run and never handed to the optimiser (:meth:`trainable_parameters`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from msfm.engine.objective import LossOutput
from msfm.errors import MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.model import ScFoundation
from msfm.runtime.config import MAX_DEPTH, MAX_DIM, MAX_VOCAB

logger = logging.getLogger(__name__)

__all__ = [
    "CellClassifierConfig",
    "ClassifierCheckpointConfig",
    "ClassifierOutput",
    "ScFoundationCellClassifier",
    "classification_loss",
]

#: Label value that :func:`classification_loss` skips (unlabelled cells), as in ``F.cross_entropy``.
IGNORE_INDEX = -100


class CellClassifierConfig(BaseModel):
    """What the classification head is and which backbone parts train.

    Modes: ``linear`` trains the head only (frozen backbone, encoder run without autograd);
    ``partial`` also trains chosen encoder layers (by default the second-to-last, as upstream) and
    optionally the value and gene embeddings; ``full`` trains the whole encoder path (embeddings,
    every encoder layer, the final encoder LayerNorm). The decoder never trains.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    num_classes: int = Field(..., ge=2, le=MAX_VOCAB, description="Number of cell types k.")
    mode: Literal["linear", "partial", "full"] = Field(
        "partial", description="[code] upstream recipe = partial (second-to-last layer unfrozen)."
    )
    unfreeze_layers: int = Field(
        1,
        ge=0,
        le=MAX_DEPTH,
        description=(
            "partial mode: how many encoder layers train, the ones ending at the second-to-last layer "
            "(upstream: 1 -> layer -2; the last layer itself when the encoder has a single layer)."
        ),
    )
    unfreeze_layer_indices: tuple[int, ...] | None = Field(
        None,
        description="partial mode: explicit encoder layer indices to train (negative = from the end); overrides unfreeze_layers.",
    )
    unfreeze_embeddings: bool = Field(
        False,
        description="[code] partial mode: also train the value and gene embeddings (upstream frozenmore=False).",
    )
    hidden: int = Field(
        256, ge=1, le=MAX_DIM, description="[code] width of the head's hidden layer (256 upstream)."
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="[code] dropout after the hidden ReLU; upstream has none (0), raise for small data.",
    )
    pool: Literal["max", "all"] = Field(
        "max",
        description="[code] 'max' over real tokens (d, upstream fine-tuning) or 'all' = [S, T, max, mean] (4d).",
    )
    batchnorm_eps: float = Field(
        1e-6, gt=0.0, description="[code] eps of the affine-free BatchNorm1d (1e-6 upstream)."
    )
    class_weights: tuple[float, ...] | None = Field(
        None, description="(ours) optional per-class cross-entropy weights, e.g. inverse class frequencies."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="(ours) cross-entropy label smoothing; 0 = off."
    )

    @model_validator(mode="after")
    def _check(self) -> CellClassifierConfig:
        if self.mode != "partial" and (self.unfreeze_layer_indices is not None or self.unfreeze_embeddings):
            msg = (
                f"unfreeze_layer_indices / unfreeze_embeddings apply to mode='partial' only, got mode={self.mode!r} "
                f"with unfreeze_layer_indices={self.unfreeze_layer_indices}, unfreeze_embeddings={self.unfreeze_embeddings}; "
                "use mode='partial' or drop those fields."
            )
            raise ValueError(msg)
        if self.class_weights is not None and (
            len(self.class_weights) != self.num_classes or any(w < 0 for w in self.class_weights)
        ):
            msg = (
                f"class_weights must hold num_classes={self.num_classes} non-negative numbers, "
                f"got {len(self.class_weights)}: {self.class_weights}."
            )
            raise ValueError(msg)
        return self


class ClassifierCheckpointConfig(BaseModel):
    """``config.json`` of a classifier checkpoint (``fit_classifier``): the backbone, the head and the labels.

    Attributes:
        backbone: the encoder-decoder's config.
        classifier: the head and freezing settings.
        classes: class names, in logit order.
        target_depth: the target depth the classifier was trained with (prediction uses the same).
        labels_key: the ``obs`` column it learned; ``predict`` writes ``obs["<key_added>_<labels_key>"]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: ScFoundationConfig
    classifier: CellClassifierConfig
    classes: tuple[str, ...] = Field(..., min_length=2)
    target_depth: str = "t4"
    labels_key: str = "cell_type"

    @model_validator(mode="after")
    def _check_classes(self) -> ClassifierCheckpointConfig:
        if len(self.classes) != self.classifier.num_classes:
            msg = (
                f"classes lists {len(self.classes)} names but classifier.num_classes is "
                f"{self.classifier.num_classes}; give one class name per output, in logit order."
            )
            raise ValueError(msg)
        return self


@dataclass(frozen=True)
class ClassifierOutput:
    """Output of :meth:`ScFoundationCellClassifier.forward`.

    Attributes:
        logits: Unnormalised class scores, ``[b, k]``.
        embedding: Pooled cell embedding fed to the head (before the BatchNorm), ``[b, d]`` or ``[b, 4d]``.
    """

    logits: Tensor
    embedding: Tensor


def _resolve_layers(config: CellClassifierConfig, depth: int) -> tuple[int, ...]:
    """Encoder layer indices (non-negative, sorted) that train in ``partial`` mode."""
    if config.mode != "partial":
        return tuple(range(depth)) if config.mode == "full" else ()
    if config.unfreeze_layer_indices is not None:
        bad = [i for i in config.unfreeze_layer_indices if not -depth <= i < depth]
        if bad:
            msg = f"unfreeze_layer_indices {bad} are out of range for an encoder with {depth} layers (valid: {-depth}..{depth - 1})."
            raise MsfmInputError(msg)
        return tuple(sorted({i % depth for i in config.unfreeze_layer_indices}))
    k = min(config.unfreeze_layers, depth)
    # Upstream unfreezes the second-to-last layer and keeps the last one frozen; a one-layer encoder
    # has no second-to-last, so the window slides to the end there.
    start = max(depth - 1 - k, 0)
    return tuple(range(start, min(start + k, depth)))


def _eval_frozen(module: nn.Module) -> None:
    """Put every fully frozen submodule in eval mode; parameter-free ones follow their parent."""
    for child in module.children():
        params = list(child.parameters())
        if not params:
            continue
        if any(p.requires_grad for p in params):
            _eval_frozen(child)
        else:
            child.eval()


class ScFoundationCellClassifier(nn.Module):
    """Cell-type classifier on the scFoundation encoder.

    ``encode -> pool_cell_embedding -> BatchNorm1d(affine=False) -> Linear(., hidden) -> ReLU -> Dropout
    -> Linear(hidden, k)``. The backbone is kept whole (its state dict stays loadable as a ScFoundation)
    but only the encoder path is run.

    Args:
        backbone: A (pretrained) ScFoundation; its ``requires_grad`` flags are set by this constructor.
        config: Head and freezing settings.

    Raises:
        MsfmInputError: ``unfreeze_layer_indices`` outside the encoder.

    Example:
        >>> clf = ScFoundationCellClassifier(backbone, CellClassifierConfig(num_classes=5, mode="linear"))
        >>> optimizer = torch.optim.AdamW(clf.trainable_parameters(), lr=1e-3)
        >>> clf(batch).logits.shape   # [b, 5]  # doctest: +SKIP
    """

    def __init__(self, backbone: ScFoundation, config: CellClassifierConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        dim = backbone.config.encoder_dim
        in_dim = 4 * dim if config.pool == "all" else dim
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=config.batchnorm_eps)
        self.head = nn.Sequential(
            nn.Linear(in_dim, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )
        self.trainable_layers = _resolve_layers(config, len(backbone.encoder.layers))
        self._set_requires_grad()
        self.train(self.training)

    def _encoder_path(self) -> list[nn.Module]:
        """Backbone modules :meth:`ScFoundation.encode` runs (the decoder and expression head are not)."""
        b = self.backbone
        return [b.value_embedding, b.gene_embedding, b.encoder]

    def _set_requires_grad(self) -> None:
        self.backbone.requires_grad_(False)
        mode = self.config.mode
        if mode == "full":
            for module in self._encoder_path():
                module.requires_grad_(True)
        elif mode == "partial":
            for idx in self.trainable_layers:
                self.backbone.encoder.layers[idx].requires_grad_(True)
            if self.config.unfreeze_embeddings:
                self.backbone.value_embedding.requires_grad_(True)
                self.backbone.gene_embedding.requires_grad_(True)
        n_train = sum(p.numel() for p in self.trainable_parameters())
        logger.info(
            "classifier mode=%s, encoder layers training=%s, %d trainable parameters",
            mode,
            self.trainable_layers,
            n_train,
        )

    def train(self, mode: bool = True) -> ScFoundationCellClassifier:
        """Set train/eval mode; frozen backbone parts always stay in eval mode.

        Args:
            mode: Training mode for the head and the trainable backbone parts.

        Returns:
            ``self``.
        """
        super().train(mode)
        if mode:
            if any(p.requires_grad for p in self.backbone.parameters()):
                _eval_frozen(self.backbone)
            else:
                self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should get: the head and the unfrozen encoder parts (never the decoder)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _backbone_trains(self) -> bool:
        return any(p.requires_grad for module in self._encoder_path() for p in module.parameters())

    def forward(self, batch: dict[str, Tensor]) -> ClassifierOutput:
        """Classify the cells of a tokenised batch.

        Args:
            batch: ``values``, ``gene_ids``, ``padding_mask`` (``docs/architecture.md``); other keys ignored.

        Returns:
            Logits and the pooled embedding.

        Raises:
            MsfmInputError: A required key is missing.

        Shape:
            - values, gene_ids, padding_mask: ``[b, n]``
            - returns: logits ``[b, k]``, embedding ``[b, d]`` (pool ``max``) or ``[b, 4d]`` (``all``)
        """
        missing = [key for key in ("values", "gene_ids", "padding_mask") if key not in batch]
        if missing:
            msg = f"batch is missing {missing}; got keys {sorted(batch)}. Tokenize cells with msfm.tokenizers.gene_panel."
            raise MsfmInputError(msg)
        values, gene_ids, padding_mask = batch["values"], batch["gene_ids"], batch["padding_mask"]
        # A frozen encoder needs no autograd graph: saves the activation memory of every layer.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._backbone_trains()):
            hidden = self.backbone.encode(values, gene_ids, padding_mask)
            embedding = self.backbone.pool_cell_embedding(
                hidden, gene_ids, padding_mask, mode=self.config.pool
            )
        if self.training and embedding.shape[0] == 1:
            # Batch statistics of a single cell are undefined (BatchNorm1d raises); use the running ones.
            normed = F.batch_norm(
                embedding, self.norm.running_mean, self.norm.running_var, training=False, eps=self.norm.eps
            )
        else:
            normed = self.norm(embedding)
        return ClassifierOutput(logits=self.head(normed), embedding=embedding)


def classification_loss(model: ScFoundationCellClassifier, batch: dict[str, Tensor]) -> LossOutput:
    """Cross-entropy on ``batch["labels"]`` (class weights and label smoothing from ``model.config``).

    Cells labelled ``-100`` are ignored (unlabelled); ``accuracy`` is over the labelled cells.

    Args:
        model: The classifier.
        batch: A tokenised batch plus ``labels`` (int64 class indices).

    Returns:
        ``LossOutput`` with components ``loss``, ``accuracy``; ``n`` = number of cells.

    Raises:
        MsfmInputError: ``labels`` missing or not ``[b]``.

    Shape:
        labels: ``[b]``; ``model(batch).logits``: ``[b, k]``.
    """
    if "labels" not in batch:
        msg = f"classification_loss needs batch['labels'] (int class indices); got keys {sorted(batch)}."
        raise MsfmInputError(msg)
    out = model(batch)
    labels = batch["labels"].long()
    logits = out.logits.float()
    if labels.shape != logits.shape[:1]:
        msg = f"labels must be [b] = [{logits.shape[0]}], got {list(labels.shape)}."
        raise MsfmInputError(msg)
    config = model.config
    weight = None
    if config.class_weights is not None:
        weight = torch.tensor(config.class_weights, dtype=logits.dtype, device=logits.device)
    labelled = labels != IGNORE_INDEX
    if bool(labelled.any()):
        loss = F.cross_entropy(
            logits, labels, weight=weight, ignore_index=IGNORE_INDEX, label_smoothing=config.label_smoothing
        )
    else:
        loss = logits.sum() * 0.0  # keeps the graph, no NaN for a batch without labels
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == labels) & labelled
        accuracy = correct.sum() / labelled.sum().clamp_min(1)
    return LossOutput(
        loss=loss, components={"loss": loss.detach(), "accuracy": accuracy}, n=int(labels.shape[0])
    )
