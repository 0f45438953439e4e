"""Resuming a run with other settings (docs/architecture.md "Resuming a run").

The engine compares the new settings with the run's config.json before anything is written or trained and raises
ConfigChangedError naming each changed setting as old -> new; resume-safe settings (run length, intervals, display)
may change; allow_config_change=True (CLI --allow-config-change) accepts a change and records it as a new version.
Every family's train checks this before reading its data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import anndata as ad
import pytest
import torch

import msfm
from msfm.cli import main
from msfm.engine.module import MsfmLightningModule, OptimConfig
from msfm.engine.objective import LossOutput
from msfm.engine.resume import check_resume, run_config_document, settings_record
from msfm.engine.sampler import ResumableDataLoader
from msfm.engine.trainer import TrainerOptions, build_trainer, fit
from msfm.errors import ConfigChangedError, MsfmInputError
from sf_official import official_cells

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "progress_bar": False,
    "model_summary": False,
    "log_every_n_steps": 1,
}
FIX = Path(__file__).parents[1] / "fixtures"


def _mse(model: torch.nn.Module, batch: list[torch.Tensor]) -> LossOutput:
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    return LossOutput(loss, {"mse": loss.detach()}, n=x.shape[0])


def _train(run: Path, *, lr: float = 1e-2, max_steps: int = 4, run_config: Any = None, **opts: Any) -> Any:
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(20, 4, generator=g), torch.randn(20, 1, generator=g))
    module = MsfmLightningModule(torch.nn.Linear(4, 1), _mse, OptimConfig(lr=lr, total_steps=20))
    options = TrainerOptions(**{**QUIET, "max_steps": max_steps, "checkpoint_every_n_steps": 2, **opts})
    trainer = build_trainer(options, run)
    fit(
        trainer,
        module,
        ResumableDataLoader(data, batch_size=4, seed=5),
        run,
        run_config=run_config or {"a": 1},
    )
    return trainer


def _digests(run: Path) -> dict[str, str]:
    return {
        p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def test_changed_settings_are_refused_naming_them_and_nothing_is_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run)
    before = _digests(run)
    with pytest.raises(ConfigChangedError) as info:
        _train(run, lr=2e-2, max_steps=8, accumulate=2, seed=3, run_config={"a": 2, "b": [1]})
    text = str(info.value)
    for change in ("optim.lr 0.01 -> 0.02", "trainer.accumulate 1 -> 2", "trainer.seed 0 -> 3", "a 1 -> 2",
                   "b (not set) -> [1]"):  # fmt: skip
        assert change in text
    assert "max_steps" not in text  # resume-safe: not a reason to refuse
    assert "--allow-config-change" in text
    assert _digests(run) == before  # config.json, metrics.csv, last.ckpt and model untouched


def test_resume_safe_settings_may_change_and_are_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run)
    trainer = _train(run, max_steps=6, log_every_n_steps=2, checkpoint_every_n_steps=3)
    assert trainer.global_step == 6
    doc = json.loads((run / "config.json").read_text())
    assert doc["trainer"]["max_steps"] == 6
    first, second = doc["versions"]
    assert first["trainer"]["max_steps"] == 4
    assert second["started_at_step"] == 4
    assert second["allowed_by"] == "resume-safe settings"
    assert second["changed"]["trainer.max_steps"] == [4, 6]
    # The same settings again: resumes without a new version.
    _train(run, max_steps=6, log_every_n_steps=2, checkpoint_every_n_steps=3)
    assert len(json.loads((run / "config.json").read_text())["versions"]) == 2


def test_allow_config_change_records_every_version_and_keeps_the_original(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run)
    _train(run, lr=2e-2, max_steps=6, allow_config_change=True)
    _train(run, lr=2e-2, max_steps=8)  # the new settings are now the run's: no flag needed
    with pytest.raises(ConfigChangedError, match=r"optim\.lr 0\.02 -> 0\.01"):
        _train(run, lr=1e-2, max_steps=8)
    doc = json.loads((run / "config.json").read_text())
    assert doc["optim"]["lr"] == 2e-2
    assert "allow_config_change" not in doc["trainer"]
    v1, v2, v3 = doc["versions"]
    assert v1["optim"]["lr"] == 1e-2  # the original values are kept
    assert v1["trainer"]["max_steps"] == 4
    assert v1["started_at_step"] == 0
    assert v2["optim"]["lr"] == 2e-2
    assert v2["started_at_step"] == 4
    assert v2["changed"]["optim.lr"] == [1e-2, 2e-2]
    assert v2["allowed_by"] == "allow_config_change"
    assert v2["time"]
    assert v3["started_at_step"] == 6
    assert v3["changed"] == {"trainer.max_steps": [6, 8]}
    assert "trainer" not in v3  # the latest version's settings are the top-level ones


def test_a_config_json_without_versions_becomes_version_1(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run)
    doc = json.loads((run / "config.json").read_text())
    del doc["versions"]  # as written by msfm before versions existed
    (run / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigChangedError, match=r"optim\.lr 0\.01 -> 0\.03"):
        _train(run, lr=3e-2, max_steps=6)
    _train(run, lr=3e-2, max_steps=6, allow_config_change=True)
    v1, v2 = json.loads((run / "config.json").read_text())["versions"]
    assert v1["optim"]["lr"] == 1e-2
    assert v1["time"] == doc["written"]
    assert v2["changed"]["optim.lr"] == [1e-2, 3e-2]


def test_an_unreadable_config_json_warns_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(run)
    (run / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="cannot be compared"):
        trainer = _train(run, max_steps=6)
    assert trainer.global_step == 6
    assert json.loads((run / "config.json").read_text())["trainer"]["max_steps"] == 6


def test_a_new_run_is_not_checked(tmp_path: Path) -> None:
    assert check_resume(tmp_path / "nothing", trainer=TrainerOptions(max_steps=2)) == {}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(
        json.dumps({"optim": {"lr": 1.0}})
    )  # no last.ckpt: a new run
    assert check_resume(tmp_path / "run", optim=OptimConfig(lr=2.0)) == {}


# --- every family checks before reading its data ---------------------------------------------------------------


def _fake_run(run: Path, settings: Any, *, optim: Any = None) -> Path:
    """A run directory as a family's train leaves it after a kill: config.json and checkpoints/last.ckpt."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"state")
    record = settings_record(settings.trainer, optim or settings.optim, settings.model_dump(mode="json"))
    doc = run_config_document(run, record, step=None, changes={}, resume_safe=())
    (run / "config.json").write_text(json.dumps(doc))
    (run / "vocabulary.json").write_text("{}")
    return run


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_scfoundation_train_refuses_a_new_lr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from msfm.models.scfoundation.pretraining import _settings

    run = _fake_run(tmp_path / "run", _settings(None, {}))
    before = _digests(run)
    missing = tmp_path / "missing.h5ad"  # never read: the check comes first
    code, err = _cli(capsys, "scfoundation", "train", missing, "-o", run, "--lr", "0.001")
    assert code == 2
    assert "optim.lr 0.0001 -> 0.001" in err
    assert _digests(run) == before
    # DataLoader workers split the rows here, so they are part of the data order.
    with pytest.raises(ConfigChangedError, match="num_workers 0 -> 2"):
        msfm.scfoundation.train(missing, run, num_workers=2)
    # Extending the run is fine: the check passes and the (missing) data is what fails next.
    with pytest.raises(MsfmInputError, match=r"missing\.h5ad"):
        msfm.scfoundation.train(missing, run, max_steps=5000)


