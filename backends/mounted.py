"""A volume whose data is a mounted filesystem: the file-operation model shared by all backends.

vfs uses it as is; btrfs, xfs, cephfs and the vendor appliances add their own
quota model on top. Blocking work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from pathlib import Path

from backends import cpu_placement
from backends.base import FSUsage, HwInfo, Volume
from backends.copytree import copy_tree
from backends.errors import (
    FileOpError,
    NotEnoughSpace,
    QuotaExceeded,
    QuotaScopeNotEmpty,
    QuotaScopeNotFound,
    VFolderExists,
    VFolderNotFound,
)
from backends.ids import VFolderID, is_hex_part, parse_folder_id, parse_qsid
from backends.layout import LAYOUT_VERSION, read_version
from backends.resolver import VFolderRoot, rename_noreplace
from backends.rmtree import remove_tree
from backends.walk import TreeUsage, tree_usage

RETRIES = 50  # a mkdir undone by a concurrent cleanup of an emptied directory is tried again this often
STAGING = ".staging"  # per quota scope: same filesystem (and subvolume) as its vfolders, outside every vfolder


def _mkdir_racy(path: Path, mode: int = 0o755) -> None:
    """mkdir that tolerates the directory existing -- unlike ``Path.mkdir(exist_ok=True)``, which raises
    FileExistsError when a concurrent cleanup removes it between the mkdir and its own is_dir check. The
    caller's next step meets FileNotFoundError if it went meanwhile, and retries."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


