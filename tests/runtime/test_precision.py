"""precision="auto": the choice under forced capabilities, the per-machine cache, explicit values, bad values.

The real hardware is never consulted here: CPU flags, the micro-benchmark and CUDA's bf16 support are forced, so the
same assertions hold on an AVX2 laptop, an AMX server and a GPU node.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from msfm.errors import MsfmInputError
from msfm.runtime import precision as P
from msfm.runtime.devices import autocast_context, normalize_precision

AVX2 = P.CpuCapability("Test EPYC", "AVX2", frozenset({"avx2"}), bf16_hardware=False, cores=2)
AMX = P.CpuCapability(
    "Test Xeon",
    "AVX512",
    frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
    True,
    cores=2,
)


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No override, a private cache folder, and a fresh per-process memory for every test."""
    monkeypatch.delenv(P.ENV_OVERRIDE, raising=False)
    monkeypatch.setenv(P.ENV_CACHE_DIR, str(tmp_path / "cache"))
    P._reset_for_tests()
    yield
    P._reset_for_tests()


def _force_cpu(
    monkeypatch: pytest.MonkeyPatch, cap: P.CpuCapability, rates: dict[torch.dtype, float] | None = None
):
    """Force the CPU capability and the micro-benchmark's rates; returns the list of measured dtypes."""
    monkeypatch.setattr(P, "cpu_capability", lambda: cap)
    calls: list[torch.dtype] = []

    def fake_rate(device, dtype, **_):
        calls.append(dtype)
        return (rates or {torch.float32: 100.0, torch.bfloat16: 900.0})[dtype]

    monkeypatch.setattr(P, "matmul_rate", fake_rate)
    return calls


def test_auto_picks_fp32_on_an_avx2_only_cpu_without_benchmarking(monkeypatch, caplog) -> None:
    calls = _force_cpu(monkeypatch, AVX2)
    with caplog.at_level(logging.INFO, logger="msfm.runtime.precision"):
        choice = P.resolve_precision("auto", "cpu")
        P.resolve_precision("auto", "cpu")
    assert choice.precision == "32"
    assert choice.requested == "auto"
    assert "no bf16 hardware" in choice.reason
    assert "AVX2" in choice.reason
    assert calls == []  # no bf16 hardware: nothing to measure
    assert choice.record() == {"requested": "auto", "chosen": "32", "reason": choice.reason}
    assert choice.lightning == "32-true"
    assert choice.capability["bf16_hardware"] is False
    assert sum("precision='auto'" in r.getMessage() for r in caplog.records) == 1  # logged once per process


def test_auto_picks_bf16_on_a_bf16_cpu_when_the_benchmark_agrees(monkeypatch) -> None:
    calls = _force_cpu(monkeypatch, AMX)
    choice = P.resolve_precision("auto", torch.device("cpu"))
    assert choice.precision == "bf16"
    assert choice.lightning == "bf16-mixed"
    assert choice.dtype == torch.bfloat16
    assert "AMX_BF16" in choice.reason
    assert "9.0x" in choice.reason
    assert sorted(map(str, calls)) == ["torch.bfloat16", "torch.float32"]
    # autocast_context and normalize_precision take the same path
    assert normalize_precision("auto", "cpu") == "bf16"
    with autocast_context("cpu", "auto"):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16


def test_bf16_hardware_that_is_not_faster_keeps_fp32(monkeypatch) -> None:
    _force_cpu(monkeypatch, AMX, {torch.float32: 100.0, torch.bfloat16: 120.0})
    choice = P.resolve_precision("auto", "cpu")
    assert choice.precision == "32"
    assert "only 1.20x" in choice.reason


def test_env_override_wins_and_is_validated(monkeypatch) -> None:
    _force_cpu(monkeypatch, AVX2)
    monkeypatch.setenv(P.ENV_OVERRIDE, "bf16")
    choice = P.resolve_precision("auto", "cpu")
    assert choice.precision == "bf16"
    assert P.ENV_OVERRIDE in choice.reason
    monkeypatch.setenv(P.ENV_OVERRIDE, "32")
    assert P.resolve_precision("auto", "cpu").precision == "32"
    monkeypatch.setenv(P.ENV_OVERRIDE, "fast")
    with pytest.raises(MsfmInputError, match=r"MSFM_PRECISION_AUTO='fast'.*'32' or 'bf16'"):
        P.resolve_precision("auto", "cpu")
    # explicit precisions ignore the override
    assert P.resolve_precision("32", "cpu").precision == "32"


