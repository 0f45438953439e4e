"""Hardware-aware precision: what the device computes fast, and the one place ``precision="auto"`` is decided.

Every verb and the CLI accept ``precision="auto"``. :func:`resolve_precision` turns it into ``"32"`` or
``"bf16"`` once per call, with a one-line reason the verb records in ``uns[key][verb]["precision"]``:

* **CUDA**: bf16 when ``torch.cuda.is_bf16_supported()``, else fp32.
* **MPS**: fp32.
* **CPU**: bf16 only when the CPU has bf16 hardware (``amx_bf16`` or ``avx512_bf16`` in ``/proc/cpuinfo``, or
  ``bf16`` on arm64) **and** a one-off micro-benchmark finds bf16 matmuls at least :data:`BF16_MIN_SPEEDUP` times as
  fast as fp32. The benchmark runs once per machine (well under a second); its result is cached in
  ``$MSFM_CACHE_DIR/precision.json`` (default ``~/.cache/msfm/precision.json``), keyed by CPU model, torch version
  and core count. The file is written atomically; an unreadable or corrupt cache is measured again, never an error.
* ``MSFM_PRECISION_AUTO=32`` or ``=bf16`` overrides the detection (for tests, and for users who know better).

Explicit ``"32"``, ``"bf16"`` and ``"16"`` (and Lightning's ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``) are kept
as given. The choice for ``"auto"`` is logged once per process at INFO level.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from msfm.errors import MsfmInputError

logger = logging.getLogger(__name__)

Precision = Literal["32", "bf16", "16"]

# Lightning spellings are accepted too, so one precision string can be passed to training and inference.
PRECISION_ALIASES: dict[str, Precision] = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "16": "16",
    "16-mixed": "16",
    "fp16": "16",
}
LIGHTNING_PRECISION: dict[Precision, str] = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
ACCEPTED = "'auto', '32', 'bf16', '16' (or Lightning's '32-true', 'bf16-mixed', '16-mixed')"

#: Environment variable that overrides the detection behind ``precision="auto"`` (``32`` or ``bf16``).
ENV_OVERRIDE = "MSFM_PRECISION_AUTO"
#: Environment variable naming the folder of msfm's per-machine caches (default ``~/.cache/msfm``).
ENV_CACHE_DIR = "MSFM_CACHE_DIR"
#: CPU auto picks bf16 only when the micro-benchmark measures bf16 matmuls at least this much faster than fp32.
BF16_MIN_SPEEDUP = 1.5
#: Shape ``(m, k, n)`` of the micro-benchmark's ``[m, k] x [k, n]`` matmul: small, so it stays well under a second.
PROBE_SHAPE = (256, 512, 512)
CACHE_FILE = "precision.json"
_CACHE_VERSION = 1

# /proc/cpuinfo flags that decide how fast bf16 is (x86), plus arm64's "bf16" feature.
_RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")
_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")

__all__ = [
    "ACCEPTED",
    "BF16_MIN_SPEEDUP",
    "ENV_CACHE_DIR",
    "ENV_OVERRIDE",
    "LIGHTNING_PRECISION",
    "PRECISION_ALIASES",
    "CpuCapability",
    "Precision",
    "PrecisionChoice",
    "cache_path",
    "canonical_precision",
    "cpu_bf16_probe",
    "cpu_capability",
    "matmul_rate",
    "resolve_precision",
]


@dataclass(frozen=True)
class CpuCapability:
    """What this process's CPU offers for matmuls.

    Attributes:
        model: the CPU model string (``/proc/cpuinfo``'s "model name", else :func:`platform.processor`).
        torch_capability: ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``"AVX2"``, ``"AVX512"``).
        flags: the relevant CPU flags present (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``, ``amx_tile``;
            ``bf16`` on arm64).
        bf16_hardware: whether the CPU has bf16 matmul hardware (``amx_bf16`` or ``avx512_bf16``; ``bf16`` on arm64).
        cores: logical cores available to this process.
    """

    model: str
    torch_capability: str
    flags: frozenset[str]
    bf16_hardware: bool
    cores: int = 1

    def summary(self) -> dict[str, Any]:
        """Plain-value summary (for ``uns``, JSON and log lines)."""
        return {
            "cpu_model": self.model,
            "torch_capability": self.torch_capability,
            "flags": sorted(self.flags),
            "bf16_hardware": self.bf16_hardware,
            "cores": self.cores,
        }

    def line(self) -> str:
        """One line such as ``AMD EPYC, 2 cores, torch capability AVX2, flags avx2, no bf16 hardware``."""
        flags = ", ".join(sorted(self.flags)) or "none of avx2/avx512f/avx512_bf16/amx_bf16"
        hw = "bf16 hardware" if self.bf16_hardware else "no bf16 hardware"
        return (
            f"{self.model}, {self.cores} cores, torch capability {self.torch_capability}, flags {flags}, {hw}"
        )


@dataclass(frozen=True)
class PrecisionChoice:
    """The outcome of :func:`resolve_precision`.

    Attributes:
        precision: ``"32"``, ``"bf16"`` or ``"16"``: what runs.
        requested: what the caller asked for (e.g. ``"auto"``, ``"bf16-mixed"``).
        reason: one line saying why.
        capability: plain-value summary of the device that decided it.
    """

    precision: Precision
    requested: str
    reason: str
    capability: dict[str, Any] = field(default_factory=dict)

    @property
    def lightning(self) -> str:
        """Lightning's name for the chosen precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``)."""
        return LIGHTNING_PRECISION[self.precision]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``."""
        return {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}[self.precision]

    def record(self) -> dict[str, str]:
        """What a verb stores in ``uns[key][verb]["precision"]``: ``{"requested", "chosen", "reason"}``."""
        return {"requested": self.requested, "chosen": self.precision, "reason": self.reason}


def canonical_precision(precision: Any) -> Precision | Literal["auto"]:
    """``"auto"`` or the canonical ``"32"``/``"bf16"``/``"16"`` for any accepted spelling (case and blanks ignored).

    Raises:
        MsfmInputError: for anything else; the message lists the accepted values.
    """
    key = str(precision).strip().lower()
    if key == "auto":
        return "auto"
    if key not in PRECISION_ALIASES:
        msg = f"Unknown precision {precision!r}; expected one of {ACCEPTED}."
        raise MsfmInputError(msg)
    return PRECISION_ALIASES[key]


# --------------------------------------------------------------------------------------------------- capability


def _read_cpuinfo() -> tuple[str, set[str]]:
    """CPU model string and the set of all flags/features from ``/proc/cpuinfo`` (empty off Linux)."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif name in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


