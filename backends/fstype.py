"""The filesystem type of a path (``statfs`` ``f_type``), and whether other nodes may write to it.

``os.statvfs`` does not report ``f_type``, so ``statfs(2)`` is called through ctypes. On a filesystem
that other machines mount too (NFS, SMB, Lustre, GPFS, CephFS, FUSE clients such as Weka's, 9p, ...)
writes made elsewhere raise no local inotify/fanotify event: the usage engine must not claim to watch
such a volume (see ``agent/engine/usage/policy.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

# f_type magic numbers (linux/magic.h and the filesystems' own headers) -> (name, remote writers)
MAGICS: dict[int, tuple[str, bool]] = {
    0x6969: ("nfs", True),
    0xFF534D42: ("cifs", True),
    0xFE534D42: ("smb2", True),
    0x517B: ("smb", True),
    0x0BD00BD0: ("lustre", True),
    0x47504653: ("gpfs", True),
    0x00C36400: ("ceph", True),
    0x65735546: ("fuse", True),  # Weka, sshfs, s3fs, ...: a FUSE client is a network client more often than not
    0x01021997: ("9p", True),
    0x5346414F: ("afs", True),
    0x6B414653: ("afs", True),
    0x19830326: ("beegfs", True),
    0x013111A8: ("ibrix", True),
    0x564C: ("ncp", True),
    0x73757245: ("coda", True),
    0x7461636F: ("ocfs2", True),
    0x01161970: ("gfs2", True),
    0xEF53: ("ext4", False),
    0x58465342: ("xfs", False),
    0x9123683E: ("btrfs", False),
    0x01021994: ("tmpfs", False),
    0x794C7630: ("overlay", False),
    0x2FC12FC1: ("zfs", False),
    0x858458F6: ("ramfs", False),
    0xF2F52010: ("f2fs", False),
    0x3153464A: ("jfs", False),
    0x52654973: ("reiserfs", False),
    0x4D44: ("vfat", False),
    0x2011BAB0: ("exfat", False),
    0xCA451A4E: ("bcachefs", False),
}


@dataclass(frozen=True)
class FsType:
    magic: int
    name: str  # a known name, or "0x…" for a magic number not in the table
    remote: bool  # other nodes may write to it (their writes raise no local event)


class _StatFs(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t, a long on every Linux ABI); the rest is padding here
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_statfs = _libc.statfs
_statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_StatFs)]
_statfs.restype = ctypes.c_int


def identify(magic: int) -> FsType:
    name, remote = MAGICS.get(magic, (f"{magic:#x}", False))
    return FsType(magic, name, remote)


def detect(path: str | os.PathLike[str]) -> FsType:
    """The type of the filesystem holding ``path`` (OSError when it cannot be read)."""
    buf = _StatFs()
    if _statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return identify(buf.f_type & 0xFFFFFFFF)


__all__ = ["MAGICS", "FsType", "detect", "identify"]