@pytest.mark.parametrize(("supported", "expected"), [(True, "bf16"), (False, "32")])
def test_cuda_follows_bf16_support(monkeypatch, supported: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    choice = P.resolve_precision("auto", "cuda:0")
    assert choice.precision == expected
    assert "Test GPU" in choice.reason
    assert choice.capability["bf16_supported"] is supported
    # Lightning's accelerator name means the same device
    P._reset_for_tests()
    assert P.resolve_precision("auto", "gpu").precision == expected


def test_mps_is_fp32() -> None:
    assert P.resolve_precision("auto", torch.device("mps")).precision == "32"


def test_benchmark_is_cached_per_machine_and_written_atomically(monkeypatch, tmp_path) -> None:
    calls = _force_cpu(monkeypatch, AMX)
    seen: list[Path] = []
    from msfm.runtime import atomic

    real = atomic.atomic_write_json
    monkeypatch.setattr(
        atomic, "atomic_write_json", lambda path, obj, **kw: seen.append(Path(path)) or real(path, obj, **kw)
    )
    assert P.resolve_precision("auto", "cpu").precision == "bf16"
    path = P.cache_path()
    assert path == tmp_path / "cache" / "precision.json"
    assert seen == [path]
    data = json.loads(path.read_text())
    (key,) = data["entries"]
    assert "Test Xeon" in key
    assert torch.__version__ in key
    assert "2 cores" in key
    assert data["entries"][key]["bf16_gflops"] == 900.0
    assert [p.name for p in path.parent.iterdir()] == ["precision.json"]  # no temporary left behind

    # A new process (forgotten memory) reads the cache instead of measuring again.
    P._reset_for_tests()
    calls.clear()
    choice = P.resolve_precision("auto", "cpu")
    assert choice.precision == "bf16"
    assert calls == []
    assert choice.capability["cached"] is True


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"version": 99, "entries": {}}', '{"version": 1, "entries": {"x": 1}}', "\x00\xff"],
)
def test_corrupt_cache_is_measured_again(monkeypatch, content: str) -> None:
    calls = _force_cpu(monkeypatch, AMX)
    path = P.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="latin-1")
    assert P.resolve_precision("auto", "cpu").precision == "bf16"
    assert len(calls) == 2  # measured
    data = json.loads(path.read_text())  # ... and the cache repaired
    assert data["version"] == 1
    assert len(data["entries"]) == 1


def test_unwritable_cache_does_not_stop_inference(monkeypatch, tmp_path) -> None:
    _force_cpu(monkeypatch, AMX)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(P.ENV_CACHE_DIR, str(blocker / "sub"))
    assert P.resolve_precision("auto", "cpu").precision == "bf16"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("32", "32"),
        ("32-true", "32"),
        ("bf16", "bf16"),
        ("bf16-mixed", "bf16"),
        ("16", "16"),
        ("16-mixed", "16"),
        (" BF16 ", "bf16"),
    ],
)
def test_explicit_precisions_are_kept(monkeypatch, given: str, expected: str) -> None:
    calls = _force_cpu(monkeypatch, AMX)
    monkeypatch.setenv(P.ENV_OVERRIDE, "32")
    choice = P.resolve_precision(given, "cpu")
    assert choice.precision == expected
    assert choice.requested == given.strip()
    assert "explicitly" in choice.reason
    assert calls == []


@pytest.mark.parametrize("bad", ["8", "fp8", "", "automatic"])
def test_bad_precision_lists_the_accepted_values(bad: str) -> None:
    with pytest.raises(MsfmInputError, match=r"Unknown precision.*'auto', '32', 'bf16', '16'.*'bf16-mixed'"):
        P.resolve_precision(bad, "cpu")


def test_real_capability_and_matmul_rate_are_plain_values() -> None:
    cap = P.cpu_capability()
    assert isinstance(cap.model, str)
    assert cap.model
    assert cap.flags <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16"}
    assert cap.bf16_hardware == bool(cap.flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert "cores" in cap.line()
    assert P.matmul_rate("cpu", torch.float32, shape=(64, 64, 64), repeats=2) > 0
    with pytest.raises(MsfmInputError, match="positive"):
        P.matmul_rate("cpu", torch.float32, shape=(0, 64, 64))


def test_training_auto_resolves_on_the_accelerator(monkeypatch) -> None:
    from msfm.engine.trainer import TrainerOptions, lightning_precision

    _force_cpu(monkeypatch, AMX)
    assert lightning_precision(TrainerOptions(accelerator="cpu", precision="auto")) == "bf16-mixed"
    P._reset_for_tests()
    _force_cpu(monkeypatch, AVX2)
    assert lightning_precision(TrainerOptions(accelerator="cpu", precision="auto")) == "32-true"
    assert (
        lightning_precision(TrainerOptions(accelerator="cpu")) == "32-true"
    )  # the training default is unchanged
    assert lightning_precision(TrainerOptions(accelerator="cpu", precision="bf16-mixed")) == "bf16-mixed"