@functools.cache
def cpu_capability() -> CpuCapability:
    """This CPU's model, torch's CPU capability and the relevant flags (computed once per process)."""
    model, all_flags = _read_cpuinfo()
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    get_cap = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        torch_cap = str(get_cap()) if get_cap is not None else "unknown"
    except Exception:
        torch_cap = "unknown"
    flags = frozenset(f for f in _RELEVANT_FLAGS if f in all_flags)
    # arm64 lists "bf16" among its Features; on x86 the flag names are amx_bf16 / avx512_bf16.
    bf16 = any(f in flags for f in _BF16_FLAGS)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuCapability(
        model=model, torch_capability=torch_cap, flags=flags, bf16_hardware=bf16, cores=cores
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_rate(
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    shape: tuple[int, int, int] = (4096, 768, 3072),
    repeats: int = 5,
    warmup: int = 1,
) -> float:
    """Measured matmul rate in GFLOP/s of ``nn.Linear``'s product ``x[m, k] @ w[n, k].T`` in ``dtype`` on ``device``.

    The layout is the one every model layer uses: on a CPU without bf16 hardware, torch takes a ~20x faster bf16
    kernel for it than for a plain ``[m, k] @ [k, n]`` product, so timing ``torch.mm`` would understate the limit
    the models run against (and mislead the ``auto`` probe). The median of ``repeats`` timed runs is reported.

    Args:
        device: where to measure (``"cpu"``, ``"cuda:0"``, ...).
        dtype: e.g. ``torch.float32`` or ``torch.bfloat16``.
        shape: ``(m, k, n)``; the default is one linear layer of a 768-wide encoder on 4,096 tokens.
        repeats: timed runs (the median is reported).
        warmup: untimed runs first (kernel selection, caches, lazy initialisation).

    Returns:
        GFLOP/s (``2 m k n`` floating-point operations per matmul).
    """
    dev = torch.device(device)
    m, k, n = (int(v) for v in shape)
    if min(m, k, n) < 1 or repeats < 1:
        msg = (
            f"matmul_rate: got shape={shape!r}, repeats={repeats}; expected positive sizes and repeats >= 1."
        )
        raise MsfmInputError(msg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device=dev, dtype=dtype)
    w = torch.randn(n, k, generator=gen).to(device=dev, dtype=dtype)
    times = []
    with torch.inference_mode():
        for _ in range(max(0, warmup)):
            torch.nn.functional.linear(x, w)
        _sync(dev)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            _sync(dev)
            times.append(time.perf_counter() - start)
    seconds = max(statistics.median(times), 1e-9)
    return 2.0 * m * k * n / seconds / 1e9


# ------------------------------------------------------------------------------------------------- cached probe


def cache_path() -> Path:
    """The per-machine precision cache: ``$MSFM_CACHE_DIR/precision.json``, else ``~/.cache/msfm/precision.json``."""
    root = os.environ.get(ENV_CACHE_DIR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "msfm"
    return base / CACHE_FILE


def _cache_key(cap: CpuCapability) -> str:
    return f"{cap.model} | torch {torch.__version__} | {cap.cores} cores"


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries, or ``{}`` when the file is missing, unreadable or not what we wrote."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as err:
        logger.warning("Ignoring unreadable precision cache %s (%s); measuring again.", path, err)
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") != _CACHE_VERSION
        or not isinstance(data.get("entries"), dict)
    ):
        logger.warning("Ignoring precision cache %s in an unknown layout; measuring again.", path)
        return {}
    return data["entries"]


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    values = [entry.get("fp32_gflops"), entry.get("bf16_gflops")]
    return all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values)


