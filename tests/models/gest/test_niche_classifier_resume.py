"""GeST niche classifier (``msfm.gest.fit_classifier``): a killed run resumes from its last checkpoint.

The docstring promises "resumes a killed run in ``out``". A kill is simulated by a Lightning callback that raises
inside the training loop (injected through the trainer factory the classifier uses); re-running the same call then
continues from ``checkpoints/last.ckpt`` (the step goes on from the checkpoint's, not from 0), and ends with the
weights of an uninterrupted run. A finished run can be extended with a larger ``max_steps`` (a resume-safe
setting), and other changed settings are refused.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import msfm
from msfm.datasets import semi_real_tissue
from msfm.engine.trainer import TrainerOptions
from msfm.errors import MsfmInputError
from msfm.models.gest import classifier as clf_module
from msfm.models.gest.pretrain import GestTrainConfig

gest = msfm.gest
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTS = {"progress_bar": False, "model_summary": False, "accelerator": "cpu", "log_every_n_steps": 1}
STEPS = 6
EVERY = 2  # last.ckpt after steps 2, 4 and 6
KILL_AT = 5  # killed before step 6 (5 steps done): last.ckpt is step 4's, so the re-run redoes step 5


@pytest.fixture(scope="module")
def tissue():
    return semi_real_tissue(n_cells=300, n_domains=3, side_um=300.0, seed=2)


@pytest.fixture(scope="module")
def backbone(tissue, tmp_path_factory):
    cfg = GestTrainConfig(
        preset="gest-tiny", n_genes=60, n_metacells=16, n_pcs=10, levels=(4, 2), side_um=150.0, max_cells=32,
        batch_size=4, trainer=TrainerOptions(max_steps=2, checkpoint_every_n_steps=2, **OPTS),
    )  # fmt: skip
    return gest.train(tissue, tmp_path_factory.mktemp("gest") / "backbone", config=cfg)


class _Kill(Callback):
    """Raises in the training loop once ``at`` steps are done (what a kill leaves: the last checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated kill")


class _StartStep(Callback):
    """Records the global step each fit starts from."""

    def __init__(self, record: list[int]) -> None:
        self.record = record

    def on_train_start(self, trainer, pl_module):
        self.record.append(int(trainer.global_step))


def _with_callbacks(monkeypatch, *extra: Callback) -> None:
    real = clf_module.build_trainer

    def build(options, run_dir, *, callbacks=(), **kw):
        return real(options, run_dir, callbacks=[*callbacks, *extra], **kw)

    monkeypatch.setattr(clf_module, "build_trainer", build)


def _fit(tissue, backbone, out: Path, steps: int = STEPS, **kw):
    return gest.fit_classifier(
        tissue, backbone, labels_key="domain", out=out, max_cells=12, batch_size=8, max_steps=steps,
        config={"trainer": {**OPTS, "checkpoint_every_n_steps": EVERY}}, **kw,
    )  # fmt: skip


def _weights(result) -> dict[str, torch.Tensor]:
    return gest.load(result, device="cpu").model.state_dict()


@pytest.fixture(scope="module")
def runs(tissue, backbone, tmp_path_factory):
    """An uninterrupted run, and the same run killed after step 5 then re-run (module-scoped: run once)."""
    root = tmp_path_factory.mktemp("clf")
    starts: list[int] = []
    full = _fit(tissue, backbone, root / "full")
    cut = root / "cut"
    with pytest.MonkeyPatch.context() as m:
        _with_callbacks(m, _Kill(KILL_AT), _StartStep(starts))
        with pytest.raises(RuntimeError, match="simulated kill"):
            _fit(tissue, backbone, cut)
    ckpt_step = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "global_step"
    ]
    with pytest.MonkeyPatch.context() as m:
        _with_callbacks(m, _StartStep(starts))
        resumed = _fit(tissue, backbone, cut)
    return {"full": full, "resumed": resumed, "starts": starts, "ckpt_step": ckpt_step}


def _losses(run_dir: Path) -> pd.Series:
    df = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["train/loss"])
    return df.groupby("step")["train/loss"].last()


def test_killed_run_resumes_from_its_last_checkpoint(runs):
    assert runs["ckpt_step"] == 4  # what the kill left: last.ckpt of step 4
    assert runs["starts"] == [0, 4]  # the re-run continued from the checkpoint, not from scratch
    full, resumed = runs["full"], runs["resumed"]
    assert full.metrics["global_step"] == resumed.metrics["global_step"] == STEPS
    assert (resumed.checkpoint / "model.safetensors").is_file()
    assert gest.load(resumed, device="cpu").extra["classes"] == ["D0", "D1", "D2"]
    # Before the kill both runs are the same run: identical logged losses for steps 1-4.
    a, b = _losses(full.run_dir), _losses(resumed.run_dir)
    assert list(b.index) == list(a.index) == list(range(STEPS))
    pd.testing.assert_series_equal(b.loc[:3], a.loc[:3])


def test_resumed_run_equals_the_uninterrupted_run(runs):
    a, b = _weights(runs["full"]), _weights(runs["resumed"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    pd.testing.assert_series_equal(_losses(runs["resumed"].run_dir), _losses(runs["full"].run_dir))


def test_finished_run_is_extended_with_more_steps_and_other_settings_are_refused(
    tissue, backbone, tmp_path, monkeypatch
):
    starts: list[int] = []
    out = tmp_path / "clf"
    first = _fit(tissue, backbone, out, steps=4)
    assert first.metrics["global_step"] == 4
    with monkeypatch.context() as m:
        _with_callbacks(m, _StartStep(starts))
        longer = _fit(tissue, backbone, out, steps=6)
    assert starts == [4]
    assert longer.metrics["global_step"] == 6
    before = (out / "config.json").read_bytes()
    with pytest.raises(MsfmInputError, match="max_cells"):
        gest.fit_classifier(
            tissue, backbone, labels_key="domain", out=out, max_cells=20, batch_size=8, max_steps=8,
            config={"trainer": {**OPTS, "checkpoint_every_n_steps": EVERY}},
        )  # fmt: skip
    assert (out / "config.json").read_bytes() == before  # the refused call changed nothing
