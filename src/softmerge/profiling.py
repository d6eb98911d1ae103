"""Wall time and peak memory of one step of work, for the cost columns of comparison tables.

Peak memory is the process's resident-set high-water mark while the block ran. On Linux the
mark is reset at the start of the block (``/proc/self/clear_refs``), so the number belongs to
that block alone; elsewhere it falls back to the process-lifetime peak (``ru_maxrss``), and
``Measurement.scope`` says which one was measured.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_mb: float = 0.0  # resident-set high-water mark during the block, in MiB
    scope: str = "block"  # "block" (reset at entry) or "process" (lifetime peak)


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _lifetime_peak_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


@contextlib.contextmanager
def measure() -> Iterator[Measurement]:
    """``with measure() as m: ...`` then ``m.seconds`` and ``m.peak_mb``."""
    result = Measurement()
    scoped = _reset_peak()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        peak_kb = _status_kb("VmHWM") if scoped else None
        if peak_kb is None:
            peak_kb, result.scope = _lifetime_peak_kb(), "process"
        result.peak_mb = peak_kb / 1024.0
