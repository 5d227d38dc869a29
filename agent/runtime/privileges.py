"""``[storage-proxy] user`` / ``group``: started as root, the agent becomes that user after binding its ports.

Upstream switches uid/gid (and the user's supplementary groups) once its listeners are bound, when it
runs as root, and keeps no capability. This agent needs a few after the switch — the same set the
packaged systemd unit grants a non-root agent: vfolder contents belong to the containers' uids, so
deleting, cloning and chown-ing them needs ``CAP_CHOWN``, ``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``
(also the fanotify watcher's ``open_by_handle_at``), ``CAP_FOWNER`` and ``CAP_FSETID``; and
``CAP_SYS_ADMIN`` only when the config uses something that needs it (fanotify, the FUSE view, xfs/btrfs
kernel quotas). Those are kept across the switch (``PR_SET_KEEPCAPS`` then ``capset``) and raised as
ambient capabilities so that the processes the agent starts (the view, ``xfs_quota``, ``btrfs``) get
them too; every other capability leaves the bounding set. One the process does not hold (a container
without ``CAP_SYS_ADMIN``) is simply not kept, with a warning naming what then falls back
(fanotify -> inotify) or fails. Capabilities are per thread, so the switch happens while the process
still has one thread: :func:`drop` refuses otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import pwd
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID = 0, 1, 2, 3, 4
CAP_SYS_ADMIN = 21
NAMES = {
    CAP_CHOWN: "CAP_CHOWN", CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE", CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
    CAP_FOWNER: "CAP_FOWNER", CAP_FSETID: "CAP_FSETID", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
}
BASE = frozenset({CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID})
# what goes wrong without each one, for the warning when it cannot be kept
WITHOUT = {
    CAP_CHOWN: "uploads and clones cannot give files their owners",
    CAP_DAC_OVERRIDE: "files of the containers' users that this user may not write cannot be changed or removed",
    CAP_DAC_READ_SEARCH: "trees this user may not read cannot be measured or copied; fanotify cannot be used",
    CAP_FOWNER: "modes and times of other users' files cannot be set",
    CAP_FSETID: "set-id bits are cleared on files the agent writes",
    CAP_SYS_ADMIN: "the fanotify watcher falls back to inotify, the FUSE view cannot mount, "
    "xfs/btrfs quotas cannot be set",
}

PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_CAP_AMBIENT = 8, 24, 47
PR_CAP_AMBIENT_RAISE = 2
_CAP_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    rc = _libc.prctl(option, arg2, arg3, 0, 0)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def _mask(caps: Iterable[int]) -> tuple[int, int]:
    bits = sum(1 << c for c in caps)
    return bits & 0xFFFFFFFF, bits >> 32


def permitted() -> frozenset[int]:
    """The calling thread's permitted capabilities."""
    header, data = _Header(_CAP_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    bits = data[0].permitted | (data[1].permitted << 32)
    return frozenset(c for c in range(64) if bits >> c & 1)


def _capset(caps: Iterable[int]) -> None:
    low, high = _mask(caps)
    header, data = _Header(_CAP_VERSION_3, 0), (_Data * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = low
    data[1].effective = data[1].permitted = data[1].inheritable = high
    if _libc.capset(ctypes.byref(header), data) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


@dataclass(frozen=True)
class Dropped:
    uid: int
    gid: int
    groups: list[int]
    kept: frozenset[int]
    ambient: bool


def wanted(config: object) -> frozenset[int]:
    """The capabilities this config's features need after the switch (see the module docstring)."""
    from agent.config import Config

    assert isinstance(config, Config)
    admin = (
        config.view.enabled
        or (config.usage.enabled and config.usage.watcher in ("auto", "fanotify"))
        or any(v.backend in ("xfs", "btrfs") for v in config.volume.values())
    )
    return BASE | {CAP_SYS_ADMIN} if admin else BASE


def _groups_of(uid: int, gid: int) -> list[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return [gid]  # a uid without a passwd entry: no supplementary groups to look up
    return sorted(set(os.getgrouplist(name, gid)))


def drop(uid: int | None, gid: int | None, keep: frozenset[int], handover: Iterable[Path] = ()) -> Dropped | None:
    """Switch to ``uid``/``gid`` keeping ``keep`` (those the process holds). None when not root (upstream
    also switches only as root) or nothing is set. ``handover``: files the agent opened as root and keeps
    writing (the log file), given to the new owner first."""
    if os.geteuid() != 0 or (uid is None and gid is None):
        return None
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("the privilege drop must happen before any thread starts (capabilities are per thread)")
    if uid is None:
        uid = 0
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = os.getgid()
    held = permitted()
    keep = keep & held if uid != 0 else held
    for path in handover:
        try:
            os.chown(path, uid, gid)
        except OSError as e:
            log.warning("cannot give %s to uid %d: %s", path, uid, e.strerror)
    for cap in range(_last_cap() + 1):
        if cap not in keep:
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError:
                break  # no CAP_SETPCAP (a container): the bounding set stays as it was
    groups = _groups_of(uid, gid)
    prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_KEEPCAPS, 0)
    _capset(keep)
    ambient = True
    for cap in sorted(keep):
        try:
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
        except OSError:
            ambient = False  # kernel before 4.3: commands the agent starts run without capabilities
    return Dropped(uid, gid, groups, keep, ambient)


def apply(config: object, handover: Iterable[Path] = ()) -> Dropped | None:
    """:func:`drop` for ``[storage-proxy] user``/``group``, logging what was done and what is missing."""
    from agent.config import Config

    assert isinstance(config, Config)
    sp = config.storage_proxy
    if os.geteuid() != 0:
        if sp.user not in (None, os.geteuid()) or sp.group not in (None, os.getegid()):
            log.info("[storage-proxy] user/group not applied: the agent was not started as root (uid %d)",
                     os.geteuid())
        return None
    want = wanted(config)
    held = permitted()
    done = drop(sp.user, sp.group, want, handover)
    if done is None:
        return None
    log.info(
        "running as uid %d, gid %d (groups %s), keeping %s", done.uid, done.gid,
        ",".join(map(str, done.groups)), " ".join(NAMES.get(c, str(c)) for c in sorted(done.kept)) or "nothing",
    )
    for cap in sorted(want - held):
        log.warning("%s is not held by the process and cannot be kept: %s", NAMES[cap], WITHOUT[cap])
    if not done.ambient:
        log.warning("ambient capabilities are not supported by this kernel: commands the agent starts "
                    "(the FUSE view, xfs_quota, btrfs) run without capabilities")
    return done
