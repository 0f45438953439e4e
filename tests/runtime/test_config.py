"""One way to build settings: file, base object and flat or dotted overrides, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from msfm.errors import MsfmInputError
from msfm.runtime.config import build_settings, read_config_file


class Optim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-3
    warmup: int = 0


class Trainer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: str | int = "auto"
    warmup: int = 5  # also in Optim: ambiguous as a flat key


class Run(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "run"
    steps: int = Field(10, ge=1)
    overrides: dict[str, int] = Field(default_factory=dict)
    optim: Optim = Field(default_factory=Optim)
    trainer: Trainer = Field(default_factory=Trainer)


def test_flat_keys_route_to_their_section_and_none_is_ignored() -> None:
    run = build_settings(Run, overrides={"lr": 0.1, "devices": 2, "steps": None, "name": "x"})
    assert (run.optim.lr, run.trainer.devices, run.steps, run.name) == (0.1, 2, 10, "x")


def test_dotted_keys_and_plain_mapping_fields() -> None:
    run = build_settings(Run, overrides={"optim.warmup": 3, "trainer.warmup": 7, "overrides.dim": 4})
    assert (run.optim.warmup, run.trainer.warmup, run.overrides) == (3, 7, {"dim": 4})


def test_file_then_overrides_on_a_base(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("steps: 20\noptim: {lr: 0.5}\n")
    base = Run(name="base", trainer=Trainer(devices=1))
    run = build_settings(Run, base=base, file=f, overrides={"steps": 30})
    assert (run.name, run.steps, run.optim.lr, run.optim.warmup, run.trainer.devices) == (
        "base",
        30,
        0.5,
        0,
        1,
    )


def test_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(MsfmInputError, match=r"Unknown Run setting 'stepz'.*Did you mean 'steps'"):
        build_settings(Run, overrides={"stepz": 1})
    with pytest.raises(MsfmInputError, match=r"ambiguous between sections \['optim', 'trainer'\]"):
        build_settings(Run, overrides={"warmup": 1})
    with pytest.raises(
        MsfmInputError, match=r"Invalid Run settings: steps: .*greater than or equal to 1 \(got 0\)"
    ):
        build_settings(Run, overrides={"steps": 0})
    with pytest.raises(MsfmInputError, match="does not exist"):
        read_config_file(tmp_path / "absent.yaml")
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(MsfmInputError, match="must hold a mapping"):
        read_config_file(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(MsfmInputError, match="Cannot parse"):
        build_settings(Run, file=broken)


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optim: Optim = Field(default_factory=lambda: Optim(warmup=100))


def test_partial_sections_keep_the_family_defaults(tmp_path: Path) -> None:
    # Only lr given: warmup keeps the family's default (100), not Optim's own (0).
    assert build_settings(Family, overrides={"lr": 0.5}).optim.warmup == 100
    f = tmp_path / "f.json"
    f.write_text('{"optim": {"lr": 0.2}}')
    run = build_settings(Family, file=f)
    assert (run.optim.lr, run.optim.warmup) == (0.2, 100)
    assert build_settings(Family, overrides={"warmup": 7}).optim.warmup == 7