class MountedVolume(Volume):
    """Vfolders are directories ``<root>/<qsid>/aa/bb/rest`` on a local or network mount."""

    def layout_version(self) -> int | None:
        return read_version(self.root)

    def scope_path(self, qsid: str) -> Path:
        return self.root / qsid

    def require_scope(self, qsid: str) -> Path:
        """The scope's directory, or QuotaScopeNotFound naming it."""
        path = self.scope_path(qsid)
        if not path.is_dir():
            raise QuotaScopeNotFound(f"quota scope {qsid!r} does not exist on volume {self.name!r}")
        return path

    def prepare_scope_removal(self, qsid: str) -> Path:
        """Refuse to remove a scope that holds vfolders or work in progress; drop an empty staging dir.

        Every backend's quota model calls this before removing the scope's directory (or subvolume).
        """
        path = self.require_scope(qsid)
        if any(name != STAGING for name in os.listdir(path)):
            raise QuotaScopeNotEmpty(f"quota scope {qsid!r} still holds vfolders; delete them first")
        try:
            os.rmdir(path / STAGING)
        except FileNotFoundError:
            pass
        except OSError:
            raise QuotaScopeNotEmpty(f"quota scope {qsid!r} has work in progress (uploads or clones)") from None
        return path

    def staging_path(self, qsid: str) -> Path:
        return self.root / qsid / STAGING

    def vfolder_path(self, vfid: VFolderID) -> Path:
        return self.root / vfid.relpath

    def open_vfolder(self, vfid: VFolderID) -> VFolderRoot:
        try:
            return VFolderRoot.at(str(self.root), vfid.relpath)
        except (FileNotFoundError, NotADirectoryError):
            raise VFolderNotFound(f"vfolder {vfid} does not exist on volume {self.name!r}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise VFolderNotFound(f"vfolder {vfid} on volume {self.name!r} is not a plain directory") from None
            raise

    # -- vfolders --------------------------------------------------------------

    async def create_vfolder(self, vfid: VFolderID) -> None:
        await asyncio.to_thread(self._create_vfolder, vfid)

    def _create_vfolder(self, vfid: VFolderID) -> None:
        path = self.vfolder_path(vfid)
        if os.path.lexists(path):
            raise VFolderExists(f"vfolder {vfid} already exists on volume {self.name!r}")
        for _ in range(RETRIES):
            self._make_prefix(vfid)
            try:
                path.mkdir(mode=0o755)
                return
            except FileExistsError:  # a concurrent create won the race
                raise VFolderExists(f"vfolder {vfid} already exists on volume {self.name!r}") from None
            except FileNotFoundError:  # a delete in the same aa/bb removed the emptied prefix meanwhile
                continue
        raise OSError(errno.ENOENT, "the vfolder's prefix directory keeps disappearing", str(path.parent))

    def _make_prefix(self, vfid: VFolderID) -> None:
        """Make ``<qsid>/aa/bb`` (never the scope's own directory: a removed scope stays removed).

        Another vfolder's delete removes these directories once empty, so a caller retries its next step
        when it meets FileNotFoundError."""
        scope = self.scope_path(vfid.qsid)
        bb = self.vfolder_path(vfid).parent
        for d in (bb.parent, bb):
            try:
                _mkdir_racy(d)
            except FileNotFoundError:
                if not scope.is_dir():
                    raise QuotaScopeNotFound(
                        f"quota scope {vfid.qsid!r} does not exist on volume {self.name!r}"
                    ) from None
                return  # `aa` went between the two mkdirs: the caller's next step fails and retries

    def _staging_entry(self, qsid: str, name: str) -> Path:
        """Make ``<qsid>/.staging/<name>`` (a private directory); retried when a concurrent operation removed
        the emptied staging directory between its mkdir and ours."""
        staging = self.staging_path(qsid)
        for _ in range(RETRIES):
            _mkdir_racy(staging, 0o700)
            try:
                (staging / name).mkdir(mode=0o700)
                return staging / name
            except FileNotFoundError:
                continue
        raise OSError(errno.ENOENT, "the staging directory keeps disappearing", str(staging))

    async def delete_vfolder(self, vfid: VFolderID) -> None:
        await asyncio.to_thread(self._delete_vfolder, vfid)

    def _delete_vfolder(self, vfid: VFolderID) -> None:
        """Move the tree aside atomically (so no half-deleted folder is ever visible), then remove it.

        Once the tree is in the staging area the delete has happened: an agent killed before the removal
        finishes it at start-up (reconcile sweeps ``.staging``). "Not found" is only believed when the
        vfolder itself is gone, never when the staging directory was (another delete emptied it).
        """
        path = self.vfolder_path(vfid)
        if not os.path.lexists(path):
            raise VFolderNotFound(f"vfolder {vfid} does not exist on volume {self.name!r}")
        staging = self.staging_path(vfid.qsid)
        trash = staging / f"trash-{uuid.uuid4().hex}"
        for _ in range(RETRIES):
            _mkdir_racy(staging, 0o700)
            try:
                os.rename(path, trash)
                break
            except FileNotFoundError:
                if not os.path.lexists(path):  # a concurrent delete won the race
                    _rmdir_if_empty(staging)
                    raise VFolderNotFound(f"vfolder {vfid} does not exist on volume {self.name!r}") from None
                # the staging directory was removed between our mkdir and the rename: again
        else:
            raise OSError(errno.ENOENT, "the staging directory keeps disappearing", str(staging))
        _rmdir_if_empty(path.parent)
        _rmdir_if_empty(path.parent.parent)
        with cpu_placement.widened():  # a big tree's unlinks are kernel work: off the agent's pinned CPU
            remove_tree(trash, ignore_errors=True)
        _rmdir_if_empty(staging)

    async def clone_vfolder(self, src: VFolderID, dst: VFolderID) -> None:
        await asyncio.to_thread(self._clone_vfolder, src, dst)

    def _clone_vfolder(self, src: VFolderID, dst: VFolderID) -> None:
        dst_path = self.vfolder_path(dst)
        if os.path.lexists(dst_path):
            raise VFolderExists(f"destination vfolder {dst} already exists on volume {self.name!r}")
        if not self.scope_path(dst.qsid).is_dir():
            raise QuotaScopeNotFound(f"quota scope {dst.qsid!r} does not exist on volume {self.name!r}")
        with self.open_vfolder(src) as root:
            try:
                need = self.clone_space_needed(src)
            except (FileNotFoundError, NotADirectoryError):  # the source went while it was measured
                raise VFolderNotFound(f"vfolder {src} does not exist on volume {self.name!r}") from None
            st = os.statvfs(self.scope_path(dst.qsid))
            free = st.f_bavail * st.f_frsize
            if need > free:
                raise NotEnoughSpace(
                    f"not enough free space on volume {self.name!r} to clone {src}: "
                    f"needs {need} bytes, {free} available"
                )
            staging = self.staging_path(dst.qsid)
            work = staging / f"clone-{uuid.uuid4().hex}"
            try:
                self._staging_entry(dst.qsid, work.name)
                src_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root.fd)
                dst_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    with cpu_placement.widened():  # the copy is kernel work: off the agent's pinned CPU
                        copy_tree(src_fd, dst_fd)
                finally:
                    os.close(src_fd)
                    os.close(dst_fd)
                for _ in range(RETRIES):
                    self._make_prefix(dst)
                    try:
                        _publish(work, dst_path)
                        break
                    except FileNotFoundError:  # the prefix went (a delete in the same aa/bb): again
                        if not work.is_dir():
                            raise
                else:
                    raise OSError(errno.ENOENT, "the vfolder's prefix directory keeps disappearing", str(dst_path))
            except FileExistsError:
                remove_tree(work, ignore_errors=True)
                raise VFolderExists(f"destination vfolder {dst} already exists on volume {self.name!r}") from None
            except OSError as e:
                remove_tree(work, ignore_errors=True)
                _rmdir_if_empty(dst_path.parent)
                _rmdir_if_empty(dst_path.parent.parent)
                if e.errno == errno.EDQUOT:
                    raise QuotaExceeded(f"quota of scope {dst.qsid!r} exceeded while cloning {src}") from None
                if e.errno == errno.ENOSPC:
                    raise NotEnoughSpace(f"volume {self.name!r} ran out of space while cloning {src}") from None
                raise FileOpError(e.errno or errno.EIO, e.strerror or str(e), []) from None
            except BaseException:  # e.g. the destination scope was removed meanwhile
                remove_tree(work, ignore_errors=True)
                raise
            finally:
                _rmdir_if_empty(staging)

    def clone_space_needed(self, src: VFolderID) -> int:
        """Free bytes a clone of ``src`` needs on the volume (blocking). Reflink filesystems need almost none."""
        return tree_usage(self.vfolder_path(src)).allocated_bytes

    async def tree_usage(self, vfid: VFolderID) -> TreeUsage:
        path = self.vfolder_path(vfid)
        with self.open_vfolder(vfid):
            pass
        return await asyncio.to_thread(tree_usage, path)

    # -- volume-wide -----------------------------------------------------------

    async def fs_usage(self) -> FSUsage:
        st = await asyncio.to_thread(os.statvfs, self.root)
        return FSUsage(st.f_frsize * st.f_blocks, st.f_frsize * (st.f_blocks - st.f_bavail))

    async def hwinfo(self) -> HwInfo:
        meta = {"backend": self.backend, "path": str(self.root)}
        try:  # both reads in one worker thread: a hung mount never blocks the event loop
            st, version = await asyncio.to_thread(lambda: (os.statvfs(self.root), self.layout_version()))
        except OSError as e:
            return HwInfo("unavailable", f"volume root {self.root} is not accessible: {e.strerror}", meta)
        meta["layout_version"] = str(version) if version is not None else "none"
        if version != LAYOUT_VERSION:
            return HwInfo(
                "unavailable",
                f"volume root {self.root} has no layout-3 version.txt and needs migration "
                f"(storage-agent migrate --volume {self.name})",
                meta,
            )
        if st.f_flag & os.ST_RDONLY:
            return HwInfo("degraded", f"volume root {self.root} is mounted read-only", meta)
        return HwInfo("healthy", None, meta)

    # -- reconciliation --------------------------------------------------------

    def scopes_on_disk(self) -> list[str]:
        found = []
        with os.scandir(self.root) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    try:
                        found.append(parse_qsid(e.name))
                    except ValueError:
                        continue
        return sorted(found)

    def vfolders_on_disk(self, qsid: str) -> list[VFolderID]:
        found = []
        base = self.scope_path(qsid)
        for a in _subdirs(base, 2):
            for b in _subdirs(base / a, 2):
                for rest in _subdirs(base / a / b, 28):
                    try:
                        found.append(VFolderID(qsid, parse_folder_id(a + b + rest)))
                    except ValueError:
                        continue
        return sorted(found, key=str)


def _publish(staged: Path, dst: Path) -> None:
    """Move a finished staging directory into place; never replaces an existing one."""
    sfd = os.open(staged.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        dfd = os.open(dst.parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            rename_noreplace(sfd, staged.name, dfd, dst.name)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _subdirs(path: Path, length: int) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [
                e.name
                for e in it
                if is_hex_part(e.name, length) and e.is_dir(follow_symlinks=False)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []
