"""A real filesystem on a loop device, made from a sparse image file, for backend tests and benchmarks.

``loop_mount`` always unmounts and detaches its loop device, also when the body fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MKFS = {"btrfs": ["mkfs.btrfs", "-q", "-f"], "xfs": ["mkfs.xfs", "-q", "-f"]}


def why_no_loop(fstype: str) -> str | None:
    """Why this machine cannot make a loop-mounted ``fstype`` (None = it can)."""
    if os.geteuid() != 0:
        return "loop mounts need root"
    if shutil.which(MKFS[fstype][0]) is None:
        return f"{MKFS[fstype][0]} is not installed (packaging/dev-deps.sh --test installs it)"
    if not os.path.exists("/dev/loop-control"):
        return "the kernel has no loop device support (/dev/loop-control missing)"
    if fstype not in Path("/proc/filesystems").read_text().split():
        return f"the kernel has no {fstype} support (not in /proc/filesystems)"
    return None


def _attached(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def _unmount(mnt: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        if not os.path.ismount(mnt):
            return
        time.sleep(0.1)  # a process that just exited may still hold a file open
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextmanager
def loop_mount(
    workdir: Path, fstype: str = "btrfs", size: str = "512M", mount_options: str = "", mkfs_args: tuple = ()
) -> Iterator[Path]:
    """Make ``workdir/<fstype>.img`` (sparse), mkfs it and mount it on ``workdir/mnt``; yields the mount point."""
    workdir.mkdir(parents=True, exist_ok=True)
    image, mnt = workdir / f"{fstype}.img", workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run([*MKFS[fstype], *mkfs_args, str(image)], check=True, capture_output=True)
    opts = "loop" + (f",{mount_options}" if mount_options else "")
    try:
        subprocess.run(["mount", "-o", opts, str(image), str(mnt)], check=True, capture_output=True, text=True)
        yield mnt
    finally:
        if os.path.ismount(mnt):
            _unmount(mnt)
        for dev in _attached(image):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        image.unlink(missing_ok=True)


def volume_root(mnt: Path, name: str = "vol") -> Path:
    """A layout-3 volume root directory inside the mounted filesystem."""
    root = mnt / name
    root.mkdir(exist_ok=True)
    (root / "version.txt").write_text("3\n")
    return root
