"""`msfm weights list` and `msfm weights verify` on the tiny official fixtures, unrelated files and unsafe pickles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from msfm.runtime.official_weights import OFFICIAL_WEIGHTS, match_checksum

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_list_prints_every_family_and_no_invented_checksum(capsys):
    assert run_cli("weights", "list") == 0
    out = capsys.readouterr().out
    for entry in OFFICIAL_WEIGHTS:
        assert entry.family in out
        assert entry.command in out
    for name in ("models.ckpt", "ckpt_scMulan.pt", "ROAM_split", "resnet50-"):
        assert name in out
    assert "not published" in out
    assert "MODEL_LICENSE" in out
    assert "docs/weights.md" in out
    assert "{" not in out  # a table, not raw JSON


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            "scfoundation/tiny_official.ckpt",
            [
                "official scFoundation",
                "msfm scfoundation convert",
                "--variant cell",
                "--variant rde",
                "--variant gene",
            ],
        ),
        ("scmulan/tiny_official.pt", ["official scMulan", "msfm scmulan convert"]),
        ("roam/tiny_official.pt", ["released ROAM fold", "3 classes", "msfm roam convert"]),
    ],
)
def test_verify_identifies_official_fixtures_by_layout(path, expected, capsys):
    file = FIXTURES / path
    assert run_cli("weights", "verify", file) == 0
    out = capsys.readouterr().out
    assert "sha256" in out
    assert f"{file.stat().st_size} bytes" in out
    assert "recognised by its layout" in out
    for text in expected:
        assert text in out
    assert str(file) in out  # the printed command uses the file the user gave


def test_verify_identifies_a_resnet50_state_dict(tmp_path, capsys):
    state = {
        name: torch.zeros(1) for name in ("conv1.weight", "bn1.weight", "layer3.5.conv3.weight", "fc.weight")
    }
    file = tmp_path / "resnet50-local.pth"
    torch.save(state, file)
    assert run_cli("weights", "verify", file) == 0
    out = capsys.readouterr().out
    assert "ResNet-50" in out
    assert f"--encoder resnet50_trunc --weights {file}" in out


def test_verify_unrelated_files_get_one_clear_line_and_status_2(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    assert run_cli("weights", "verify", text) == 2
    err = capsys.readouterr().err
    assert "is not a known official checkpoint" in err
    assert len(err.strip().splitlines()) == 1

    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    assert run_cli("weights", "verify", other) == 2
    err = capsys.readouterr().err
    assert "layout matches none" in err

    assert run_cli("weights", "verify", tmp_path / "missing.pt") == 2
    assert "missing" in capsys.readouterr().err


class _Payload:
    """Unpickling this would create the marker file: proof that verify never executes a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_verify_refuses_a_pickled_object_without_running_it(tmp_path, capsys):
    marker = tmp_path / "executed"
    file = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, file)
    assert run_cli("weights", "verify", file) == 2
    err = capsys.readouterr().err
    assert "never unpickles" in err
    assert not marker.exists()


def test_checksum_prefix_of_torchvision_names():
    assert "resnet50-19c8e357.pth" in (match_checksum("19c8e357" + "0" * 56) or "")
    assert match_checksum("0" * 64) is None
