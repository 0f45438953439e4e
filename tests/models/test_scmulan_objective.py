"""scMulan objective: example building, set/next targets, the released loss, and learning on real cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import msfm
from msfm.data import CellSource, GenePanel, harmonize_genes
from msfm.data.normalize import normalized_rows
from msfm.errors import MsfmInputError
from msfm.models.scmulan.decoding import DecodeOptions, generate_tokens, id_mask
from msfm.models.scmulan.model import ScMulan
from msfm.models.scmulan.objective import (
    ScMulanLossConfig,
    TaskSampler,
    TrainExample,
    build_targets,
    collate_examples,
    scmulan_loss,
)
from msfm.registry import preset_config
from msfm.tokenizers.cell_sentence import CellSentenceVocab, bin_levels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def toy() -> CellSentenceVocab:
    return CellSentenceVocab.build(
        ["A", "B", "C", "D"], {"cell_type": ["T"], "coarse_cell_type": ["L"], "organ": ["Heart"]}
    )


def _batch(vocab, sentences):
    examples = [
        TrainExample(np.array(vocab.ids([w for w, _ in s])), np.array([lv for _, lv in s]), p)
        for s, p in sentences
    ]
    return collate_examples(examples, vocab)


def _sentences(v):
    annotate = ([("B", 3), ("C", 5), ("<PCT>", 0), ("L", 0), ("T", 0), ("<E>", 0)], 3)
    generate = ([("T", 0), ("<SPToken1>", 0), ("A", 2), ("C", 7), ("D", 1), ("<E>", 0)], 2)
    next_state = ([("A", 1), ("B", 2), ("<SPToken2>", 0), ("B", 4), ("C", 3), ("<E>", 0)], 3)
    short = ([("Heart", 0), ("<SPToken1>", 0), ("D", 9), ("<E>", 0)], 2)
    return [annotate, generate, next_state, short]


def _expect(v, b, t, targets):
    """Dense expected entity/expression vectors from {token: level}."""
    e = torch.zeros(len(v))
    x = torch.zeros(len(v))
    for tok, lv in targets.items():
        e[v.id(tok)] = 1.0
        x[v.id(tok)] = float(lv)
    return e, x


def test_set_targets_exact(toy):
    v = toy
    batch = _batch(v, _sentences(v))
    assert batch["ids"].shape == (4, 6)
    tg = build_targets(
        batch["ids"],
        batch["levels"],
        batch["attention_mask"],
        batch["prefix_len"],
        batch["gene_answer"],
        vocab_size=len(v),
        targets="set",
    )
    expected = {
        # annotation: ordered one-hot answers; the task token predicts the coarse type; <E> at the end
        (0, 2): {"L": 0},
        (0, 3): {"T": 0},
        (0, 4): {"<E>": 0},
        # generation: every answer gene not emitted yet, with its level; then <E> only
        (1, 1): {"A": 2, "C": 7, "D": 1},
        (1, 2): {"C": 7, "D": 1},
        (1, 3): {"D": 1},
        (1, 4): {"<E>": 0},
        # next state: prompt genes (cell A) are not targets, even B which also occurs in the answer
        (2, 2): {"B": 4, "C": 3},
        (2, 3): {"C": 3},
        (2, 4): {"<E>": 0},
        (3, 1): {"D": 9},
        (3, 2): {"<E>": 0},
    }
    sup = torch.zeros(4, 6, dtype=torch.bool)
    for (b, t), targets in expected.items():
        sup[b, t] = True
        e, x = _expect(v, b, t, targets)
        torch.testing.assert_close(tg.entity[b, t], e, msg=f"entity {b},{t}")
        torch.testing.assert_close(tg.expression[b, t], x, msg=f"expression {b},{t}")
    assert torch.equal(tg.supervised, sup)  # prompt positions, the last word and padding are unsupervised
    assert tg.entity[~sup].sum() == 0
    assert tg.expression[~sup].sum() == 0


def test_next_targets_are_one_hot(toy):
    v = toy
    batch = _batch(v, _sentences(v))
    tg = build_targets(
        batch["ids"],
        batch["levels"],
        batch["attention_mask"],
        batch["prefix_len"],
        batch["gene_answer"],
        vocab_size=len(v),
        targets="next",
    )
    assert torch.equal(tg.entity.sum(-1)[tg.supervised], torch.ones(int(tg.supervised.sum())))
    for (b, t), (tok, lv) in {(1, 1): ("A", 2), (1, 2): ("C", 7), (1, 3): ("D", 1), (2, 2): ("B", 4)}.items():
        e, x = _expect(v, b, t, {tok: lv})
        torch.testing.assert_close(tg.entity[b, t], e)
        torch.testing.assert_close(tg.expression[b, t], x)


RECORDED = Path(__file__).parents[1] / "fixtures" / "recorded" / "scmulan_loss_reference.safetensors"


@pytest.fixture(scope="module")
def recorded() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(RECORDED, "pt") as f:
        meta = f.metadata()
    return load_file(RECORDED), meta


@pytest.mark.parametrize("targets", ["set", "next"])
@pytest.mark.parametrize("entity_loss", ["bce", "ce"])
@pytest.mark.parametrize("reduction", ["position", "sentence"])
def test_loss_matches_the_recorded_reference(toy, recorded, reduction, entity_loss, targets):
    """scmulan_loss against values recorded once from msfm (tests/fixtures/recorded/README.md: the release has
    no loss to record), on stored weights, for every reduction, target kind and entity loss."""
    from msfm.models.scmulan.config import ScMulanConfig

    tensors, meta = recorded
    v = toy
    assert json.loads(meta["vocab_tokens"]) == list(v.tokens)
    batch = _batch(v, _sentences(v))
    for key in ("ids", "levels", "attention_mask", "prefix_len", "gene_answer"):
        assert torch.equal(batch[key], tensors[f"batch.{key}"]), key  # the input is the recorded one
    model = ScMulan(ScMulanConfig(**json.loads(meta["model_config"]))).eval()
    model.load_state_dict({k.removeprefix("state."): t for k, t in tensors.items() if k.startswith("state.")})
    cfg = ScMulanLossConfig(
        expression_weight=3.0, reduction=reduction, targets=targets, entity_loss=entity_loss
    )
    out = scmulan_loss(model, batch, cfg)
    case = f"{reduction}.{targets}.{entity_loss}"
    assert out.components["entity"].item() == pytest.approx(tensors[f"entity.{case}"].item(), rel=1e-5)
    assert out.components["expression"].item() == pytest.approx(
        tensors[f"expression.{case}"].item(), rel=1e-5
    )
    assert out.loss.item() == pytest.approx(tensors[f"loss.{case}"].item(), rel=1e-5)
    assert out.n == 4
    out.loss.backward()  # differentiable end to end
    assert model.token_embed.weight.grad is not None
    if (targets, entity_loss) != ("set", "bce"):
        return
    # The released formula (V x BCE summed over the vocabulary + w x MSE on the target entries), one position at
    # a time, agrees with the recording (with the padding mask: the loss itself relies on causality instead).
    with torch.no_grad():
        fwd = model(batch["ids"], batch["levels"], attention_mask=batch["attention_mask"])
    tg = build_targets(
        batch["ids"],
        batch["levels"],
        batch["attention_mask"],
        batch["prefix_len"],
        batch["gene_answer"],
        vocab_size=len(v),
    )
    per: dict[int, list[float]] = {}
    for b, t in tg.supervised.nonzero().tolist():
        bce = F.binary_cross_entropy_with_logits(fwd.logits[b, t], tg.entity[b, t], reduction="sum").item()
        on = tg.entity[b, t] > 0
        sq = ((fwd.expression[b, t][on] - tg.expression[b, t][on]) ** 2).sum().item()
        acc = per.setdefault(b, [0.0, 0.0, 0, 0])
        acc[0] += bce
        acc[1] += sq
        acc[2] += 1
        acc[3] += int(on.sum())
    if reduction == "position":
        entity = sum(a[0] for a in per.values()) / sum(a[2] for a in per.values())
        expression = sum(a[1] for a in per.values()) / sum(a[3] for a in per.values())
    else:
        entity = float(np.mean([a[0] / a[2] for a in per.values()]))
        expression = float(np.mean([a[1] / a[3] for a in per.values() if a[3]]))
    assert len(per) > 1
    assert tensors[f"entity.{case}"].item() == pytest.approx(entity, rel=1e-5)
    assert tensors[f"expression.{case}"].item() == pytest.approx(expression, rel=1e-5)


def test_example_validation(toy):
    with pytest.raises(MsfmInputError, match="prefix_len"):
        TrainExample(np.array([1, 2]), np.array([0, 0]), 2)
    with pytest.raises(MsfmInputError, match="Unknown task"):
        TaskSampler(toy, tasks={"nope": 1.0})
    with pytest.raises(MsfmInputError, match="positive weight"):
        TaskSampler(toy, tasks={"annotate": 0.0})


# --------------------------------------------------------------------------------------------------------------
# TaskSampler on real cells
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pbmc_setup():
    adata = msfm.datasets.pbmc68k()
    labels = sorted(adata.obs["cell_type"].astype(str).unique())
    mapping0 = harmonize_genes(
        adata.var, GenePanel.scfoundation(), min_panel_fraction=0.0, warn_panel_fraction=0.0
    )
    genes = sorted({GenePanel.scfoundation().symbols[i] for i in mapping0.input_to_panel if i >= 0})
    vocab = CellSentenceVocab.build(
        genes, {"cell_type": labels, "coarse_cell_type": ["Leukocyte"], "organ": ["Blood"]}
    )
    mapping = harmonize_genes(adata.var, GenePanel.from_symbols(vocab.genes), min_panel_fraction=0.0)
    X = normalized_rows(CellSource(adata), None, mapping)
    return adata, vocab, X


def test_task_sampler_builds_each_task(pbmc_setup):
    adata, v, X = pbmc_setup
    row = X[3]
    label = str(adata.obs["cell_type"].iloc[3])
    expressed = np.flatnonzero(row.toarray()[0] > 0)
    gene_ids = set(v.gene_ids[expressed].tolist())
    levels = dict(
        zip(v.gene_ids[expressed].tolist(), bin_levels(row.toarray()[0][expressed]).tolist(), strict=True)
    )
    sampler = TaskSampler(v, tasks={"annotate": 1, "organ_region": 1, "generate": 1}, meta_prompt_prob=0.0)
    rng = np.random.default_rng(0)
    meta = {"cell_type": label, "organ": "Blood"}

    ex = sampler.example(row, meta, rng, task="annotate")
    words = v.decode(ex.ids)
    assert words[ex.prefix_len - 1] == "<PCT>"
    assert words[ex.prefix_len :] == [label, label, "<E>"]  # no coarse label: the fine one is repeated
    assert set(ex.ids[: ex.prefix_len - 1].tolist()) == gene_ids
    assert all(
        levels[i] == lv
        for i, lv in zip(ex.ids[: ex.prefix_len - 1], ex.levels[: ex.prefix_len - 1], strict=True)
    )

    ex = sampler.example(row, {**meta, "coarse_cell_type": "Leukocyte"}, rng, task="annotate")
    assert v.decode(ex.ids[ex.prefix_len :]) == ["Leukocyte", label, "<E>"]

    ex = sampler.example(row, meta, rng, task="organ_region")
    assert v.decode(ex.ids[ex.prefix_len - 1 :]) == ["<SPToken3>", "Blood", "<E>"]

    ex = sampler.example(row, meta, rng, task="generate")
    prompt = v.decode(ex.ids[: ex.prefix_len])
    assert prompt[-1] == "<SPToken1>"
    assert 1 <= len(prompt) - 1 <= 2
    assert set(prompt[:-1]) <= {label, "Blood"}
    assert set(ex.ids[ex.prefix_len : -1].tolist()) == gene_ids
    assert ex.ids[-1] == v.end_id
    assert (ex.levels[ex.prefix_len : -1] >= 1).all()

    nxt = sampler.example(row, meta, rng, next_row=X[5], task=None)
    assert nxt is not None
    assert nxt.task in ("annotate", "organ_region", "generate")
    ns = TaskSampler(v, tasks={"next_state": 1}).example(row, {}, rng, next_row=X[5])
    assert v.decode(ns.ids[ns.prefix_len - 1 : ns.prefix_len]) == ["<SPToken2>"]
    assert set(ns.ids[: ns.prefix_len - 1].tolist()) == gene_ids
    assert set(ns.ids[ns.prefix_len : -1].tolist()) == set(
        v.gene_ids[np.flatnonzero(X[5].toarray()[0] > 0)].tolist()
    )


def test_task_sampler_unknown_values_and_determinism(pbmc_setup):
    _, v, X = pbmc_setup
    sampler = TaskSampler(v, tasks={"annotate": 1, "generate": 1})
    unknown = {"cell_type": "Unclassified", "organ": float("nan"), "coarse_cell_type": None}
    assert sampler.supported_tasks(unknown, n_genes=10) == []
    assert sampler.example(X[0], unknown, np.random.default_rng(0)) is None
    with pytest.raises(MsfmInputError, match="cannot make a 'annotate'"):
        sampler.example(X[0], unknown, np.random.default_rng(0), task="annotate")
    assert sampler.supported_tasks({"organ": "Blood"}, n_genes=10) == ["generate"]
    assert sampler.supported_tasks({"organ": "Blood"}, n_genes=0) == []
    with pytest.raises(MsfmInputError, match="not a token"):
        sampler.known_meta({"cell_type": "Hepatocyte"})

    a = sampler.example(X[0], {"cell_type": "CD34+"}, np.random.default_rng([1, 2]))
    b = sampler.example(X[0], {"cell_type": "CD34+"}, np.random.default_rng([1, 2]))
    c = sampler.example(X[0], {"cell_type": "CD34+"}, np.random.default_rng([1, 3]), task=a.task)
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.levels, b.levels)
    assert not np.array_equal(a.ids, c.ids)  # random gene order per example
    assert sorted(a.ids.tolist()) == sorted(c.ids.tolist())


def test_task_sampler_caps(pbmc_setup):
    _, v, X = pbmc_setup
    row = X[0]
    dense = row.toarray()[0]
    top = TaskSampler(v, tasks={"generate": 1}, max_genes=5).example(
        row, {"organ": "Blood"}, np.random.default_rng(0)
    )
    genes = top.ids[top.prefix_len : -1]
    assert len(genes) == 5
    cols = np.searchsorted(v.gene_ids, genes)
    assert dense[cols].min() >= np.sort(dense)[-5]  # the 5 top-expressed genes
    n_expr = int((dense > 0).sum())
    short = TaskSampler(v, tasks={"annotate": 1}, max_length=20, meta_prompt_prob=0.0)
    ex = short.example(row, {"cell_type": "CD34+"}, np.random.default_rng(0))
    assert len(ex) == 20 < n_expr + 4
    assert v.decode(ex.ids[-4:]) == ["<PCT>", "CD34+", "CD34+", "<E>"]
    ns = TaskSampler(v, tasks={"next_state": 1}, max_length=30).example(
        row, {}, np.random.default_rng(0), next_row=X[1]
    )
    assert len(ns) <= 30


def _annotate_accuracy(model, v, X, cells, labels, max_genes):
    fixed = TaskSampler(
        v, tasks={"annotate": 1}, gene_order="reverse", max_genes=max_genes, meta_prompt_prob=0.0
    )
    prompts = [
        fixed.example(X[c], {"cell_type": lab}, np.random.default_rng(0))
        for c, lab in zip(cells, labels, strict=True)
    ]
    n = max(p.prefix_len for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    lv = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padded
        ids[i, n - p.prefix_len :] = torch.from_numpy(p.ids[: p.prefix_len])
        lv[i, n - p.prefix_len :] = torch.from_numpy(p.levels[: p.prefix_len])
        mask[i, n - p.prefix_len :] = True
    types = id_mask(v.category_ids("cell_type"), len(v))
    res = generate_tokens(
        model.eval(),
        ids,
        lv,
        mask,
        DecodeOptions(max_new_tokens=3, repeat_mask="official"),
        allowed=[types, types, id_mask([v.end_id], len(v))],
    )
    model.train()
    assert (res.ids[:, 2] == v.end_id).all()
    pred = np.array([v.token(int(i)) for i in res.ids[:, 1]])
    return float(np.mean(pred == labels))


@pytest.fixture
def one_thread():
    # A tiny model runs fastest on one thread, and a loaded 2-core machine makes more threads crawl.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_model_overfits_annotation(pbmc_setup, one_thread):
    """Loss falls and greedy constrained decoding recovers the labels of 16 real cells (release loss, beta 200).

    The release's V x BCE first spends ~100 steps pushing every vocabulary logit down before the labels separate,
    hence a few hundred steps even for 16 cells.
    """
    adata, v, X = pbmc_setup
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    types = ["CD14+ Monocyte", "CD19+ B", "CD8+ Cytotoxic T", "CD56+ NK"]
    cells = np.concatenate([np.flatnonzero(ct == t)[:4] for t in types])
    labels = ct[cells]
    sampler = TaskSampler(v, tasks={"annotate": 1}, gene_order="random", max_genes=32, meta_prompt_prob=0.0)
    torch.manual_seed(0)
    model = ScMulan(preset_config("scmulan-tiny", vocab_size=len(v), dim=32, depth=2, num_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    cfg = ScMulanLossConfig()
    losses, acc = [], 0.0
    for step in range(400):
        rng = np.random.default_rng([0, step])
        batch = collate_examples(
            [sampler.example(X[c], {"cell_type": lab}, rng) for c, lab in zip(cells, labels, strict=True)], v
        )
        out = scmulan_loss(model, batch, cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.components["entity"].item())
        if step >= 150 and step % 25 == 24:
            acc = _annotate_accuracy(model, v, X, cells, labels, 32)
            if acc == 1.0:
                break
    assert np.mean(losses[-5:]) < 0.05 * np.mean(losses[:5])
    assert acc >= 15 / 16
