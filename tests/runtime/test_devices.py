"""Device strings and autocast contexts (CPU machine: CUDA requests must fail clearly)."""

from __future__ import annotations

import pytest
import torch

from msfm.errors import MsfmInputError
from msfm.runtime.devices import autocast_context, normalize_precision, resolve_device


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    auto = resolve_device("auto")
    if expected:
        assert auto.type == "cuda"
    else:
        assert auto.type in {"cpu", "mps"}


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_unavailable_is_explained(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs on GPU machines too: CUDA is hidden, as on a CPU-only install.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MsfmInputError, match=r"CUDA is not available.*device='cpu'"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", "tpu", ""])
def test_unknown_device(name: str) -> None:
    with pytest.raises(MsfmInputError, match="Unknown device"):
        resolve_device(name)


def test_non_string_device() -> None:
    with pytest.raises(MsfmInputError, match=r"string or torch\.device"):
        resolve_device(0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "canonical"), [("32", "32"), ("bf16-mixed", "bf16"), ("16-mixed", "16"), ("BF16", "bf16")]
)
def test_normalize_precision(given: str, canonical: str) -> None:
    assert normalize_precision(given) == canonical


def test_unknown_precision() -> None:
    with pytest.raises(MsfmInputError, match="Unknown precision"):
        normalize_precision("8")


def test_autocast_bf16_on_cpu() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "32"):
        assert (a @ b).dtype == torch.float32
    assert (a @ b).dtype == torch.float32
