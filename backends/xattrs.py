"""The one xattr adapter: CephFS's virtual ``ceph.*`` attributes, by name.

On a CephFS mount the names are used as they are. With ``prefix="user."``
every ``ceph.<x>`` name maps to ``user.ceph.<x>`` on an ordinary filesystem,
so tests (and a dry run) can exercise the cephfs backend against real
directories whose attributes a test plays the MDS for. Values are ASCII
decimal, as CephFS writes them.
"""

from __future__ import annotations

import errno
import os

PREFIXES = ("", "user.")


class XattrAdapter:
    def __init__(self, prefix: str = "") -> None:
        if prefix not in PREFIXES:
            raise ValueError(f"xattr prefix must be one of {PREFIXES}, got {prefix!r}")
        self.prefix = prefix

    def name(self, name: str) -> str:
        return self.prefix + name

    def get(self, path: str | os.PathLike[str], name: str) -> str | None:
        """The attribute's value, or None when it is not set (ENODATA)."""
        try:
            return os.getxattr(path, self.name(name), follow_symlinks=False).decode("ascii").strip("\0").strip()
        except OSError as e:
            if e.errno == errno.ENODATA:
                return None
            raise

    def get_int(self, path: str | os.PathLike[str], name: str) -> int | None:
        value = self.get(path, name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise OSError(errno.EINVAL, f"xattr {self.name(name)} of {path} is not a number: {value!r}") from None

    def set(self, path: str | os.PathLike[str], name: str, value: int | str) -> None:
        os.setxattr(path, self.name(name), str(value).encode("ascii"), follow_symlinks=False)
