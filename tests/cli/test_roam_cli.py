"""`msfm roam convert`: released fold checkpoint -> msfm checkpoint, with parity and clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import msfm
from msfm.cli import main
from msfm.errors import MsfmInputError

FIXTURE = "tests/fixtures/roam"


def test_convert_official_checkpoint_reproduces_the_official_logits(tmp_path) -> None:
    out = tmp_path / "roam_fold0"
    main(
        [
            "roam",
            "convert",
            f"{FIXTURE}/tiny_official.pt",
            "--out",
            str(out),
            "--class-names",
            "astro,oligo,epen",
            "--task",
            "subtyping",
            "--fold",
            "0",
        ]
    )
    loaded = msfm.roam.load(out, device="cpu")
    model = loaded.model
    assert model.config.class_names == ("astro", "oligo", "epen")
    assert loaded.extra["task"] == "subtyping"
    assert loaded.extra["encoder"] == {"name": "resnet50_trunc", "dim": 64}
    io = load_file(f"{FIXTURE}/tiny_official_io.safetensors")
    with torch.no_grad():
        logits = model(io["A_features"]).logits
    torch.testing.assert_close(logits, io["A_slide_logits"], atol=1e-5, rtol=1e-5)


def test_convert_refuses_existing_output_and_bad_files(tmp_path, capsys) -> None:
    out = tmp_path / "x"
    out.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["roam", "convert", f"{FIXTURE}/tiny_official.pt", "--out", str(out)])
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(SystemExit) as exc:
        main(["roam", "convert", str(bad), "--out", str(tmp_path / "y")])
    assert exc.value.code == 2
    assert "bad.pth" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(SystemExit) as exc:
        main(["roam", "convert", str(other), "--out", str(tmp_path / "z")])
    assert exc.value.code == 2
    assert "released multi-scale ROAM" in capsys.readouterr().err


def test_convert_api_refuses_existing_output_unless_overwrite(tmp_path) -> None:
    out = tmp_path / "ckpt"
    path = msfm.roam.convert(f"{FIXTURE}/tiny_official.pt", out, class_names="a,b,c", fold=1)
    assert path == out
    with pytest.raises(MsfmInputError, match="already exists"):
        msfm.roam.convert(f"{FIXTURE}/tiny_official.pt", out)
    msfm.roam.convert(f"{FIXTURE}/tiny_official.pt", out, overwrite=True, task="t")
    assert msfm.roam.load(out, device="cpu").extra["task"] == "t"
    with pytest.warns(DeprecationWarning, match=r"msfm\.roam\.convert\("):
        msfm.roam.convert_official(f"{FIXTURE}/tiny_official.pt", out)  # replaced it, as it always did


def test_typer_exit_codes_reach_the_shell(tmp_path) -> None:
    """A command ending with typer.Exit(1) (e.g. preprocess with a failed slide) must exit 1, not 0."""
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide")
    with pytest.raises(SystemExit) as exc:
        main(
            ["roam", "preprocess", str(bad), "--out", str(tmp_path / "prep"), "--encoder", "tiny", "--quiet"]
        )
    assert exc.value.code == 1
