"""Give freed memory back to the operating system after the large one-off phases of a merge.

Reading candidates and stacking them allocates and frees many tensors of a few MB. glibc keeps
such freed blocks in its heap for reuse, so the process's resident memory stays at its peak
although nothing uses it any more. ``malloc_trim(0)`` returns them; it costs milliseconds and is
only called between phases (after the stack is filled, after candidates are ranked), never in
the training loop. On other C libraries this is a no-op.

Gate training frees and reallocates the same large tensors every step (a layer's weight
gradient, activations). glibc serves an allocation above its mmap threshold with a fresh
mapping and returns it whole on free; but freeing such a mapping raises the threshold to its
size, so from the second step on those tensors come from the heap, where the step's smaller
blocks pin them and the heap only grows. :func:`fix_mmap_threshold` pins the threshold (which
turns the adjustment off) and the heap's trim threshold at twice it (glibc's own ratio; an
earlier raise may have left it far higher). At 4 MiB a step's small blocks stay in the heap
and gradient-sized tensors are mapped and unmapped. It is set once per process, when the
first CPU stack is built (``CandidateStack``, ``ShardedStack``), before the steps shape the
heap; ``docs/performance.md`` measures its effect. ``SOFTMERGE_MMAP_THRESHOLD`` sets another
size in bytes, or ``off`` to leave glibc's default; a threshold the user set for glibc itself
(``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

from .errors import ConfigError

MMAP_THRESHOLD_ENV = "SOFTMERGE_MMAP_THRESHOLD"
DEFAULT_MMAP_THRESHOLD = 4 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def _libc(function: str):  # pragma: no cover - depends on the platform's C library
    """``function`` of the C library, or None where there is none or it lacks it."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):
        return None


def mmap_threshold_setting(env: os._Environ[str] | dict[str, str] = os.environ) -> int | None:
    """The threshold :func:`fix_mmap_threshold` would set under ``env``: None when glibc's own
    setting is to stay (``off``, or the user tuned glibc directly)."""
    if "MALLOC_MMAP_THRESHOLD_" in env or "mmap_threshold" in env.get("GLIBC_TUNABLES", ""):
        return None
    raw = env.get(MMAP_THRESHOLD_ENV, "").strip()
    if not raw:
        return DEFAULT_MMAP_THRESHOLD
    if raw.lower() in ("off", "0", "none"):
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise ConfigError(f"{MMAP_THRESHOLD_ENV}={raw!r}: give a size in bytes, or 'off'")
    return value


_applied: list[int] = []


def fix_mmap_threshold() -> int | None:
    """Pin glibc's mmap threshold for this process (once; see the module's docstring). Returns
    the threshold in force, or None when it was left to glibc (or the C library is not glibc)."""
    if _applied:
        return _applied[0]
    value = mmap_threshold_setting()
    call = _libc("mallopt")
    if value is None or call is None or call(_M_MMAP_THRESHOLD, value) != 1:
        return None
    call(_M_TRIM_THRESHOLD, 2 * value)
    _applied.append(value)
    return value


def release_memory(collect: bool = True) -> None:
    """Return the C heap's free memory to the operating system (after collecting garbage, unless
    ``collect`` is False: between tensors of a streamed merge nothing cyclic is left over)."""
    if collect:
        gc.collect()
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)