_probe_lock = threading.Lock()


def cpu_bf16_probe(*, refresh: bool = False) -> dict[str, Any]:
    """fp32 and bf16 matmul rates of this CPU at :data:`PROBE_SHAPE`, measured once per machine and cached.

    Args:
        refresh: measure again even when the cache holds this machine.

    Returns:
        ``{"fp32_gflops", "bf16_gflops", "speedup", "cached", "key"}``.
    """
    cap = cpu_capability()
    key = _cache_key(cap)
    path = cache_path()
    with _probe_lock:
        entries = _read_cache(path)
        entry = entries.get(key)
        if not refresh and _valid_entry(entry):
            fp32, bf16 = float(entry["fp32_gflops"]), float(entry["bf16_gflops"])
            return {
                "fp32_gflops": fp32,
                "bf16_gflops": bf16,
                "speedup": bf16 / fp32,
                "cached": True,
                "key": key,
            }
        fp32 = matmul_rate("cpu", torch.float32, shape=PROBE_SHAPE, repeats=3)
        bf16 = matmul_rate("cpu", torch.bfloat16, shape=PROBE_SHAPE, repeats=3)
        entries = {k: v for k, v in entries.items() if _valid_entry(v)}
        entries[key] = {
            "fp32_gflops": round(fp32, 3),
            "bf16_gflops": round(bf16, 3),
            "shape": list(PROBE_SHAPE),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            from msfm.runtime.atomic import atomic_write_json

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"version": _CACHE_VERSION, "entries": entries})
        except (OSError, MsfmInputError) as err:  # a read-only home must not stop inference
            logger.warning(
                "Could not write the precision cache %s (%s); it will be measured again.", path, err
            )
    return {"fp32_gflops": fp32, "bf16_gflops": bf16, "speedup": bf16 / fp32, "cached": False, "key": key}


# ------------------------------------------------------------------------------------------------------ resolve