def test_scmulan_train_refuses_a_new_batch_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from msfm.models.scmulan.training import _settings

    run = _fake_run(tmp_path / "run", _settings(None, {}))
    before = _digests(run)
    code, err = _cli(capsys, "scmulan", "train", tmp_path / "missing.h5ad", "-o", run, "--batch-size", "32")
    assert code == 2
    assert "batch_size 16 -> 32" in err
    assert _digests(run) == before  # vocabulary.json is not rewritten either
    # The example stream does not depend on the DataLoader workers: they may change.
    assert check_resume(
        run, run_config=_settings(None, {"num_workers": 2}).model_dump(), resume_safe=("num_workers",)
    )


def test_gest_train_and_fit_classifier_refuse_changed_settings(tmp_path: Path, capsys) -> None:
    from msfm.models.gest import classifier, pretrain

    run = _fake_run(tmp_path / "run", pretrain._settings(None, {}))
    before = _digests(run)
    code, err = _cli(capsys, "gest", "train", tmp_path / "missing.h5ad", "-o", run, "--batch-size", "16")
    assert code == 2
    assert "batch_size 8 -> 16" in err
    assert _digests(run) == before
    settings = classifier._settings(None, "domain", {})
    optim = settings.optim.model_copy(
        update={"lr_multipliers": {"backbone": settings.backbone_lr_multiplier}}
    )
    niche = _fake_run(tmp_path / "niche", settings, optim=optim)
    with pytest.raises(ConfigChangedError, match="max_cells 64 -> 32"):
        msfm.gest.fit_classifier(
            tmp_path / "missing.h5ad", "ckpt", labels_key="domain", out=niche, max_cells=32
        )


def _cells() -> ad.AnnData:
    a = official_cells()
    a.obs["label"] = ["a", "b"] * (a.n_obs // 2)
    return a


def test_scfoundation_fit_classifier_resume_refuses_a_new_batch_size(tmp_path: Path) -> None:
    ckpt = msfm.scfoundation.convert(FIX / "scfoundation" / "tiny_official.ckpt", tmp_path / "ckpt")
    cells, out = _cells(), tmp_path / "clf"
    kw = {
        "labels_key": "label",
        "out": out,
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "progress": False,
    }
    msfm.scfoundation.fit_classifier(cells, ckpt, batch_size=2, **kw)
    shutil.rmtree(out)  # as if killed before the classifier was written: the run beside it resumes
    with pytest.raises(ConfigChangedError, match="batch_size 2 -> 3"):
        msfm.scfoundation.fit_classifier(cells, ckpt, batch_size=3, **kw)
    assert not out.exists()
    result = msfm.scfoundation.fit_classifier(cells, ckpt, batch_size=3, allow_config_change=True, **kw)
    versions = json.loads((result.run_dir / "config.json").read_text())["versions"]
    assert versions[0]["run"]["batch_size"] == 2
    assert versions[1]["changed"]["run.batch_size"] == [2, 3]
