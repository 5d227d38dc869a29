"""``serve`` under ``[storage-proxy] num-proc = N`` (N ≥ 2): one engine process and N HTTP workers.

The supervisor itself runs no event loop and serves nothing. Before the privilege drop it has bound
every listener (agent/runtime/server.py :func:`bind_shared`: N SO_REUSEPORT sockets per API port, set
i for worker i, so the kernel spreads connections; the metrics listener's for the engine). It starts the
engine (catalogue upgrades, reconciliation, usage engine, upload sweeper, FUSE view, memory trimmer,
metrics), waits until it is ready, then the workers, and prints the banner once they all are. It
restarts whichever child dies: at once the first time, after a growing pause (:data:`BACKOFF`) when it
keeps dying within :data:`STABLE` seconds of its start. A dead worker's sockets stay open here, so the
connections queued on them wait for its replacement instead of being reset. SIGTERM or SIGINT stops the
workers, then the engine, and ``serve`` exits with 0. With the ``file`` log driver it is the file's one
writer: each child sends its records over a socket of its own (agent/log_relay.py).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import log_relay
from agent.config import Config
from agent.http import metrics
from agent.runtime import spawn
from agent.runtime.parent import child_env
from agent.runtime.server import Bound, Shared, print_banner, url_of

log = logging.getLogger(__name__)

STABLE = 10.0  # seconds a child must have run for its next death to count as a first one again
BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # pause before restarting after the 1st, 2nd, ... quick death
START_TIMEOUT = 600.0  # seconds the engine may take to start (an upgrade, a big reconciliation)
# On SIGTERM a child's requests in flight get [storage-proxy] stop-timeout to end (aiohttp's shutdown), then
# it stops its services and closes the catalogue: it is killed only after stop-timeout + STOP_MARGIN
# (stop_bound). The workers get that bound, then the engine does; the packaged unit's TimeoutStopSec covers both.
STOP_MARGIN = 15.0


def stop_bound(config: Config) -> float:
    """Seconds a child may take to stop on SIGTERM before it is killed: the one rule, from stop-timeout."""
    return config.storage_proxy.stop_timeout + STOP_MARGIN


def metrics_dir(catalog_path: Path) -> Path:
    """Where the processes count their metrics (prometheus-client's multiprocess files), beside the catalogue."""
    return catalog_path.with_name(catalog_path.name + ".metrics")


@dataclass(eq=False)
class Child:
    role: str  # spawn.ENGINE | spawn.WORKER
    index: int
    fds: dict[str, list[int]]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0  # consecutive deaths within STABLE seconds of a start
    due: float | None = None  # when to start it again (monotonic)
    ready_fd: int | None = None  # read end of its ready pipe, while awaited
    ready: bool = False  # it said so

    @property
    def name(self) -> str:
        return "engine" if self.role == spawn.ENGINE else f"HTTP worker {self.index}"


@dataclass
class Supervisor:
    config: Config
    sockets: Shared
    banner: bool = False
    log_file: logging.Handler | None = None  # the file driver's writer: the children's records go to it too
    children: list[Child] = field(default_factory=list)
    retiring: list[subprocess.Popen[bytes]] = field(default_factory=list)  # replaced workers finishing requests
    _stopping: bool = False

    def __post_init__(self) -> None:
        self._payload = spawn.config_payload(self.config)
        self.engine = Child(spawn.ENGINE, 0, {"metrics": [s.fileno() for s in self.sockets.metrics]})
        self.workers = [
            Child(spawn.WORKER, i, {"manager": [s.fileno() for s in w.manager],
                                    "client": [s.fileno() for s in w.client]})
            for i, w in enumerate(self.sockets.workers)
        ]
        self.children = [self.engine, *self.workers]
        self._logs: log_relay.Collector | None = None

    # -- starting ------------------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        read, write = os.pipe2(os.O_CLOEXEC)
        fds = [fd for group in child.fds.values() for fd in group]
        # an engine restarted while workers serve must not take their work in flight for leftovers
        beside = child.role == spawn.ENGINE and any(w.proc is not None and w.proc.poll() is None for w in self.workers)
        relay = log_relay.pair() if self._logs is not None else None
        log_fd = relay[1].fileno() if relay else None
        passed = [*fds, write] + ([] if log_fd is None else [log_fd])
        cmd = spawn.command(child.role, ready=write, index=child.index, fds=child.fds, beside_workers=beside,
                            log_fd=log_fd)
        try:
            # a session of its own: a terminal's Ctrl-C reaches the supervisor only, which stops the children
            # in order (and never takes their exit for a crash)
            child.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, pass_fds=passed,
                start_new_session=True, env=child_env(),
            )
        except BaseException:
            if relay:
                relay[0].close()
            raise
        finally:
            os.close(write)
            if relay:
                relay[1].close()
        if relay and self._logs is not None:
            self._logs.add(relay[0])
        assert child.proc.stdin is not None
        try:
            child.proc.stdin.write(self._payload)
            child.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: seen as an exit
        child.started = time.monotonic()
        child.due = None
        child.ready = False
        if child.ready_fd is not None:
            os.close(child.ready_fd)
        child.ready_fd = read
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def _wait_ready(self, children: list[Child], timeout: float) -> int | None:
        """Wait until each child said ready; the exit status of one that died first (None: all ready)."""
        deadline = time.monotonic() + timeout
        waiting = {c.ready_fd: c for c in children if c.ready_fd is not None}
        while waiting and not self._stopping:
            for child in waiting.values():
                assert child.proc is not None
                if child.proc.poll() is not None:
                    log.error("%s exited with %s while starting", child.name, child.proc.returncode)
                    return child.proc.returncode or 1
            if time.monotonic() > deadline:
                log.error("%s did not start within %g s", ", ".join(c.name for c in waiting.values()), timeout)
                return 1
            ready, _, _ = select.select(list(waiting), [], [], 0.2)
            for fd in ready:
                said = os.read(fd, 64)
                child = waiting.pop(fd)
                os.close(fd)
                child.ready_fd = None
                child.ready = bool(said)
                if not said:  # closed without a word: it is exiting
                    assert child.proc is not None
                    try:
                        code = child.proc.wait(stop_bound(self.config))
                    except subprocess.TimeoutExpired:
                        code = 1
                    log.error("%s exited with %s while starting", child.name, code)
                    return code or 1
        return None

    # -- running -------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until SIGTERM/SIGINT, stop everything; the exit status of ``serve``."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_requested)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop (set_wakeup_fd) when a child dies
        if self.log_file is not None:
            self._logs = log_relay.Collector(self.log_file)
        try:
            # metrics across processes: every child counts in files of one directory (emptied here, before
            # any child exists; named in the environment the children inherit)
            metrics.prepare_multiprocess(metrics_dir(self.config.catalog.path))
            self._spawn(self.engine)
            failed = self._wait_ready([self.engine], START_TIMEOUT)
            if failed is None and not self._stopping:
                for worker in self.workers:
                    self._spawn(worker)
                failed = self._wait_ready(self.workers, START_TIMEOUT)
            if failed is not None:
                return failed
            if not self._stopping:
                self._announce()
            while not self._stopping:
                waiting = {c.ready_fd: c for c in self.children if c.ready_fd is not None}
                readable, _, _ = select.select([wake_r, *waiting], [], [], self._next_timeout())
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                for fd in readable:
                    if fd in waiting:
                        self._heard(waiting[fd])
                self._reap()
                self._restart_due()
            return 0
        finally:
            self._stop_all()
            if self._logs is not None:
                self._logs.close()  # every line the children left, up to their end-of-file
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)

    def _stop_requested(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    def _announce(self) -> None:
        w = self.sockets.workers[0]
        tls_m, tls_c = self.config.api.manager.ssl_enabled, self.config.api.client.ssl_enabled
        metrics = url_of(self.sockets.metrics, False) if self.sockets.metrics else None
        bound = Bound(url_of(w.manager, tls_m), url_of(w.client, tls_c), metrics)
        log.info("manager API on %s, client API on %s%s: %d HTTP workers and the engine (pids %s)",
                 bound.manager_url, bound.client_url, f", metrics on {metrics}/metrics" if metrics else "",
                 len(self.workers), ", ".join(str(c.proc.pid) for c in self.children if c.proc is not None))
        if self.banner:
            print_banner(self.config, bound)

    def _heard(self, child: Child) -> None:
        """A restarted child's word on its ready pipe (nothing: it is exiting, seen by :meth:`_reap`)."""
        assert child.ready_fd is not None
        said = os.read(child.ready_fd, 64)
        os.close(child.ready_fd)
        child.ready_fd = None
        child.ready = bool(said)
        if child is self.engine and said.split() == spawn.REBUILT.split():
            self._recycle_workers()

    def _recycle_workers(self) -> None:
        """The engine started a new catalogue file while the workers hold the old one open (their reads would
        answer from it for good): each worker is replaced by a new process, which opens the new file. The
        replacement starts first and shares the old one's sockets; the old one then gets SIGTERM, stops
        accepting and finishes the requests it has (a clone, a download) before it exits."""
        old = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        if not old:
            return
        log.warning("the engine started a new catalogue file: replacing the HTTP workers, which hold the old one")
        for worker in old:
            assert worker.proc is not None
            before = worker.proc
            self._spawn(worker)
            before.send_signal(signal.SIGTERM)
            self.retiring.append(before)

    def _tell_engine(self) -> None:
        """A worker died: the engine settles the clones it had in flight (agent/engine/orphans.py)."""
        proc = self.engine.proc
        if proc is not None and proc.poll() is None and self.engine.ready:
            try:
                proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def _next_timeout(self) -> float:
        due = [c.due for c in self.children if c.due is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 5.0

    def _reap(self) -> None:
        for old in [p for p in self.retiring if p.poll() is not None]:
            self.retiring.remove(old)
            metrics.process_exited(old.pid)
            log.info("replaced HTTP worker (pid %d) exited with %s", old.pid, old.returncode)
            self._tell_engine()  # a retiring worker cut off mid-clone (stop timeout) leaves what a dead one does
        for child in self.children:
            proc = child.proc
            if proc is None or proc.poll() is None:
                continue
            code = proc.returncode
            how = f"signal {-code}" if code < 0 else f"status {code}"
            ran = time.monotonic() - child.started
            child.quick_deaths = child.quick_deaths + 1 if ran < STABLE else 1
            pause = BACKOFF[min(child.quick_deaths - 1, len(BACKOFF) - 1)]
            log.warning("%s (pid %d) exited with %s after %.1f s; restarting it%s", child.name, proc.pid, how, ran,
                        f" in {pause:g} s" if pause else "")
            metrics.process_exited(proc.pid)  # its live gauges go; its counters stay in the totals
            child.proc = None
            if child.ready_fd is not None:
                os.close(child.ready_fd)
                child.ready_fd = None
            child.due = time.monotonic() + pause
            if child.role == spawn.WORKER:
                self._tell_engine()

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None and child.due is not None and child.due <= now and not self._stopping:
                self._spawn(child)

    # -- stopping ------------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        """The workers first (no new request reaches the engine's writer), then the engine."""
        self._stopping = True
        for group in (self.workers, [self.engine]):
            running = [(c.name, c.proc) for c in group if c.proc is not None and c.proc.poll() is None]
            if group is self.workers:
                running += [("replaced HTTP worker", p) for p in self.retiring if p.poll() is None]
            for _, proc in running:
                proc.send_signal(signal.SIGTERM)
            bound = stop_bound(self.config)
            deadline = time.monotonic() + bound
            for name, proc in running:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("%s (pid %d) did not stop within %g s (stop-timeout + %g s): killed", name, proc.pid,
                              bound, STOP_MARGIN)
                    proc.kill()
                    proc.wait()
            for child in group:
                if child.ready_fd is not None:
                    os.close(child.ready_fd)
                    child.ready_fd = None
        log.info("stopped")
