"""A mounted volume whose quota scopes the kernel enforces (btrfs qgroups, XFS project quotas, CephFS quotas).

A scope at its limit refuses every allocation with EDQUOT: mkdir, create and
even rename (btrfs reserves metadata for it). So the shared file-operation
model needs two things here: an EDQUOT anywhere in create/clone becomes a
4xx naming the scope (never a 500), and deleting a vfolder from a full scope
still works, because it is the only way out of a full scope: when the vfolder
cannot be moved into the staging area first, it is removed in place.
"""

from __future__ import annotations

import errno
import logging

from backends.copytree import CancelFlag
from backends.errors import QuotaExceeded
from backends.ids import VFolderID
from backends.mounted import MountedVolume, _rmdir_if_empty
from backends.rmtree import remove_tree

log = logging.getLogger(__name__)


class QuotaScopedVolume(MountedVolume):
    def _full(self, qsid: str, what: str) -> QuotaExceeded:
        return QuotaExceeded.at_limit(self.name, qsid, what)

    def _create_vfolder(self, vfid: VFolderID) -> None:
        try:
            super()._create_vfolder(vfid)
        except OSError as e:
            if e.errno != errno.EDQUOT:
                raise
            path = self.vfolder_path(vfid)
            _rmdir_if_empty(path.parent)
            _rmdir_if_empty(path.parent.parent)
            raise self._full(vfid.qsid, f"create vfolder {vfid}") from None

    def _clone_vfolder(
        self, src: VFolderID, dst: VFolderID, work_name: str | None = None, cancel: CancelFlag | None = None
    ) -> None:
        try:
            super()._clone_vfolder(src, dst, work_name, cancel)
        except OSError as e:  # EDQUOT before the copy started (making the staging directory)
            if e.errno != errno.EDQUOT:
                raise
            _rmdir_if_empty(self.staging_path(dst.qsid))
            raise QuotaExceeded(f"quota of scope {dst.qsid!r} exceeded while cloning {src}") from None

    def _delete_vfolder(self, vfid: VFolderID, work: str | None = None) -> None:
        try:
            super()._delete_vfolder(vfid, work)
        except OSError as e:
            if e.errno != errno.EDQUOT:
                raise
            path = self.vfolder_path(vfid)
            log.warning("quota scope %s is full: removing vfolder %s in place", vfid.qsid, vfid)
            _rmdir_if_empty(self.staging_path(vfid.qsid))
            remove_tree(path)  # by descriptors; never follows a symlink
            _rmdir_if_empty(path.parent)
            _rmdir_if_empty(path.parent.parent)
