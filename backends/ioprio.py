"""I/O priority of the calling thread (``ioprio_set(2)``, which has no wrapper in libc or Python).

The usage engine's rescans run their directory readers in the idle class: on a busy storage node they
read only when nothing else wants the disk. The priority is per thread, so only the scan's own readers
are lowered. Where the syscall is missing (an unknown architecture, a seccomp filter) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

IOPRIO_CLASS_RT, IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 1, 2, 3
_WHO_PROCESS = 1  # with id 0: the calling thread
_CLASS_SHIFT = 13
_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "ppc64le": (273, 274), "s390x": (282, 283),
             "riscv64": (30, 31)}  # (ioprio_set, ioprio_get)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_NUMBERS = _SYSCALLS.get(platform.machine())


def set_thread(klass: int, level: int = 0) -> bool:
    """Give the calling thread this I/O class (True when the kernel took it)."""
    if _NUMBERS is None:
        return False
    return _libc.syscall(_NUMBERS[0], _WHO_PROCESS, 0, (klass << _CLASS_SHIFT) | level) == 0


def idle_thread() -> bool:
    """The calling thread reads and writes only when no other I/O is waiting."""
    return set_thread(IOPRIO_CLASS_IDLE)


def thread_class(tid: int = 0) -> int | None:
    """The I/O class of a thread (0 = the caller); None when it cannot be read."""
    if _NUMBERS is None:
        return None
    value = _libc.syscall(_NUMBERS[1], _WHO_PROCESS, tid)
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return value >> _CLASS_SHIFT


__all__ = ["IOPRIO_CLASS_BE", "IOPRIO_CLASS_IDLE", "IOPRIO_CLASS_RT", "idle_thread", "set_thread", "thread_class"]
