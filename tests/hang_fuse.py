"""A FUSE filesystem that hangs: ``python -m tests.hang_fuse MOUNTPOINT`` mounts an empty directory whose
listing (READDIR) never answers, as a hung NFS or FUSE mount does. Its root's attributes answer, so the mount
comes up; the kernel ends a stuck request with ENOTCONN once this process is gone (SIGTERM or SIGKILL, then
``umount -l``)."""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3
import trio


class Hung(pyfuse3.Operations):
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.st_mode = stat.S_IFDIR | 0o755
        e.st_nlink = 2
        now = time.time_ns()
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = now
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        return e

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await trio.sleep_forever()  # the hang


def main(mountpoint: str) -> None:
    pyfuse3.init(Hung(), mountpoint, ["fsname=hangfs", "default_permissions"])
    print("mounted", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main(sys.argv[1])
