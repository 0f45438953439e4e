"""What every benchmark records about the machine and the process it ran in (Linux ``/proc``; fallbacks elsewhere)."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

__all__ = ["cpu_model", "cpu_snapshot", "fmt", "loadavg", "others_cpu_share", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB.

    ``VmHWM`` belongs to the process's own address space, which starts fresh at ``exec``; ``ru_maxrss`` is carried
    across ``exec`` from the forking parent, so a worker started by a driver that once held large weights would
    report the driver's peak. ``ru_maxrss`` is only the fallback where ``/proc`` is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages, or None off Linux."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_snapshot() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) from /proc/stat and getrusage."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    hz = float(os.sysconf("SC_CLK_TCK"))
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / hz  # user..steal; guest time is already inside user
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime


def others_cpu_share(
    before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float
) -> float | None:
    """Fraction of the machine's CPU time used by OTHER processes during a timed part (0 = quiet machine).

    A timing with a share well above 0 was disturbed by other work on the machine.
    """
    if before is None or after is None or wall <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a markdown table: ``-`` for None, thousands separators from 100 up."""
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"
