"""The usage engine: figures kept right by watchers, deltas and scans; answers from memory + catalogue.

Every vfolder the agent serves has a :class:`VFState`: its per-directory tree (memory), the figure being
served (written through to the catalogue), the directories events have named since the last flush, and
its scan. Flow:

* first sight / overflow / schedule -> a full scan (bounded by ``scan-concurrency``, off the event loop,
  cancellable); it replaces the tree and every catalogue row of the vfolder at once;
* an event names a directory -> after ``coalesce`` seconds every named directory is re-read (one scandir +
  lstat per entry, in a worker thread), the delta applied to the tree, and all changed rows plus the new
  totals written in one transaction; a directory that appeared is scanned as a subtree, one that left is
  dropped with everything below it;
* events lost (queue overflow, no more watches) -> the vfolder is flagged stale and rescanned; the last
  figure is served with ``stale: true`` meanwhile;
* backends that know usage (``fast-size``) are polled instead;
* volumes other nodes write to (NFS, GPFS, FUSE, ...) are never watched: rescanned on a schedule
  (``policy.py`` chooses per volume; rescans read in the idle I/O class).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from agent.engine.usage.aggregates import DirAgg, VFolderTree, encode_links, join, split
from agent.engine.usage.policy import VolumePolicy, choose, settle_window
from agent.engine.usage.scanner import ScanCancelled, scan
from agent.engine.usage.watchers import Watcher, WatchLimit, pick_watcher
from backends.base import Volume
from backends.errors import VFolderNotFound
from backends.ids import VFolderID
from catalog.usage_store import DirRow, Totals, UsageStore, VFKey, VFolderChange

if TYPE_CHECKING:
    from agent.config import UsageConfig
    from agent.runtime.context import Agent

log = logging.getLogger(__name__)

SCAN_RETRY = 30  # seconds before a scan that failed unexpectedly is tried again
LINK_RECHECK = 1.0  # seconds between re-reads of outside-linked files in the engine process of num-proc = N
# Directories holding files written lately (their allocation may still change at writeback, with no event):
# re-read at each answer while a vfolder has at most ANSWER_CAP entries in them (an answer stays cheap),
# else every LINK_RECHECK seconds while at most LOOP_CAP; beyond, its answer is flagged ``pending`` until
# their windows pass (each directory is read once more then). Directories count as 64 entries at least.
SETTLE_ANSWER_CAP = 1_000
SETTLE_LOOP_CAP = 100_000


@dataclass(frozen=True)
class Usage:
    file_count: int
    used_bytes: int
    allocated_bytes: int
    measured_at: float
    source: str  # fast | watch | scan
    stale: bool
    pending: bool = False  # events for this vfolder are queued or being applied (the figure lags)


@dataclass(eq=False)
class VFState:
    key: VFKey
    vol: Volume
    vfid: VFolderID
    mode: str  # watch | fast | scan
    tree: VFolderTree | None = None
    figure: Usage | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: set[str] = field(default_factory=set)
    expect: dict[str, set[int]] = field(default_factory=dict)  # dirty relpath -> inodes the events named
    applying: bool = False  # a flush is re-reading this vfolder's directories
    deleted: set[str] = field(default_factory=set)  # relpaths of directories reported removed (not moved)
    departed: dict[int, str] = field(default_factory=dict)  # inode -> relpath of read directories moved out
    stayed: dict[str, int] = field(default_factory=dict)  # relpath -> moves of read directories seen to stay
    # relpath -> directories the watcher saw move away from there, not (yet) seen to land in the vfolder
    leaving: dict[str, int] = field(default_factory=dict)
    within: dict[str, int] = field(default_factory=dict)  # relpath -> moves from there seen to stay, unmatched
    recheck: set[str] = field(default_factory=set)  # directories that changed while the last full walk ran
    hunted: set[tuple[int, int]] = field(default_factory=set)  # new hard links the next scan places
    # relpath -> until when (wall clock) the allocation of files written there may still change with no
    # event (writeback: see ``policy.settle_window``); re-read until then, and once after
    settling: dict[str, float] = field(default_factory=dict)
    reads: int = 0  # re-reads of directories in flight (a flush, an answer's, the once-a-second loop's)
    # relpath -> when the read last applied began (kept while reads overlap: an older one must not win)
    applied_at: dict[str, float] = field(default_factory=dict)
    pending: dict[str, DirAgg | None] = field(default_factory=dict)  # rows to write at the next flush
    scan_task: asyncio.Task[None] | None = None
    scan_again: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    subtree_jobs: int = 0
    stale: bool = False
    incomplete_watches: bool = False
    gone: bool = False
    last_scan: float = 0.0
    written: Totals | None = None  # the totals last written to the catalogue (what other processes serve)

    @property
    def scanning(self) -> bool:
        return self.scan_task is not None and not self.scan_task.done()

    @property
    def lagging(self) -> bool:
        """Events for this vfolder are queued or being applied: its figure lags (``pending``)."""
        return bool(
            self.dirty or self.subtree_jobs or self.applying or self.departed or self.leaving or self.unsettled()
        )

    def settling_load(self) -> int:
        """Entries in the directories with files written lately (a bound, cut short past SETTLE_LOOP_CAP)."""
        if not self.settling or self.tree is None:
            return 0
        if len(self.settling) * 64 > SETTLE_LOOP_CAP:
            return len(self.settling) * 64
        dirs = self.tree.dirs
        return sum(max(64, agg.entries) for rel in self.settling if (agg := dirs.get(rel)) is not None)

    def unsettled(self) -> bool:
        """Too many entries written lately to re-read every second: their allocation may change at writeback
        with no event, so the figure is flagged ``pending`` until their windows pass."""
        return self.settling_load() > SETTLE_LOOP_CAP


@dataclass
class StartupRescan:
    """Progress of the rescan every vfolder gets at start-up (``/metrics``, ``status`` through a job)."""

    began: float = field(default_factory=time.time)
    pending: dict[str, set[VFKey]] = field(default_factory=dict)  # per volume
    total: dict[str, int] = field(default_factory=dict)
    done: int = 0
    jobs: dict[str, str] = field(default_factory=dict)  # volume -> catalogue job id, while it runs
    reported: dict[str, float] = field(default_factory=dict)
    registered: bool = False  # every vfolder known at start-up is in ``pending``

    def pending_count(self) -> int:
        return sum(len(p) for p in self.pending.values())


def _row(rel: str, agg: DirAgg) -> DirRow:
    return DirRow(rel, agg.ino, agg.entries, agg.size, agg.alloc, agg.own_alloc, encode_links(agg.links))


def _take(counts: dict[str, int], key: str) -> bool:
    """Take one from ``counts[key]``; False when there was none."""
    n = counts.get(key, 0)
    if n <= 0:
        return False
    if n == 1:
        del counts[key]
    else:
        counts[key] = n - 1
    return True


def _consistent(dirs: dict[str, DirAgg]) -> bool:
    """Whether a subtree's walk saw one tree: every subdirectory a directory listed was read, and is the
    inode its parent listed (a directory moved while it was walked breaks this)."""
    for rel, agg in dirs.items():
        for name, rec in agg.subdirs.items():
            child = dirs.get(join(rel, name))
            if child is None or child.ino != rec[0]:
                return False
    return True


class UsageEngine:
    """The ``usage-engine`` service (see :func:`agent.http.usage.factory`)."""

    name = "usage-engine"

    def __init__(self, agent: Agent, settings: UsageConfig) -> None:
        self.agent = agent
        self.settings = settings
        self.store = UsageStore(agent.catalog.db)
        self.watcher: Watcher | None = None
        self._vfs: dict[VFKey, VFState] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scan_slots = asyncio.Semaphore(settings.scan_concurrency)
        # first-sight scans (a caller is waiting) skip the queue of rescans, but are bounded too: many
        # never-seen vfolders asked for at once must not start as many parallel walks
        self._first_sight_slots = asyncio.Semaphore(settings.scan_concurrency)
        self._stopping = False
        self.overflows = 0  # watcher queue overflows seen (for /metrics)
        self.scans = 0  # full scans started (for /metrics)
        self.policies: dict[str, VolumePolicy] = {}  # per volume: how its figures are kept (policy.py)
        self._windows: dict[str, float] = {}  # per volume: policy.settle_window of its filesystem
        self.startup = StartupRescan()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.take_rescan_requests()  # every vfolder is scanned at start-up anyway
        dropped = await self.store.forget_orphans()
        if dropped:
            log.info("usage engine: dropped aggregates of %d vfolder(s) no longer known", dropped)
        self._choose_policies(watcher=True)
        roots = [str(v.root) for v in self._served_volumes() if self._wants_watch(v)]
        self.watcher = pick_watcher(self.settings.watcher, roots)
        self._choose_policies(watcher=self.watcher is not None, log_them=True)
        if self.watcher is not None:
            self._spawn(self.watcher.run(self))
        self._spawn(self._flush_loop())
        self._spawn(self._schedule_loop())
        self._spawn(self._recheck_loop(workers=self.agent.config.storage_proxy.num_proc > 1))
        for vol in self._served_volumes():
            last = await self.store.all_totals(vol.name)
            for row in await self.agent.catalog.vfolders(vol.name):
                if row.state != "ready":
                    continue
                vfid = VFolderID.parse(f"{row.qsid}/{row.folder_id}")
                st = self.register(vol, vfid, last=last.get((vol.name, row.qsid, row.folder_id)))
                if st.mode != "fast":
                    self.startup.pending.setdefault(vol.name, set()).add(st.key)
        self.startup.registered = True
        log.info("usage engine: %d vfolder(s) registered", len(self._vfs))
        await self._start_rescan_jobs()

    async def stop(self) -> None:
        self._stopping = True
        for st in self._vfs.values():
            st.cancel.set()
        await self._finish_rescan_jobs("the agent stopped before the start-up rescan ended")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._save_figures()
        if self.watcher is not None:
            self.watcher.close()

    async def _save_figures(self) -> None:
        """At a stop, the figures being served go to the catalogue: a flush cut short by the stop must not
        leave an older figure to be served (stale) after the restart. Only totals: the restart rescans."""
        changes = []
        for st in self._vfs.values():
            f = st.figure
            if f is not None and not st.gone and st.mode != "fast":
                totals = Totals(f.file_count, f.used_bytes, f.allocated_bytes, f.source, f.stale, f.measured_at)
                changes.append(VFolderChange(st.key, totals, [], []))
        try:
            await self.store.apply(changes)
        except Exception:
            log.exception("usage engine: saving the figures at stop failed")

    def _served_volumes(self) -> list[Volume]:
        return [
            v for n, v in self.agent.volumes.items() if self.agent.states.get(n) is None or self.agent.states[n].serving
        ]

    def _wants_watch(self, vol: Volume) -> bool:
        return self._policy(vol).mode == "watch"

    # -- per-volume policy (policy.py) and scan scheduling --------------------------------------------

    def _policy(self, vol: Volume) -> VolumePolicy:
        pol = self.policies.get(vol.name)
        if pol is None:
            pol = self.policies[vol.name] = choose(
                vol.capabilities, vol.root, vol.options, self.settings, watcher=self.watcher is not None
            )
        return pol

    def _choose_policies(self, *, watcher: bool, log_them: bool = False) -> None:
        for vol in self._served_volumes():
            pol = self.policies[vol.name] = choose(vol.capabilities, vol.root, vol.options, self.settings,
                                                   watcher=watcher)
            if log_them:
                log.info("usage engine: volume %s (%s) kept by %s: %s", vol.name, pol.fstype, pol.mode, pol.reason)

    def _rescan_interval(self, st: VFState) -> float | None:
        """Seconds between scheduled rescans of a vfolder (None: only on events and requests)."""
        pol = self._policy(st.vol)
        if pol.mode == "watch" and st.incomplete_watches and pol.rescan_interval is None:
            return self.settings.fallback_rescan_interval  # not every directory is watched
        return pol.rescan_interval

    def refresh(self, vol: Volume, vfid: VFolderID) -> VFState:
        """Rescan a vfolder now (``POST /folder/usage/refresh``): its figure is served flagged stale until
        the walk lands. Backends that know usage are asked again instead."""
        known = self._vfs.get((vol.name, vfid.qsid, vfid.hex))
        st = self.register(vol, vfid)
        if known is None or known.gone:
            return st  # first sight: registering it has started its scan
        if st.mode == "fast":
            self._spawn(self._poll_fast_once(st))
            return st
        self._mark_stale(st)
        self.request_scan(st, refresh=True)
        return st

    # -- requests from other processes: the mailbox (usage_vfolders.rescan_requested) ---------------------

    def requests_posted(self) -> None:
        """An HTTP worker posted to the mailbox through the engine's writer host (agent/engine/writer.py):
        take the requests now rather than at the next look."""
        if not self._stopping:
            self._spawn(self._take_requests())

    async def _take_requests(self) -> None:
        """Vfolders another process asked about (an HTTP worker: created, cloned, deleted, refresh; or
        ``storage-agent scan``): each is looked at again against the catalogue."""
        for key in await self.store.take_rescan_requests():
            try:
                await self._reconsider(key)
            except Exception:
                log.exception("usage engine: the request for %s/%s on %s failed", key[1], key[2], key[0])

    async def _reconsider(self, key: VFKey) -> None:
        """A vfolder the catalogue no longer holds is forgotten; one the engine does not keep yet is
        registered (scanned at once); one with a figure is rescanned, flagged stale meanwhile (as a
        refresh); one still being measured for the first time is left to that scan. A volume not served is
        looked at again first (as a request naming it does in the HTTP worker that posted this)."""
        vol = self.agent.volumes.get(key[0])
        if vol is None:
            return
        state = self.agent.states.get(key[0])
        if state is not None and not state.serving:
            state = await self.agent.checked_state(vol)
        if state is not None and not state.serving:
            return
        vfid = VFolderID.parse(f"{key[1]}/{key[2]}")
        row = await self.agent.catalog.get_vfolder(*key)
        st = self._vfs.get(key)
        if row is None:
            await self.unregister(vol, vfid)
        elif row.state != "ready":
            return
        elif st is None or st.gone:
            self.register(vol, vfid, fresh=True)
        elif st.figure is not None:
            log.debug("usage engine: rescan of %s requested", vfid)
            self.refresh(vol, vfid)

    async def _poll_fast_once(self, st: VFState) -> None:
        try:
            tree = await st.vol.fast_usage(st.vfid)
        except Exception:
            log.exception("usage engine: %s could not report usage of %s", st.vol.name, st.vfid)
            return
        if tree is not None:
            now = time.time()
            st.figure = Usage(tree.entries, tree.size_bytes, tree.allocated_bytes, now, "fast", False)
            st.written = Totals(tree.entries, tree.size_bytes, tree.allocated_bytes, "fast", False, now)
            await self.store.put_totals(st.key, st.written)

    async def _startup_delay(self, st: VFState) -> None:
        """A start-up rescan of a vfolder whose last figure is being served waits ``startup-rescan-delay``."""
        delay = self.settings.startup_rescan_delay
        pending = self.startup.pending.get(st.vol.name, ())
        if delay and st.figure is not None and (st.key in pending or not self.startup.registered):
            await asyncio.sleep(max(0.0, self.startup.began + delay - time.time()))

    def _startup_progress(self, st: VFState) -> None:
        """A vfolder's start-up rescan landed (or it is gone): count it, and update the volume's job."""
        pending = self.startup.pending.get(st.vol.name)
        if pending is None or st.key not in pending or not (st.gone or st.last_scan >= self.startup.began):
            return
        pending.discard(st.key)
        self.startup.done += 1
        job = self.startup.jobs.get(st.vol.name)
        if job is None:
            return
        if not pending:
            del self.startup.jobs[st.vol.name]
            self._spawn(self.agent.catalog.finish_job(job))
            log.info("usage engine: start-up rescan of volume %s done", st.vol.name)
        elif time.monotonic() - self.startup.reported.get(st.vol.name, 0.0) >= 1.0:
            self.startup.reported[st.vol.name] = time.monotonic()
            total = self.startup.total.get(st.vol.name, 0)
            self._spawn(self.agent.catalog.update_job(job, done=total - len(pending)))

    async def _start_rescan_jobs(self) -> None:
        """The start-up rescan of each volume is a job in the catalogue: ``storage-agent status`` lists it
        with its progress while it runs."""
        for name, pending in self.startup.pending.items():
            self.startup.total[name] = len(pending)
            if pending:
                self.startup.jobs[name] = await self.agent.catalog.start_job(
                    "usage-rescan", name, {}, total=len(pending)
                )
                self.startup.reported[name] = time.monotonic()
        for st in list(self._vfs.values()):
            self._startup_progress(st)  # scans that landed while the jobs were being written

    async def _finish_rescan_jobs(self, error: str) -> None:
        for job in self.startup.jobs.values():
            with contextlib.suppress(Exception):
                await self.agent.catalog.finish_job(job, error=error)
        self.startup.jobs.clear()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- registration ------------------------------------------------------------------------------

    def register(self, vol: Volume, vfid: VFolderID, *, last: Totals | None = None, fresh: bool = False) -> VFState:
        """Start keeping a vfolder's figure (idempotent)."""
        key = (vol.name, vfid.qsid, vfid.hex)
        st = self._vfs.get(key)
        if st is not None and not st.gone:
            return st
        mode = self._policy(vol).mode
        if mode == "watch" and self.watcher is None:
            mode = "scan"
        st = VFState(key, vol, vfid, mode)
        if mode == "watch" and self.watcher is not None:
            self.watcher.add_vfolder(st, os.path.realpath(vol.vfolder_path(vfid)), -1)
        if last is not None:
            # events were not watched while the agent was down: the old figure is served as stale until
            # the start-up scan lands
            st.figure = Usage(
                last.file_count, last.used_bytes, last.allocated_bytes, last.measured_at, last.source, True
            )
            st.stale = True
            st.written = last  # as the catalogue holds it: the flush writes the stale flag through
            st.ready.set()
            self._wake.set()
        self._vfs[key] = st
        if mode == "fast":
            self._spawn(self._poll_fast(st))
        else:
            self.request_scan(st, fast_lane=fresh)
        return st

    async def unregister(self, vol: Volume, vfid: VFolderID) -> None:
        """Forget a vfolder (deleted through the API): stop its scan, drop its watches and rows."""
        key = (vol.name, vfid.qsid, vfid.hex)
        st = self._vfs.pop(key, None)
        if st is not None:
            self._forget_state(st)
        await self.store.forget(key)

    def _forget_state(self, st: VFState) -> None:
        st.gone = True
        st.cancel.set()
        if self.watcher is not None:
            self.watcher.forget_vfolder(st)

    # -- answers -----------------------------------------------------------------------------------

    def cached(self, vol: Volume, vfid: VFolderID) -> Usage | None:
        return self.cached_key((vol.name, vfid.qsid, vfid.hex))

    def cached_key(self, key: VFKey) -> Usage | None:
        st = self._vfs.get(key)
        return None if st is None or st.gone else self._with_lag(st)

    def _with_lag(self, st: VFState) -> Usage | None:
        """The figure, flagged ``pending`` (and stale) while events for the vfolder are queued or being
        applied: the kernel's queue is read first, so a change made before the request counts."""
        f = st.figure
        if f is None or st.mode != "watch":
            return f
        if self.watcher is not None:
            self.watcher.drain(8)
        if st.lagging:
            return dataclasses.replace(f, stale=True, pending=True)
        return f

    @staticmethod
    def _served_totals(st: VFState) -> Totals | None:
        """What :meth:`_with_lag` would serve now (without reading the kernel's queue), as catalogue totals."""
        f = st.figure
        if f is None:
            return None
        lag = st.mode == "watch" and st.lagging
        return Totals(f.file_count, f.used_bytes, f.allocated_bytes, f.source, f.stale or lag, f.measured_at, lag)

    async def answer(self, vol: Volume, vfid: VFolderID) -> Usage | None:
        """What the routes serve: :meth:`usage`, with hard links that also have names outside the vfolder
        re-read first (a write through an outside name is seen by no event of this vfolder)."""
        st = self._vfs.get((vol.name, vfid.qsid, vfid.hex))
        if st is None or st.gone or st.figure is None:
            return await self.usage(vol, vfid)
        await self._recheck(st)
        return self._with_lag(st)

    async def _recheck(self, st: VFState, cap: int = SETTLE_ANSWER_CAP) -> None:
        """Re-read what can change with no event of this vfolder: directories holding hard links with names
        outside it, and directories with files written lately (allocation settles at writeback) while they
        hold at most ``cap`` entries (more are left to :meth:`_recheck_loop`, or flagged ``pending``)."""
        tree = st.tree
        if st.mode != "watch" or tree is None or st.scanning:
            return
        rels = tree.escaping()
        if st.settling and st.settling_load() <= cap:
            rels = rels | st.settling.keys()
        await self._reread(st, [r for r in rels if r in tree.dirs])

    async def _reread(self, st: VFState, rels: list[str]) -> None:
        """Read directories again (no event named them); only those that changed are applied."""
        tree = st.tree
        if not rels or tree is None:
            return
        st.reads += 1
        read_at = time.time()
        try:
            try:
                results = await asyncio.to_thread(self._read_many, st, rels)
            except VFolderNotFound:
                await self._check_root(st)
                return
            if st.tree is not tree or st.scanning or st.gone:
                return
            changed = []
            for rel, agg in results:
                if agg is not None and tree.dirs.get(rel) == agg:
                    self._settle(st, rel, agg, read_at)
                else:
                    changed.append((rel, agg))
            if changed:
                self._apply(st, changed, read_at)
        finally:
            self._read_done(st)

    @staticmethod
    def _read_done(st: VFState) -> None:
        st.reads -= 1
        if not st.reads:
            st.applied_at.clear()  # only reads that overlap can land out of order

    def _window(self, st: VFState) -> float:
        w = self._windows.get(st.vol.name)
        if w is None:
            w = self._windows[st.vol.name] = settle_window(self._policy(st.vol).fstype)
        return w

    def _settle(self, st: VFState, rel: str, agg: DirAgg, read_at: float) -> None:
        """Keep ``rel`` among the directories re-read while files there were written too lately for a read
        at ``read_at`` to have seen their final allocation."""
        if st.mode != "watch":
            return
        until = agg.newest + self._window(st)
        if until > read_at:
            st.settling[rel] = until
        else:
            st.settling.pop(rel, None)

    async def usage(self, vol: Volume, vfid: VFolderID) -> Usage | None:
        """The figure being served; a vfolder never measured is scanned now and waited for a bounded time
        (None = not known yet). Raises VFolderNotFound for a vfolder that does not exist."""
        st = self._vfs.get((vol.name, vfid.qsid, vfid.hex))
        if st is not None and not st.gone and st.figure is not None:
            return st.figure
        if st is None or st.gone:
            await asyncio.to_thread(lambda: vol.open_vfolder(vfid).close())
            st = self.register(vol, vfid, fresh=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.ready.wait(), self.settings.first_answer_wait)
        return st.figure

    def _figure(self, st: VFState, source: str) -> Usage:
        assert st.tree is not None
        count, used, alloc = st.tree.totals()
        return Usage(count, used, alloc, time.time(), source, st.stale or st.incomplete_watches)

    # -- watcher sink (called on the event loop) ------------------------------------------------------

    def dirty(self, vf: object, relpath: str, ino: int = 0) -> None:
        st: VFState = vf  # type: ignore[assignment]
        if st.gone:
            return
        st.dirty.add(relpath)
        if ino:
            st.expect.setdefault(relpath, set()).add(ino)
        self._wake.set()

    def moved_away(self, vf: object, relpath: str) -> None:
        """A directory was renamed away from ``relpath`` (within the vfolder or out of it): out of the vfolder
        unless the watcher saw the same move land in it (:meth:`moved_within`, before or after this call).
        Read or not: a directory the engine read is not always seen leaving by a re-read of its parent (its
        parent may have moved within first, be dropped and walked again at its new place without it, while
        its watch still names it by the old path), and one that left may have taken hard links to files that
        stay, written through outside names since."""
        st: VFState = vf  # type: ignore[assignment]
        if st.gone or st.tree is None:
            return
        if not _take(st.within, relpath):
            st.leaving[relpath] = st.leaving.get(relpath, 0) + 1

    def moved_within(self, vf: object, relpath: str) -> None:
        """The watcher saw a directory renamed away from ``relpath`` land in the same vfolder (inotify: the
        MOVED_TO paired by its cookie; fanotify: FAN_RENAME with both ends in it). Only this tells a move
        within from a move out: finding the directory again does not (a walk of some new directory may find
        one just made; one found again by its inode may have been out and back, and writes through its hard
        links while it was out reached no event)."""
        st: VFState = vf  # type: ignore[assignment]
        if st.gone or st.tree is None:
            return
        if relpath in st.tree.dirs:  # a directory the engine read: its parent's re-read will see it left
            st.stayed[relpath] = st.stayed.get(relpath, 0) + 1
        if not _take(st.leaving, relpath):
            st.within[relpath] = st.within.get(relpath, 0) + 1

    def lost(self, vf: object, relpath: str, deleted: bool = False) -> None:
        st: VFState = vf  # type: ignore[assignment]
        if st.gone:
            return
        if deleted:
            st.deleted.add(relpath)
        if relpath:
            st.dirty.add(split(relpath)[0])
            self._wake.set()
        else:
            self._spawn(self._check_root(st))

    def overflow(self) -> None:
        self.overflows += 1
        stale = [st for st in self._vfs.values() if st.mode == "watch" and not st.gone]
        for st in stale:
            self._mark_stale(st)
            self.request_scan(st)
        self._spawn(self.store.mark_stale([st.key for st in stale]))

    def watch_lost(self, vf: object) -> None:
        """A watcher could not keep watching a vfolder (no more watches): stale until rescanned."""
        st: VFState = vf  # type: ignore[assignment]
        if not st.gone:
            self._mark_stale(st)
            self.request_scan(st)

    def _mark_stale(self, st: VFState) -> None:
        st.stale = True
        if st.figure is not None and not st.figure.stale:
            f = st.figure
            st.figure = Usage(f.file_count, f.used_bytes, f.allocated_bytes, f.measured_at, f.source, True)
            self._wake.set()  # the next flush writes the flag through

    async def _check_root(self, st: VFState) -> None:
        try:
            await asyncio.to_thread(lambda: st.vol.open_vfolder(st.vfid).close())
        except VFolderNotFound:
            log.info("usage engine: vfolder %s on %s is gone from disk", st.vfid, st.vol.name)
            if self._vfs.get(st.key) is st:
                del self._vfs[st.key]
            self._forget_state(st)
            return
        self._mark_stale(st)  # moved away and back, or replaced: watches point elsewhere now
        self.request_scan(st)

    # -- scans -------------------------------------------------------------------------------------

    def request_scan(self, st: VFState, *, fast_lane: bool = False, refresh: bool = False) -> None:
        if st.gone or self._stopping:
            return
        if st.scanning:
            st.scan_again = True
            return
        st.scan_task = self._spawn(self._full_scan(st, fast_lane or refresh, idle=not fast_lane))

    async def _full_scan(self, st: VFState, fast_lane: bool, *, idle: bool = True) -> None:
        """Scans run one after another per vfolder, ``scan-concurrency`` vfolders at once; a rescan's
        readers are in the idle I/O class (a first sight, which a caller waits for, is not)."""
        await self._startup_delay(st)
        while True:
            st.scan_again = False
            async with self._first_sight_slots if fast_lane else self._scan_slots:
                await self._scan_once(st, idle=idle)
            self._startup_progress(st)
            if not st.scan_again or st.gone or self._stopping:
                return
            fast_lane, idle = False, True

    def _on_open(self, st: VFState):  # noqa: ANN202 - a callback for scanner threads
        watcher = self.watcher if st.mode == "watch" else None
        state = {"full": False}
        if watcher is None or not watcher.per_directory:
            return None, state  # nothing to do per directory: the scanner reads each in one C call

        def on_open(rel: str, fd: int) -> None:
            if watcher is None or state["full"]:
                return
            try:
                watcher.watch(st, rel, fd)
            except WatchLimit as e:
                state["full"] = True
                log.warning(
                    "usage engine: cannot watch all of vfolder %s (%s); it is rescanned periodically", st.vfid, e
                )

        return on_open, state

    async def _scan_once(self, st: VFState, *, idle: bool = True) -> None:
        if st.gone:
            return
        st.cancel = threading.Event()
        cancel = st.cancel
        on_open, state = self._on_open(st)
        # moves seen so far are settled by this walk; those seen while it runs are not (it may have read a
        # hard link's older name before the link was made, and the moved directory after it left), so they
        # outlive its landing and are doubted once the vfolder is quiet
        st.departed.clear()
        st.leaving.clear()
        st.within.clear()
        st.stayed.clear()
        started = time.time()
        self.scans += 1
        threads = self._policy(st.vol).scan_threads or self.settings.scan_threads

        reread: set[str] = set()
        settling: dict[str, float] = {}
        window = self._window(st) if st.mode == "watch" else None

        def work() -> tuple[VFolderTree, list[DirRow]]:
            # the tree and the rows are built here too: 100k directories would hold the event loop up
            with st.vol.open_vfolder(st.vfid) as root:
                dirs = scan(root.fd, "", threads=threads, cancel=cancel, on_open=on_open, idle=idle)
            tree = VFolderTree()
            for rel, agg in dirs.items():
                # a hard-linked file written while the walk ran was read with different sizes in its
                # directories: those read earlier are read again once the tree is in place
                reread.update(tree.put(rel, agg))
            tree.unplaced_links = False  # a full walk has placed every name
            if window is not None:  # files written lately: their allocation may change at writeback
                settling.update((rel, until) for rel, agg in dirs.items() if (until := agg.newest + window) > started)
            return tree, [_row(rel, agg) for rel, agg in dirs.items()]

        try:
            tree, rows = await asyncio.to_thread(work)
        except VFolderNotFound:
            await self._check_root(st)
            return
        except ScanCancelled:
            return
        except Exception:
            log.exception("usage engine: scanning vfolder %s failed; retrying in %d s", st.vfid, SCAN_RETRY)
            self._spawn(self._retry(st))
            return
        if st.gone:
            return
        st.tree = tree
        st.settling = settling
        st.pending.clear()
        st.dirty |= reread
        st.recheck = set(st.dirty)
        self._links_from_elsewhere(st)
        st.stale = st.scan_again  # events were lost during this walk: another one follows, stale till then
        st.incomplete_watches = bool(state["full"])
        st.last_scan = started
        # the walk saw the tree as it was between its start and its end: its start is the honest time
        st.figure = replace(self._figure(st, "scan"), measured_at=started)
        st.ready.set()
        # a tree of 100k directories is long-lived: keep the cyclic GC from re-traversing it on every full
        # collection (those pauses would show up as slow answers); freed objects still go by refcount
        gc.collect(1)
        gc.freeze()
        t = st.figure
        totals = Totals(t.file_count, t.used_bytes, t.allocated_bytes, "scan", t.stale, t.measured_at)
        st.written = totals
        try:
            await self.store.apply([VFolderChange(st.key, totals, rows, [], replace_all=True)])
        except Exception:
            log.exception("usage engine: recording the scan of %s failed", st.vfid)
        log.debug("usage engine: scanned %s: %d dirs in %.3f s", st.vfid, len(rows), time.time() - started)
        if st.dirty:
            self._wake.set()

    def _links_from_elsewhere(self, st: VFState) -> None:
        """A new hard link here whose older name is in no directory of this vfolder: that name may be in a
        sibling vfolder, which no event told that its file now has a name here (a write through this name
        changes its figure). The other vfolders of the volume are rescanned, stale meanwhile; rare."""
        assert st.tree is not None
        hunted = st.hunted
        # a walk that was already under way may predate the link: the walk that follows looks again
        st.hunted = {key for key in hunted if key not in st.tree.linked()} if st.scan_again else set()
        if not any(st.tree.escapes(key) for key in hunted):
            return
        for other in list(self._vfs.values()):
            if other is not st and other.vol is st.vol and other.mode == "watch" and not other.gone:
                self._doubt(other, "a hard link into a sibling vfolder")

    async def _retry(self, st: VFState) -> None:
        await asyncio.sleep(SCAN_RETRY)
        self.request_scan(st)

    async def _scan_subtree(self, st: VFState, rel: str, tree: VFolderTree) -> None:
        """A directory appeared (created, or moved in with its contents): walk it and merge it into
        ``tree`` (the vfolder's tree when the job was spawned). The caller counts the job in
        ``subtree_jobs`` when it spawns it (a move within the vfolder must not look like a move out in
        between). A full walk that landed meanwhile replaced the tree and read this directory after this job
        began: its reads and the events since are newer, and merging this walk's older ones over them would
        lose what changed in between (a subtree walked when it held one directory put back over a full walk
        that saw 3,000, with no event left to repair it)."""
        try:
            on_open, state = self._on_open(st)

            def work() -> dict[str, DirAgg]:
                with st.vol.open_vfolder(st.vfid) as root:
                    return scan(root.fd, rel, threads=2, cancel=st.cancel, on_open=on_open)

            read_at = time.time()
            try:
                dirs = await asyncio.to_thread(work)
            except (VFolderNotFound, ScanCancelled):
                return
            if state["full"]:
                st.incomplete_watches = True
            parent_rel, name = split(rel)
            if st.tree is not tree or st.scanning or st.gone:
                return
            parent = tree.dirs.get(parent_rel)
            rec = parent.subdirs.get(name) if parent is not None else None
            if rel not in dirs or rec is None or rec[0] != dirs[rel].ino or not _consistent(dirs):
                # gone, replaced, or moved while it was walked: the parent's re-read decides (it walks
                # the directory again if the tree still lacks it)
                if parent is not None:
                    st.dirty.add(parent_rel)
                return
            for r in tree.drop(rel):
                st.pending[r] = None
            for r, agg in dirs.items():
                st.dirty |= tree.put(r, agg)
                st.pending[r] = agg
                self._settle(st, r, agg, read_at)
            if tree.refresh_entry(rel, dirs[rel]):
                st.pending[parent_rel] = tree.dirs[parent_rel]
            if tree.unplaced_links:
                self._hunt_links(st)
            st.figure = self._figure(st, "watch")
        except Exception:
            log.exception("usage engine: scanning new directory %r of %s failed; rescanning", rel, st.vfid)
            self._mark_stale(st)
            self.request_scan(st)
        finally:
            st.subtree_jobs -= 1
            self._wake.set()

    # -- deltas ------------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            if self.settings.coalesce:
                await asyncio.sleep(self.settings.coalesce)
            self._wake.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("usage engine: applying changes failed")

    async def _flush(self) -> None:
        for st in list(self._vfs.values()):
            if not st.dirty or st.tree is None or st.scanning or st.gone:
                continue
            rels, st.dirty = st.dirty, set()
            expect = {r: st.expect.pop(r) for r in rels if r in st.expect}
            known = [r for r in rels if r in st.tree.dirs]
            waiting = {r for r in rels if r not in st.tree.dirs}
            if st.subtree_jobs:  # may belong to a subtree being walked
                st.dirty |= waiting
                for r in waiting & expect.keys():
                    st.expect.setdefault(r, set()).update(expect[r])
            self._follow_moved(st, [(r, None) for r in waiting], expect)
            if not known:
                continue
            st.applying = True
            st.reads += 1
            read_at = time.time()
            tree = st.tree
            try:
                try:
                    results = await asyncio.to_thread(self._read_many, st, known)
                except VFolderNotFound:
                    await self._check_root(st)
                    continue
                finally:
                    st.applying = False
                if st.scanning or st.tree is None or st.tree is not tree or st.gone:  # a full walk began or landed
                    st.dirty |= set(known)
                    continue
                self._follow_moved(st, results, expect)
                self._doubt_moved(st, results, expect)
                self._apply(st, results, read_at)
            finally:
                self._read_done(st)
        for st in list(self._vfs.values()):
            if not st.dirty and not st.subtree_jobs and not st.scanning:
                st.deleted.clear()
                st.within.clear()
                st.recheck.clear()
                st.stayed.clear()
                if st.departed or st.leaving:
                    # a directory left the vfolder: names created in it just before (hard links to files
                    # that stay) reached no event the engine could read, so it looks again
                    st.departed.clear()
                    st.leaving.clear()
                    self._doubt(st, "a directory moved out of the vfolder")
        changes = []
        for st in self._vfs.values():
            totals = self._served_totals(st)
            if totals is None or st.gone:
                continue
            rows = bool(st.pending) and not st.scanning  # a scan under way replaces every row when it lands
            if not rows and totals == st.written:
                continue
            upserts = [_row(r, a) for r, a in st.pending.items() if a is not None] if rows else []
            deletes = [r for r, a in st.pending.items() if a is None] if rows else []
            if rows:
                st.pending = {}
            # every change of what is served (figure, stale, pending) is written through: HTTP workers in
            # other processes answer from these rows, as fresh as this memory within a flush
            st.written = totals
            changes.append(VFolderChange(st.key, totals, upserts, deletes))
        if changes:
            await self.store.apply(changes)

    def _doubt_moved(self, st: VFState, results: list[tuple[str, DirAgg | None]], expect: dict[str, set[int]]) -> None:
        """An event happened in a directory that its path no longer names (a rotation of directories
        while events were queued): the change may belong to a directory the re-read does not look at,
        so the vfolder is flagged stale and rescanned rather than trusted."""
        for rel, agg in results:
            if agg is not None and expect.get(rel, {agg.ino}) - {agg.ino}:
                log.debug("usage engine: %r of %s names another directory than its events did", rel, st.vfid)
                self._mark_stale(st)
                self.request_scan(st)
                return

    def _follow_moved(
        self, st: VFState, results: list[tuple[str, DirAgg | None]], expect: dict[str, set[int]]
    ) -> None:
        """Events named a directory by a path it has left (an inotify watch keeps the path it was added
        with until the engine sees the move): where the tree holds that directory now, it is re-read too."""
        assert st.tree is not None
        for rel, agg in results:
            for ino in expect.get(rel, ()):
                if agg is not None and agg.ino == ino:
                    continue
                other = st.tree.by_ino.get(ino)
                if other is not None and other != rel:
                    st.dirty.add(other)
                    self._wake.set()

    def _doubt(self, st: VFState, why: str) -> None:
        log.debug("usage engine: %s in %s; rescanning", why, st.vfid)
        self._mark_stale(st)
        self.request_scan(st)

    @staticmethod
    def _read_many(st: VFState, rels: list[str]) -> list[tuple[str, DirAgg | None]]:
        from agent.engine.usage.aggregates import read_dir

        with st.vol.open_vfolder(st.vfid) as root:
            return [(rel, read_dir(root.fd, rel)) for rel in rels]

    def _apply(self, st: VFState, results: list[tuple[str, DirAgg | None]], read_at: float) -> None:
        """Apply directories re-read (from ``read_at`` on) to the tree."""
        tree = st.tree
        assert tree is not None
        changed = False
        for rel, agg in results:
            if read_at < st.applied_at.get(rel, 0.0):
                continue  # a read of it that began later has landed already (reads overlap): never go back
            old = tree.dirs.get(rel)
            if old is None:
                continue  # dropped by an earlier result of this batch
            if agg is None or agg.ino != old.ino:
                if rel:
                    # gone or replaced (a read says nothing of the directory the tree holds there): its
                    # parent's re-read settles it, and it is read again too. A rotation that ends where it
                    # began brings the same directory back: the parent then sees nothing to walk, and what
                    # made this one dirty (its events, a walk below it that found it moving) would be lost
                    st.dirty.add(split(rel)[0])
                    st.dirty.add(rel)
                    self._wake.set()
                else:
                    self._spawn(self._check_root(st))
                continue
            st.applied_at[rel] = read_at
            appeared = []
            for name, rec in old.subdirs.items():
                new = agg.subdirs.get(name)
                if new is None or new[0] != rec[0]:
                    moved = join(rel, name)
                    if moved not in st.deleted and moved in tree.dirs and not _take(st.stayed, moved):
                        # moved, and the watcher saw no rename keep it in the vfolder: out, maybe back since
                        # (finding it again proves nothing: hard links in it may have been written outside)
                        st.departed[rec[0]] = moved
                    held = tree.subtree(join(rel, name))
                    for r in tree.drop(join(rel, name)):
                        st.pending[r] = None
                    if self.watcher is not None:
                        self.watcher.forget(st, held)
            for name, rec in agg.subdirs.items():
                prev = old.subdirs.get(name)
                child = tree.dirs.get(join(rel, name))
                # also a directory the tree still lacks (its walk found it moved) or holds with another inode
                if prev is None or prev[0] != rec[0] or child is None or child.ino != rec[0]:
                    appeared.append(join(rel, name))
            others = tree.put(rel, agg)
            st.pending[rel] = agg
            self._settle(st, rel, agg, read_at)
            if rel in st.recheck:
                # changed while the full walk ran: a hard link it saw here may have been made after it read
                # the older name's directory (counted there as a plain file, twice in all): look for it
                st.recheck.discard(rel)
                for dev, ino, *_ in agg.links:
                    if tree.escapes((dev, ino)):
                        tree.unplaced.add((dev, ino))
                        tree.unplaced_links = True
            if others:
                st.dirty |= others
                self._wake.set()
            if tree.refresh_entry(rel, agg):
                parent_rel = split(rel)[0]
                st.pending[parent_rel] = tree.dirs[parent_rel]
            for sub in appeared:
                st.subtree_jobs += 1
                self._spawn(self._scan_subtree(st, sub, tree))
            changed = True
        if tree.unplaced_links:
            self._hunt_links(st)
        if changed:
            st.figure = self._figure(st, "watch")

    def _hunt_links(self, st: VFState) -> None:
        """A new hard link to a file whose older name is elsewhere: only a walk finds that name (which
        may still be counted as a plain file), so the vfolder is rescanned, stale meanwhile."""
        assert st.tree is not None
        st.tree.unplaced_links = False
        st.hunted |= st.tree.unplaced
        st.tree.unplaced = set()
        log.debug("usage engine: new hard link(s) in %s; rescanning to place them", st.vfid)
        self._mark_stale(st)
        self.request_scan(st)

    # -- polling and schedules ----------------------------------------------------------------------

    async def _poll_fast(self, st: VFState) -> None:
        """Backends that know usage themselves: ask them now and then (cheap), never walk."""
        while not st.gone:
            try:
                tree = await st.vol.fast_usage(st.vfid)
            except VFolderNotFound:
                await self._check_root(st)
                return
            except Exception:
                log.exception("usage engine: %s could not report usage of %s", st.vol.name, st.vfid)
                tree = None
            if tree is None and st.figure is None:
                st.mode = "scan"  # the backend has no figure for this one: walk it instead
                self.request_scan(st)
                return
            if tree is not None:
                now = time.time()
                st.figure = Usage(tree.entries, tree.size_bytes, tree.allocated_bytes, now, "fast", False)
                st.ready.set()
                t = st.written = Totals(tree.entries, tree.size_bytes, tree.allocated_bytes, "fast", False, now)
                await self.store.put_totals(st.key, t)
            await asyncio.sleep(self.settings.fast_poll_interval)

    async def _recheck_loop(self, *, workers: bool) -> None:
        """Every second: what changes with no event is re-read (:meth:`_recheck`, up to SETTLE_LOOP_CAP
        entries written lately), and directories whose settle window has passed are read once more (their
        final allocation; this also ends a ``pending`` flag of :meth:`VFState.unsettled`). So a writeback in
        a vfolder too busy for the answer's own re-read, and (with HTTP workers answering from the catalogue,
        ``workers``, where no answer passes through :meth:`answer`) a write through an outside name, reach
        the served figure within about a second."""
        while True:
            await asyncio.sleep(LINK_RECHECK)
            for st in list(self._vfs.values()):
                tree = st.tree
                if tree is None or st.gone or st.mode != "watch" or not (st.settling or workers and tree.escaping()):
                    continue
                try:
                    for rel in [r for r in st.settling if r not in tree.dirs]:
                        del st.settling[rel]
                    if workers or st.settling:
                        await self._recheck(st, SETTLE_LOOP_CAP)
                    now = time.time()
                    await self._reread(st, [r for r, until in st.settling.items() if until <= now])
                except Exception:
                    log.exception("usage engine: re-reading directories of %s failed", st.vfid)
                self._wake.set()  # the flush writes a new figure (or the end of ``pending``) through

    async def _schedule_loop(self) -> None:
        """Rescans on a schedule (network filesystems, vfolders not fully watched), and the requests of the
        mailbox (looked at every 2 s as well as when the doorbell rings)."""
        while True:
            await asyncio.sleep(2.0)
            try:
                await self._take_requests()
                now = time.time()
                for st in list(self._vfs.values()):
                    if st.mode == "fast" or st.scanning or st.gone or not st.last_scan:
                        continue
                    interval = self._rescan_interval(st)
                    if interval is not None and now - st.last_scan >= interval:
                        self.request_scan(st)
            except Exception:
                log.exception("usage engine: scheduled rescans failed")

    # -- introspection (status, tests, bench) -------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "watcher": self.watcher.kind if self.watcher is not None else "none",
            "vfolders": len(self._vfs),
            "directories": sum(len(st.tree.dirs) for st in self._vfs.values() if st.tree is not None),
            "scanning": sum(1 for st in self._vfs.values() if st.scanning),
            "stale": sum(1 for st in self._vfs.values() if st.figure is not None and st.figure.stale),
            "modes": {name: pol.mode for name, pol in self.policies.items()},
            "startup_rescan": {"pending": self.startup.pending_count(), "done": self.startup.done},
        }
