"""The file log under ``num-proc = N``: the children's lines reach the supervisor, which alone writes and rotates.

Why one writer rather than a file per process: operators of installs without the journal expect the one
file ``[logging.file]`` names (upstream's), and a ``RotatingFileHandler`` per process on that file races
(a line written into a file another process has just renamed, renames that overwrite each other's backups,
files past ``rotation-size``). Files per process would keep the rotation right but split one request's
story over several files and multiply the backups an operator has to size.

How: the supervisor makes one ``AF_UNIX`` ``SOCK_SEQPACKET`` pair per child it starts (:func:`pair`) and keeps
one end in a :class:`Collector` thread; the child's :class:`RelayHandler` formats each record (upstream's
JSON, the process's role in ``processName``) and sends it as one message. A message is whole or absent
(never a torn line), and is sent before the logging call returns, so a child that dies (SIGKILL included)
loses nothing it logged: the kernel keeps the queued messages until the collector reads them, up to the
end-of-file it sees once the child's end is closed. A child never waits long on a stalled writer (a disk
that hangs, a stopped supervisor): when the socket buffer (~200 KiB of lines) is full it waits up to
:data:`STALL` seconds once, then drops records without waiting until a send gets through again, and that
send is preceded by a WARNING counting what was dropped.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import select
import selectors
import socket
import sys
import threading
import time

LIMIT = 64 * 1024  # bytes of one relayed line; longer messages and tracebacks are cut to fit
STALL = 2.0  # seconds a child waits once for a full relay socket before it starts dropping records
BUFFER = 1 << 20  # SO_SNDBUF asked for (the kernel caps it at net.core.wmem_max)


def pair() -> tuple[socket.socket, socket.socket]:
    """(the supervisor's end, the child's end); the child's end is to be passed to it and closed here."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    mine.setblocking(False)
    return mine, theirs


def _fit(line: str) -> bytes:
    data = line.encode("utf-8", "surrogateescape")
    if len(data) <= LIMIT:
        return data
    record = json.loads(line)
    for key in ("exc_info", "message"):
        if isinstance(record.get(key), str):
            text = record[key]
            record[key] = text[: LIMIT // 4] + f" ... [{len(text) - LIMIT // 4} characters cut]"
    return json.dumps(record).encode("utf-8", "surrogateescape")[:LIMIT]


class RelayHandler(logging.Handler):
    """A child's file driver: each formatted record to the supervisor as one message (see the module's doc)."""

    def __init__(self, fd: int, role: str) -> None:
        super().__init__()
        self.role = role
        self.sock = socket.socket(fileno=fd)
        self.sock.set_inheritable(False)  # a process this child starts must not hold the supervisor's EOF back
        self.sock.setblocking(False)
        self.dropped = 0  # records dropped since the last one that got through
        self.stalled = False  # the last send found the socket full even after waiting: do not wait again
        self._writable = select.poll()  # (not select(): a worker's descriptors may number past 1024)
        self._writable.register(self.sock, select.POLLOUT)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = _fit(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if self.dropped and not self._send(self._dropped_note()):
            self.dropped += 1
            return
        if not self._send(data):
            self.dropped += 1

    def _dropped_note(self) -> bytes:
        note = logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING", "processName": self.role,
            "msg": "%d log records dropped: the supervisor's log writer did not keep up", "args": (self.dropped,),
        })
        return _fit(self.format(note))

    def _send(self, data: bytes) -> bool:
        """True when ``data`` went out (the drop count then restarts); False when it is dropped."""
        deadline = None if self.stalled else time.monotonic() + STALL
        while True:
            try:
                self.sock.send(data)
            except BlockingIOError:
                left = 0.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    self.stalled = True
                    return False
                self._writable.poll(left * 1000)
                continue
            except OSError:  # the supervisor is gone (this child is about to be stopped too): keep the line
                sys.stderr.write(data.decode("utf-8", "replace") + "\n")
                return True
            self.stalled = False
            self.dropped = 0
            return True

    def close(self) -> None:
        """At exit (logging.shutdown): what was dropped is said once more if it can be (no waiting if stalled)."""
        try:
            if self.dropped and self.sock.fileno() != -1:
                self._send(self._dropped_note())
            self.sock.close()
        finally:
            super().close()


class Collector:
    """The supervisor's reader of its children's relay sockets: each line into ``handler`` (the one file
    writer, shared with the supervisor's own records under the handler's lock), on a thread of its own."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._closing = False
        self._until = 0.0
        self._thread = threading.Thread(target=self._run, name="log-collector", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._selector.register(sock, selectors.EVENT_READ)
        os.write(self._wake_w, b"x")

    def close(self, timeout: float = 5.0) -> None:
        """Once the children are gone: write what they left (up to each end-of-file, or ``timeout``), then stop.
        A writer stalled past that (a hung disk) is left behind: its thread is a daemon."""
        self._until = time.monotonic() + timeout
        self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout + 1.0)
        if not self._thread.is_alive():
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        while True:
            with self._lock:
                socks = [k.fileobj for k in self._selector.get_map().values() if isinstance(k.fileobj, socket.socket)]
            if self._closing and (not socks or time.monotonic() > self._until):
                for sock in socks:
                    assert isinstance(sock, socket.socket)
                    self._drain(sock)
                    self._selector.unregister(sock)
                    sock.close()
                return
            for key, _ in self._selector.select(0.5):
                if key.fileobj == self._wake_r:
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                ready = key.fileobj
                if isinstance(ready, socket.socket) and self._drain(ready):
                    with self._lock:
                        self._selector.unregister(ready)
                    ready.close()

    def _drain(self, sock: socket.socket) -> bool:
        """Write every message queued on ``sock``; True at its end-of-file (the child's end is closed)."""
        while True:
            try:
                data = sock.recv(LIMIT + 1)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            record = logging.makeLogRecord({"msg": "relayed"})
            record.relayed = data.decode("utf-8", "replace")
            self.handler.handle(record)


class OwnedFile(logging.handlers.RotatingFileHandler):
    """The supervisor's file driver: its own records formatted here, the children's written as they came."""

    def format(self, record: logging.LogRecord) -> str:
        relayed = getattr(record, "relayed", None)
        return relayed if relayed is not None else super().format(record)
