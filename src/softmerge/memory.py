"""Give freed memory back to the operating system after the large one-off phases of a merge.

Reading candidates and stacking them allocates and frees many tensors of a few MB. glibc keeps
such freed blocks in its heap for reuse, so the process's resident memory stays at its peak
although nothing uses it any more. ``malloc_trim(0)`` returns them; it costs milliseconds and is
only called between phases (after the stack is filled, after candidates are ranked), never in
the training loop. On other C libraries this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():  # pragma: no cover - depends on the platform's C library
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory(collect: bool = True) -> None:
    """Return the C heap's free memory to the operating system (after collecting garbage, unless
    ``collect`` is False: between tensors of a streamed merge nothing cyclic is left over)."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
