"""Tests of the scFoundation cell-type classifier: freezing modes, eval-mode of frozen parts, loss, overfit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from msfm.errors import MsfmInputError
from msfm.models.scfoundation.config import ScFoundationConfig
from msfm.models.scfoundation.finetune import (
    CellClassifierConfig,
    ClassifierOutput,
    ScFoundationCellClassifier,
    classification_loss,
)
from msfm.models.scfoundation.model import ScFoundation
from msfm.tokenizers.gene_panel import ScFoundationTokenizer

NUM_GENES = 300  # the classifier runs the encoder only; a small panel keeps the tests fast
NUM_CLASSES = 4


def tiny_backbone(*, depth: int = 3, dropout: float = 0.1) -> ScFoundation:
    torch.manual_seed(0)
    return ScFoundation(
        ScFoundationConfig(
            num_genes=NUM_GENES,
            encoder_dim=32,
            encoder_depth=depth,
            encoder_num_heads=2,
            encoder_head_dim=16,
            encoder_dropout=dropout,
            decoder_dim=16,
            decoder_depth=1,
            decoder_num_heads=2,
            decoder_head_dim=8,
        )
    )


def labelled_batch(n_cells: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cells whose class raises the counts of its own block of genes, tokenised as at inference (t4)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % NUM_CLASSES
    counts = rng.poisson(0.3, size=(n_cells, NUM_GENES)).astype(np.float32)
    block = NUM_GENES // NUM_CLASSES
    for i, c in enumerate(labels):
        counts[i, c * block : c * block + 20] += rng.poisson(5.0, size=20)
    tok = ScFoundationTokenizer(num_genes=NUM_GENES)
    batch = tok.collate(tok.encode(sp.csr_matrix(counts), "t4"), np.arange(n_cells))
    batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
    return batch


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _one_step(clf: ScFoundationCellClassifier, batch: dict[str, torch.Tensor]) -> None:
    opt = torch.optim.SGD(clf.trainable_parameters(), lr=0.1)
    clf.train()
    classification_loss(clf, batch).loss.backward()
    opt.step()


@pytest.mark.parametrize(("pool", "width"), [("max", 32), ("all", 128)])
def test_shapes(pool: str, width: int) -> None:
    clf = ScFoundationCellClassifier(
        tiny_backbone(), CellClassifierConfig(num_classes=NUM_CLASSES, pool=pool)
    )
    batch = labelled_batch(6)
    out = clf(batch)
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (6, NUM_CLASSES)
    assert out.embedding.shape == (6, width)
    assert clf.norm.num_features == width
    assert not any(p.requires_grad for p in clf.norm.parameters())  # affine=False


def test_linear_mode_trains_only_the_head() -> None:
    clf = ScFoundationCellClassifier(
        tiny_backbone(), CellClassifierConfig(num_classes=NUM_CLASSES, mode="linear")
    )
    head_ids = {id(p) for p in clf.head.parameters()}
    assert {id(p) for p in clf.trainable_parameters()} == head_ids
    before = _snapshot(clf.backbone)
    head_before = _snapshot(clf.head)
    _one_step(clf, labelled_batch())
    assert _changed(before, clf.backbone) == set()
    assert all(p.grad is None for p in clf.backbone.parameters())
    assert all(p.grad is not None for p in clf.head.parameters())
    assert _changed(head_before, clf.head) == set(head_before)


def test_partial_mode_trains_second_to_last_layer() -> None:
    clf = ScFoundationCellClassifier(tiny_backbone(depth=3), CellClassifierConfig(num_classes=NUM_CLASSES))
    assert clf.config.mode == "partial"
    assert clf.trainable_layers == (1,)
    before = _snapshot(clf.backbone)
    _one_step(clf, labelled_batch())
    changed = _changed(before, clf.backbone)
    layer_keys = {k for k in before if k.startswith("encoder.layers.1.")}
    assert changed == layer_keys
    grads = {n for n, p in clf.backbone.named_parameters() if p.grad is not None}
    assert grads == {k for k in layer_keys if k in dict(clf.backbone.named_parameters())}


def test_partial_mode_with_chosen_layers_and_embeddings() -> None:
    cfg = CellClassifierConfig(
        num_classes=NUM_CLASSES, unfreeze_layer_indices=(0, -1), unfreeze_embeddings=True
    )
    clf = ScFoundationCellClassifier(tiny_backbone(depth=3), cfg)
    assert clf.trainable_layers == (0, 2)
    before = _snapshot(clf.backbone)
    _one_step(clf, labelled_batch())
    changed = _changed(before, clf.backbone)
    prefixes = ("encoder.layers.0.", "encoder.layers.2.", "value_embedding.", "gene_embedding.")
    assert any(k.startswith("gene_embedding.") for k in changed)
    assert all(k.startswith(prefixes) for k in changed)
    assert not any(k.startswith("encoder.layers.1.") for k in changed)
    # Two layers counted from the second-to-last.
    clf2 = ScFoundationCellClassifier(
        tiny_backbone(depth=4), CellClassifierConfig(num_classes=2, unfreeze_layers=2)
    )
    assert clf2.trainable_layers == (1, 2)
    # A one-layer encoder has no second-to-last layer: its only layer trains.
    clf3 = ScFoundationCellClassifier(tiny_backbone(depth=1), CellClassifierConfig(num_classes=2))
    assert clf3.trainable_layers == (0,)


def test_full_mode_trains_encoder_path_not_decoder() -> None:
    clf = ScFoundationCellClassifier(
        tiny_backbone(), CellClassifierConfig(num_classes=NUM_CLASSES, mode="full")
    )
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert all(
        n.startswith(("backbone.value_embedding", "backbone.gene_embedding", "backbone.encoder", "head"))
        for n in trainable
    )
    assert any(n.startswith("backbone.encoder.norm") for n in trainable)
    for module in (
        clf.backbone.decoder,
        clf.backbone.decoder_embed,
        clf.backbone.decoder_norm,
        clf.backbone.head,
    ):
        assert not any(p.requires_grad for p in module.parameters())
    before = _snapshot(clf.backbone.decoder)
    _one_step(clf, labelled_batch())
    assert _changed(before, clf.backbone.decoder) == set()


def test_frozen_parts_stay_in_eval_mode() -> None:
    clf = ScFoundationCellClassifier(
        tiny_backbone(dropout=0.5), CellClassifierConfig(num_classes=NUM_CLASSES)
    )
    clf.train()
    layers = clf.backbone.encoder.layers
    assert clf.head.training
    assert clf.norm.training
    assert [layer.training for layer in layers] == [False, True, False]
    assert layers[1].dropout.training  # parameter-free children follow their trainable parent
    assert not clf.backbone.decoder.training
    assert not clf.backbone.value_embedding.training
    clf.eval()
    assert not any(m.training for m in clf.modules())

    # Linear mode: no dropout noise anywhere in the backbone while training.
    lin = ScFoundationCellClassifier(
        tiny_backbone(dropout=0.5), CellClassifierConfig(num_classes=NUM_CLASSES, mode="linear")
    )
    lin.train()
    assert not any(m.training for m in lin.backbone.modules())
    batch = labelled_batch(4)
    torch.testing.assert_close(lin(batch).embedding, lin(batch).embedding, rtol=0, atol=0)


def test_classification_loss_components_weights_and_ignore() -> None:
    batch = labelled_batch(8)
    clf = ScFoundationCellClassifier(
        tiny_backbone(), CellClassifierConfig(num_classes=NUM_CLASSES, mode="linear")
    )
    clf.eval()
    out = classification_loss(clf, batch)
    logits = clf(batch).logits
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, batch["labels"]))
    assert set(out.components) == {"loss", "accuracy"}
    assert out.n == 8
    acc = (logits.argmax(-1) == batch["labels"]).float().mean()
    torch.testing.assert_close(out.components["accuracy"], acc)

    weights = (1.0, 2.0, 0.5, 3.0)
    weighted = ScFoundationCellClassifier(
        clf.backbone, CellClassifierConfig(num_classes=NUM_CLASSES, mode="linear", class_weights=weights)
    )
    weighted.head.load_state_dict(clf.head.state_dict())
    weighted.eval()
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], weight=torch.tensor(weights))
    torch.testing.assert_close(classification_loss(weighted, batch).loss, expected)

    # Unlabelled cells (-100) are skipped; a batch without labels gives a zero, finite loss.
    partly = dict(batch, labels=batch["labels"].clone())
    partly["labels"][:4] = -100
    expected = torch.nn.functional.cross_entropy(logits[4:], batch["labels"][4:])
    torch.testing.assert_close(classification_loss(clf, partly).loss, expected)
    none = dict(batch, labels=torch.full((8,), -100))
    assert classification_loss(clf, none).loss.item() == 0.0

    with pytest.raises(MsfmInputError, match="labels"):
        classification_loss(clf, {k: v for k, v in batch.items() if k != "labels"})


def test_single_cell_training_batch() -> None:
    clf = ScFoundationCellClassifier(tiny_backbone(), CellClassifierConfig(num_classes=NUM_CLASSES))
    clf.train()
    batch = {k: v[:1] for k, v in labelled_batch(4).items()}
    out = classification_loss(clf, batch)
    assert torch.isfinite(out.loss)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="partial"):
        CellClassifierConfig(num_classes=3, mode="linear", unfreeze_embeddings=True)
    with pytest.raises(ValueError, match="partial"):
        CellClassifierConfig(num_classes=3, mode="full", unfreeze_layer_indices=(0,))
    with pytest.raises(ValueError, match="class_weights"):
        CellClassifierConfig(num_classes=3, class_weights=(1.0, 2.0))
    with pytest.raises(ValueError):
        CellClassifierConfig(num_classes=1)
    with pytest.raises(MsfmInputError, match="out of range"):
        ScFoundationCellClassifier(
            tiny_backbone(depth=2), CellClassifierConfig(num_classes=2, unfreeze_layer_indices=(5,))
        )
    cfg = CellClassifierConfig(num_classes=5, mode="partial", unfreeze_layer_indices=(-2, -3), pool="all")
    assert CellClassifierConfig(**cfg.model_dump()) == cfg
    assert CellClassifierConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_state_dict_round_trip() -> None:
    cfg = CellClassifierConfig(num_classes=NUM_CLASSES, pool="all")
    clf = ScFoundationCellClassifier(tiny_backbone(), cfg)
    _one_step(clf, labelled_batch())
    clf.eval()
    other = ScFoundationCellClassifier(tiny_backbone(), cfg)
    other.load_state_dict(clf.state_dict(), strict=True)
    other.eval()
    batch = labelled_batch(5, seed=3)
    torch.testing.assert_close(other(batch).logits, clf(batch).logits)


@pytest.mark.parametrize("mode", ["linear", "partial"])
def test_overfits_small_labelled_batch(mode: str) -> None:
    batch = labelled_batch(16)
    clf = ScFoundationCellClassifier(
        tiny_backbone(), CellClassifierConfig(num_classes=NUM_CLASSES, mode=mode)
    )
    opt = torch.optim.Adam(clf.trainable_parameters(), lr=1e-3)
    accuracy, step = 0.0, 0
    for step in range(1, 101):
        clf.train()
        out = classification_loss(clf, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 10 == 0:  # eval-mode accuracy (BatchNorm running statistics), stop once memorised
            clf.eval()
            with torch.no_grad():
                accuracy = (clf(batch).logits.argmax(-1) == batch["labels"]).float().mean().item()
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, (mode, step, accuracy)