def _as_device(device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device is None or str(device).strip().lower() == "auto":
        from msfm.runtime.devices import resolve_device  # devices imports this module at its top

        return resolve_device("auto")
    spec = str(device).strip().lower()
    spec = "cuda" + spec[3:] if spec.startswith("gpu") else spec  # Lightning's accelerator name
    try:
        return torch.device(spec)
    except (RuntimeError, ValueError) as err:
        msg = f"Unknown device {device!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        raise MsfmInputError(msg) from err


def _env_override() -> Precision | None:
    raw = os.environ.get(ENV_OVERRIDE)
    if raw is None or not raw.strip():
        return None
    key = raw.strip().lower()
    value = PRECISION_ALIASES.get(key)
    if value not in ("32", "bf16"):
        msg = f"{ENV_OVERRIDE}={raw!r}; expected '32' or 'bf16'. Unset it to let msfm detect the precision."
        raise MsfmInputError(msg)
    return value


def _cuda_summary(dev: torch.device) -> dict[str, Any]:
    try:
        name = torch.cuda.get_device_name(dev)
    except Exception:
        name = "CUDA device"
    return {"device": str(dev), "gpu": name, "bf16_supported": bool(torch.cuda.is_bf16_supported())}


def _detect(dev: torch.device) -> tuple[Precision, str, dict[str, Any]]:
    if dev.type == "cuda":
        summary = _cuda_summary(dev)
        if summary["bf16_supported"]:
            return "bf16", f"{summary['gpu']} supports bf16", summary
        return "32", f"{summary['gpu']} does not support bf16", summary
    if dev.type == "mps":
        return "32", "MPS: fp32 (bf16 autocast is not known to be faster there)", {"device": "mps"}
    if dev.type != "cpu":
        return "32", f"device type {dev.type!r}: fp32", {"device": str(dev)}
    cap = cpu_capability()
    summary = {"device": "cpu", **cap.summary()}
    if not cap.bf16_hardware:
        have = "/".join(f.upper() for f in ("avx512f", "avx2") if f in cap.flags) or cap.torch_capability
        reason = (
            f"no bf16 hardware on {cap.model} ({have} only, no AMX-BF16/AVX512-BF16; torch capability "
            f"{cap.torch_capability}): bf16 would be slower than fp32"
        )
        return "32", reason, summary
    probe = cpu_bf16_probe()
    summary.update({k: probe[k] for k in ("fp32_gflops", "bf16_gflops", "speedup", "cached")})
    hw = "/".join(f.upper() for f in _BF16_FLAGS if f in cap.flags)
    rates = f"bf16 {probe['bf16_gflops']:.0f} vs fp32 {probe['fp32_gflops']:.0f} GFLOP/s"
    if probe["speedup"] >= BF16_MIN_SPEEDUP:
        return (
            "bf16",
            f"bf16 hardware ({hw}) and bf16 matmuls {probe['speedup']:.1f}x fp32 ({rates})",
            summary,
        )
    reason = f"bf16 hardware ({hw}) but bf16 matmuls only {probe['speedup']:.2f}x fp32 ({rates}, need {BF16_MIN_SPEEDUP}x)"
    return "32", reason, summary


_detected: dict[str, tuple[Precision, str, dict[str, Any]]] = {}
_logged: set[tuple[str, str, str]] = set()


def resolve_precision(requested: Any = "auto", device: str | torch.device | None = "auto") -> PrecisionChoice:
    """Decide the precision a call runs in.

    Args:
        requested: ``"auto"``, ``"32"``, ``"bf16"``, ``"16"`` or a Lightning spelling (``"32-true"``,
            ``"bf16-mixed"``, ``"16-mixed"``). Explicit values are kept as given.
        device: the device the call runs on (``"auto"``, ``"cpu"``, ``"cuda:0"`` or a :class:`torch.device`;
            Lightning's accelerator name ``"gpu"`` means CUDA).

    Returns:
        The :class:`PrecisionChoice` (``.precision``, ``.reason``, ``.record()`` for ``uns``).

    Raises:
        MsfmInputError: for an unknown precision (the message lists the accepted values) or a bad
            ``MSFM_PRECISION_AUTO``.
    """
    canon = canonical_precision(requested)
    requested_text = str(requested).strip()
    if canon != "auto":
        return PrecisionChoice(canon, requested_text, f"precision={requested_text!r} requested explicitly")
    dev = _as_device(device)
    override = _env_override()
    if override is not None:
        chosen, reason, summary = (
            override,
            f"{ENV_OVERRIDE}={override} overrides detection",
            {"device": str(dev)},
        )
    else:
        key = str(dev)
        if key not in _detected:
            _detected[key] = _detect(dev)
        chosen, reason, summary = _detected[key]
    log_key = (str(dev), chosen, reason)
    if log_key not in _logged:
        _logged.add(log_key)
        logger.info("precision='auto' on %s -> %s: %s", dev, chosen, reason)
    return PrecisionChoice(chosen, requested_text, reason, dict(summary))


def _reset_for_tests() -> None:
    """Forget the per-process detection, log memory and capability (tests that force capabilities call this)."""
    _detected.clear()
    _logged.clear()
    getattr(cpu_capability, "cache_clear", lambda: None)()  # a test may have replaced the function
