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
from backends.copytree import CancelFlag, CopyCancelled, DestinationLost, copy_tree, count_entries
from backends.errors import (
    CloneCancelled,
    FileOpError,
    NotEnoughSpace,
    QuotaExceeded,
    QuotaScopeNotEmpty,
    QuotaScopeNotFound,
    StagingLost,
    VFolderExists,
    VFolderNotFound,
)
from backends.ids import VFolderID, is_hex_part, parse_folder_id, parse_qsid
from backends.layout import LAYOUT_VERSION, read_version
from backends.resolver import VFolderRoot, rename_noreplace
from backends.rmtree import remove_tree, remove_tree_at
from backends.settle import through_cancel
from backends.walk import TreeUsage, tree_usage

RETRIES = 50  # a mkdir undone by a concurrent cleanup of an emptied directory is tried again this often
CANCEL_WAIT = 30.0  # seconds a cancelled clone waits for its copy thread to stop and remove its staged copy
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

    async def delete_vfolder(self, vfid: VFolderID, *, work: str | None = None) -> None:
        await asyncio.to_thread(self._delete_vfolder, vfid, work)

    def _delete_vfolder(self, vfid: VFolderID, work: str | None = None) -> None:
        """Move the tree aside atomically (so no half-deleted folder is ever visible), then remove it.

        Once the tree is in the staging area the delete has happened: an agent killed before the removal
        finishes it at start-up (reconcile sweeps ``.staging``). "Not found" is only believed when the
        vfolder itself is gone, never when the staging directory was (another delete emptied it).
        """
        path = self.vfolder_path(vfid)
        if not os.path.lexists(path):
            raise VFolderNotFound(f"vfolder {vfid} does not exist on volume {self.name!r}")
        staging = self.staging_path(vfid.qsid)
        trash = staging / (work or f"trash-{uuid.uuid4().hex}")
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

    async def clone_vfolder(self, src: VFolderID, dst: VFolderID, *, work: str | None = None) -> None:
        """``work``: the name of the clone's directory in the scope's staging area (the caller records it with
        its job, so the leftovers of a process that died mid-copy can be found; default: a new one).

        Cancelled (a client gone, a stop that outwaited its grace period), it stops the copy thread and
        raises CloneCancelled saying whether the copy had already been published: a thread left running would
        publish a folder its caller has already recorded as failed."""
        cancel = CancelFlag()
        copy = asyncio.ensure_future(asyncio.to_thread(self._clone_vfolder, src, dst, work, cancel))
        try:
            await asyncio.shield(copy)
        except asyncio.CancelledError:
            published = cancel.cancel()
            try:  # the thread removes its staged copy (or was done); its error is no news to anyone now
                await through_cancel(copy, CANCEL_WAIT, f"the cancelled clone of {src} to {dst}")
            except Exception:
                pass
            raise CloneCancelled(published) from None

    def _clone_vfolder(
        self, src: VFolderID, dst: VFolderID, work_name: str | None = None, cancel: CancelFlag | None = None
    ) -> None:
        cancel = cancel or CancelFlag()
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
            work = staging / (work_name or f"clone-{uuid.uuid4().hex}")
            lost = StagingLost(
                f"the clone of {src} to {dst} was interrupted: its staging directory {dst.qsid}/{STAGING}/{work.name} "
                "was removed or replaced while the copy ran (another process cleaned it up); nothing was "
                "published, clone again"
            )
            held: _Staged | None = None
            made = False
            try:
                self._staging_entry(dst.qsid, work.name)
                made = True
                held = _Staged.hold(staging, work.name, lost)
                src_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root.fd)
                try:
                    with cpu_placement.widened():  # the copy is kernel work: off the agent's pinned CPU
                        copied = copy_tree(src_fd, held.fd, cancel=cancel)
                finally:
                    os.close(src_fd)
                held.check(copied)
                for _ in range(RETRIES):
                    self._make_prefix(dst)
                    try:
                        with cancel.publishing():  # a cancel from here on waits for the rename and is told of it
                            held.publish(dst_path)
                        break
                    except FileNotFoundError:  # the prefix went (a delete in the same aa/bb): again
                        held.check()
                else:
                    raise OSError(errno.ENOENT, "the vfolder's prefix directory keeps disappearing", str(dst_path))
            except DestinationLost:
                _discard(held, work if made else None)
                raise lost from None
            except FileExistsError:
                _discard(held, work if made else None)
                raise VFolderExists(f"destination vfolder {dst} already exists on volume {self.name!r}") from None
            except OSError as e:
                taken = held is not None and not held.intact()  # looked at before our own removal below
                _discard(held, work if made else None)
                _rmdir_if_empty(dst_path.parent)
                _rmdir_if_empty(dst_path.parent.parent)
                if taken:
                    raise lost from None
                if e.errno == errno.EDQUOT:
                    raise QuotaExceeded(f"quota of scope {dst.qsid!r} exceeded while cloning {src}") from None
                if e.errno == errno.ENOSPC:
                    raise NotEnoughSpace(f"volume {self.name!r} ran out of space while cloning {src}") from None
                raise FileOpError(e.errno or errno.EIO, e.strerror or str(e), []) from None
            except CopyCancelled:  # the awaiter gave up: nothing published, nothing of the copy left
                _discard(held, work if made else None)
                _rmdir_if_empty(dst_path.parent)
                _rmdir_if_empty(dst_path.parent.parent)
                raise
            except BaseException:  # e.g. the destination scope was removed meanwhile, or StagingLost
                _discard(held, work if made else None)
                raise
            finally:
                if held is not None:
                    held.close()
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


