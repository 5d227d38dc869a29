"""Exceptions raised by backends; the agent's one error mapper turns them into HTTP answers."""

from __future__ import annotations

import asyncio


class BackendError(Exception):
    """Base of every error a backend raises on purpose. ``str()`` is the user-facing message."""


class InvalidPath(BackendError):
    """A path from a request is malformed or would leave its vfolder."""

    def __init__(self, relpath: str, reason: str) -> None:
        super().__init__(f"invalid path {relpath!r}: {reason}")
        self.relpath = relpath


class VFolderNotFound(BackendError):
    pass


class VFolderExists(BackendError):
    pass


class QuotaScopeNotFound(BackendError):
    pass


class QuotaScopeNotEmpty(BackendError):
    pass


class NotEnoughSpace(BackendError):
    pass


class QuotaExceeded(BackendError):
    """A write hit a quota scope's limit (EDQUOT)."""

    @classmethod
    def at_limit(cls, volume: str, qsid: str, what: str) -> QuotaExceeded:
        """The one wording of a full scope: the manager's user sees which scope and what was refused."""
        return cls(f"quota scope {qsid!r} on volume {volume!r} is at its limit: cannot {what}")


class UnsupportedOperation(BackendError):
    pass


class VolumeUnavailable(BackendError):
    pass


class ExternalError(BackendError):
    """An external command or appliance failed; the message names it and the operation."""


class FileOpError(BackendError):
    """A filesystem error on a file operation, with paths relative to the vfolder."""

    def __init__(self, errno: int, strerror: str, paths: list[str]) -> None:
        super().__init__(strerror)
        self.errno = errno
        self.strerror = strerror
        self.paths = paths


class StagingLost(BackendError):
    """An operation's directory in the staging area was removed or replaced under it; nothing was published."""


class Busy(BackendError):
    """Another lifecycle operation holds the vfolder or quota scope for longer than a request waits."""


class CloneCancelled(asyncio.CancelledError):
    """A clone's awaiter was cancelled and its copy stopped: ``published`` says whether the copy had already
    been put in place (then it stays, and the caller records it) or never will be (its staged copy removed)."""

    def __init__(self, published: bool) -> None:
        super().__init__("the clone was cancelled" + (" after it was published" if published else ""))
        self.published = published
