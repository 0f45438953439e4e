"""MsfmLightningModule pieces: LossOutput validation, param groups, frozen prefixes, lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from msfm.engine.module import MsfmLightningModule, OptimConfig, build_param_groups, lr_factor
from msfm.engine.objective import LossOutput
from msfm.errors import MsfmInputError


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        self.backbone_extra = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone_extra(self.backbone(x)))


def _objective(model: torch.nn.Module, batch: torch.Tensor) -> LossOutput:
    loss = model(batch).pow(2).mean()
    return LossOutput(loss, {"sq": loss.detach()}, n=batch.shape[0])


def test_loss_output_validation() -> None:
    out = LossOutput(torch.tensor(1.0))
    assert out.components == {}
    assert out.n == 1
    with pytest.raises(ValueError, match="scalar tensor"):
        LossOutput(torch.ones(3))
    with pytest.raises(ValueError, match="scalar tensor"):
        LossOutput(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="component 'a'"):
        LossOutput(torch.tensor(1.0), {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="positive sample count"):
        LossOutput(torch.tensor(1.0), n=0)


def test_optim_config_validation() -> None:
    with pytest.raises(ValidationError):
        OptimConfig(lr=0)
    with pytest.raises(ValidationError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValidationError, match="lr_multipliers"):
        OptimConfig(lr_multipliers={"head": 0.0})
    with pytest.raises(ValidationError):
        OptimConfig(shedule="cosine")  # typo: extra fields are refused


def test_param_groups_multipliers_and_decay() -> None:
    net = Net()
    groups = build_param_groups(net, OptimConfig(lr=1.0, weight_decay=0.1, lr_multipliers={"backbone": 0.1}))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone|decay", "backbone|no_decay", "default|decay", "default|no_decay"}
    assert by_name["backbone|decay"]["lr"] == pytest.approx(0.1)
    assert by_name["default|decay"]["lr"] == pytest.approx(1.0)
    assert by_name["backbone|no_decay"]["weight_decay"] == 0.0
    # "backbone" must not capture "backbone_extra" (whole dotted components only).
    ids = {id(p) for p in by_name["backbone|decay"]["params"]}
    assert id(net.backbone[0].weight) in ids
    assert id(net.backbone_extra.weight) not in ids
    # LayerNorm weight and biases are not decayed.
    no_decay = {id(p) for p in by_name["backbone|no_decay"]["params"]}
    assert {id(net.backbone[1].weight), id(net.backbone[0].bias)} <= no_decay
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.parameters()))


def test_longest_prefix_wins() -> None:
    net = Net()
    groups = build_param_groups(net, OptimConfig(lr=1.0, lr_multipliers={"backbone": 0.1, "backbone.1": 0.5}))
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["backbone.1|no_decay"] == pytest.approx(0.5)


def test_unknown_prefixes_raise() -> None:
    with pytest.raises(MsfmInputError, match=r"lr_multipliers prefixes \['bakbone'\].*'backbone'"):
        build_param_groups(Net(), OptimConfig(lr_multipliers={"bakbone": 0.1}))
    with pytest.raises(MsfmInputError, match="frozen_prefixes"):
        MsfmLightningModule(Net(), _objective, OptimConfig(frozen_prefixes=("heads",)))


def test_frozen_prefixes() -> None:
    net = Net()
    module = MsfmLightningModule(net, _objective, OptimConfig(frozen_prefixes=("backbone",)))
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    groups = build_param_groups(module.model, module.optim)
    frozen = {id(p) for p in net.backbone.parameters()}
    assert not frozen & {id(p) for g in groups for p in g["params"]}
    # Hyper-parameters are plain JSON types (Lightning checkpoints must load with weights_only=True).
    assert module.hparams["optim"]["frozen_prefixes"] == ["backbone"]


def test_lr_factor_shapes() -> None:
    kw = {"warmup_steps": 4, "total_steps": 14, "min_lr_ratio": 0.1}
    assert [lr_factor(s, schedule="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert lr_factor(14, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(9, schedule="constant", **kw) == 1.0
    assert lr_factor(0, schedule="cosine", warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0


def test_predict_step_without_fn() -> None:
    module = MsfmLightningModule(Net(), _objective)
    with pytest.raises(MsfmInputError, match="predict_fn"):
        module.predict_step(torch.zeros(1, 4), 0)
    module = MsfmLightningModule(Net(), _objective, predict_fn=lambda m, b: m(b))
    assert module.predict_step(torch.zeros(3, 4), 0).shape == (3, 2)