class _Staged:
    """A clone's directory in the staging area, held by descriptors from its creation to its publication.

    Someone else may remove or replace it while the copy runs (a start-up reconciliation of another
    process, an operator cleaning ``.staging``): the copy then goes into a removed directory, or the name
    comes to mean another tree. Before the publishing rename the directory found under the name must
    still be the one made (same device and inode, still linked, in the same staging directory) and hold
    exactly what the copy wrote; after it, the published name must be that same directory."""

    def __init__(self, parent: int, name: str, fd: int, lost: StagingLost) -> None:
        self.parent, self.name, self.fd, self.lost = parent, name, fd, lost
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)

    @classmethod
    def hold(cls, staging: Path, name: str, lost: StagingLost) -> _Staged:
        parent = os.open(staging, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            os.close(parent)
            raise lost from None
        except BaseException:
            os.close(parent)
            raise
        return cls(parent, name, fd, lost)

    def _at(self, dir_fd: int, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def intact(self) -> bool:
        return os.fstat(self.fd).st_nlink > 0 and self._at(self.parent, self.name) == self.ident

    def check(self, copied: int | None = None) -> None:
        """StagingLost unless the directory is still in place (and holds the ``copied`` entries)."""
        if not self.intact() or (copied is not None and count_entries(self.fd) != copied):
            raise self.lost

    def publish(self, dst: Path) -> None:
        """Move it into place with one rename that never replaces an existing directory."""
        dfd = os.open(dst.parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.check()
            rename_noreplace(self.parent, self.name, dfd, dst.name)
            if self._at(dfd, dst.name) != self.ident:  # replaced in the instant between the check and the rename
                rename_noreplace(dfd, dst.name, self.parent, self.name)  # what was published goes back
                raise self.lost
        finally:
            os.close(dfd)

    def discard(self) -> None:
        """Remove the copy: under its name when that is still it, else only its contents (by descriptor)."""
        if self._at(self.parent, self.name) == self.ident:
            remove_tree_at(self.parent, self.name)
            return
        fresh = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)  # see count_entries
        try:
            with os.scandir(fresh) as it:
                names = [e.name for e in it]
        finally:
            os.close(fresh)
        for name in names:
            remove_tree_at(self.fd, name)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.parent)


def _discard(held: _Staged | None, made: Path | None) -> None:
    """Remove a failed clone's staged copy (never a tree someone else put under its name); ``made``: the
    directory made but not held (its open failed)."""
    try:
        if held is not None:
            held.discard()
        elif made is not None:
            remove_tree(made)
    except OSError:
        pass


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
