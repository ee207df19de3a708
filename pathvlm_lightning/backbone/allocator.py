"""glibc's mmap threshold, pinned once per process when generation first runs on CPU.

glibc serves an allocation of at least the *mmap threshold* with its own ``mmap`` (given back to the
system on ``free``) and a smaller one from its heap. The threshold starts at 128 KiB and, by default,
rises to the size of any mmapped block that is freed (up to 32 MiB). A CPU decoding loop frees
logits-sized blocks at every step (``[N, V]`` float32: 9.7 MiB for 16 rows of Qwen's 151,936 ids),
so after the first steps every such temporary goes to the heap, interleaved with the key/value cache
that grows by one position per step, and the heap fragments: in benchmark (b)
(``benchmarks/README.md``) our side's peak grew by ~1.8 GiB instead of ~0.5 GiB.

:func:`pin_mmap_threshold` fixes the threshold (default 4 MiB), which also turns glibc's dynamic
adjustment off, so large tensors are mapped and unmapped whole and the heap keeps the small ones.
This is a **process-wide** allocator setting: it applies to every later allocation of the process,
not only ours. Opt out with ``PATHVLM_MMAP_THRESHOLD=off`` (or choose the threshold in bytes, e.g.
``PATHVLM_MMAP_THRESHOLD=8388608``). It is left alone where the user already set glibc's own
``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...``, and off glibc
(macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

ENV = "PATHVLM_MMAP_THRESHOLD"
DEFAULT_THRESHOLD = 4 * 1024 * 1024  # bytes; below one [16, 151_936] float32 logits block (9.7 MiB)
M_MMAP_THRESHOLD = -3  # mallopt's parameter number, <malloc.h>
_OFF = ("off", "0", "no", "false")

_result: bool | None = None  # None: not tried yet in this process


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold the first time it is called in the process; ``True`` if it was set.

    Later calls return the first call's result without touching the allocator again.
    """
    global _result
    if _result is None:
        _result = _pin()
    return _result


def _pin() -> bool:
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own glibc setting wins
    threshold = DEFAULT_THRESHOLD
    if setting:
        try:
            threshold = int(setting)
        except ValueError:
            raise ValueError(f"{ENV}={setting!r}: expected a size in bytes or 'off'") from None
        if threshold <= 0:
            raise ValueError(f"{ENV}={setting!r}: expected a positive size in bytes or 'off'")
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))  # 0: glibc refused (older ones cap it at 32 MiB)


def _glibc() -> Any:
    """The process's glibc (``mallopt`` callable), or ``None`` off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into the process: its own libc
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc
