"""GET /download: one file sent with sendfile (Range / If-Range honoured), or a directory as a zip made on the fly.

Everything is read through descriptors that the one resolver handed out: the
requested path is opened beneath the vfolder root, and a directory tree is
walked entry by entry with ``openat(O_NOFOLLOW)`` relative to its parent's
descriptor, so no host path is ever joined and a symlink is never followed (a
link inside an archived tree is left out, never replaced by its target's
content). Memory stays flat: a file goes from the page cache to the socket,
and a zip is produced in batches of about one MiB while the tree is walked.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import select
import stat
import unicodedata
import urllib.parse
from collections.abc import Generator, Iterator
from email.utils import formatdate, parsedate_to_datetime

from aiohttp import web
from zipstream import ZIP_STORED, ZipStream

from agent.http.errors import REQUEST_ID, ApiError, problem_response
from agent.http.socket_body import wait_ready
from agent.http.strict import digits
from backends import cpu_placement
from backends.safeopen import NotRegular, open_entry_at

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # one read from a file inside a zip
BATCH = 1 << 20  # bytes of zip stream handed from the worker thread to the event loop at a time
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` fallback and the exact name as RFC 5987 ``filename*``."""
    folded = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    ascii_name = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in folded) or "download"
    quoted = urllib.parse.quote(filename.encode("utf-8", "surrogateescape"), safe="")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


def _if_range_holds(value: str, st: os.stat_result) -> bool:
    """Whether the representation the client holds (If-Range: a date or an ETag) is still the current one."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == _etag(st)  # weak validators never match (RFC 9110 §13.1.5)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):  # the stdlib's date parser on hostile input
        return False
    return int(st.st_mtime) <= when  # Last-Modified has one-second resolution


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``(start, count)`` of a single ``bytes=`` range; None to ignore the header (multi-range or malformed).

    Positions are ASCII digits (:func:`agent.http.strict.digits`); one too long to hold is past any end, so a
    last-byte-pos beyond the file means "to the end" (RFC 9110 §14.1.2) however many digits it has.
    Raises ValueError when the range is well formed but cannot be satisfied (→ 416).
    """
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    first = digits(first_text, saturate=True) if first_text else -1
    last = digits(last_text, saturate=True) if last_text else -1
    if not dash or first is None or last is None or first == last == -1:
        return None
    if first < 0:
        if last <= 0:
            raise ValueError("empty suffix range")
        count = min(last, size)
        return size - count, count
    if 0 <= last < first:
        return None
    if first >= size:
        raise ValueError("range starts past the end")
    end = size - 1 if last < 0 else min(last, size - 1)
    return first, end - first + 1


def _common_headers(filename: str, no_cache: bool) -> dict[str, str]:
    return {
        "Content-Disposition": content_disposition(filename),
        "Cache-Control": "no-store" if no_cache else "private, max-age=0, must-revalidate",
    }


async def send_file(
    request: web.Request, fd: int, st: os.stat_result, filename: str, *, no_cache: bool
) -> web.StreamResponse:
    """Answer with the regular file open at ``fd`` (the caller closes it)."""
    size = st.st_size
    headers = _common_headers(filename, no_cache)
    headers.update(
        {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            "ETag": _etag(st),
        }
    )
    status, start, count = 200, 0, size
    rng = request.headers.get("Range")
    if rng is not None and (
        request.headers.get("If-Range") is None or _if_range_holds(request.headers["If-Range"], st)
    ):
        try:
            chosen = _parse_range(rng, size)
        except ValueError as e:  # a problem body like every 4xx, with the size the client may ask within
            msg = f"Range {rng[:40]!r} cannot be satisfied ({e}): the file has {size} byte(s)"
            refused = problem_response(ApiError(416, msg, "range-not-satisfiable"), request.get(REQUEST_ID))
            refused.headers["Content-Range"] = f"bytes */{size}"
            return refused
        if chosen is not None:
            status, (start, count) = 206, chosen
            headers["Content-Range"] = f"bytes {start}-{start + count - 1}/{size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = count
    await resp.prepare(request)
    if request.method == "HEAD" or count == 0:
        await resp.write_eof()
        return resp
    transport = request.transport
    if transport is None:
        return resp
    loop = asyncio.get_running_loop()
    os.posix_fadvise(fd, start, count, os.POSIX_FADV_SEQUENTIAL)  # bigger readahead: sendfile waits less on the disk
    sock = transport.get_extra_info("socket")
    try:
        plain = sock is not None and transport.get_extra_info("sslcontext") is None
        if plain and not transport.get_write_buffer_size():  # the head is out: the socket is ours
            await _sendfile_wide(loop, sock.fileno(), fd, start, count)
        else:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as fobj:
                # over TLS asyncio falls back to 256 KiB reads in a thread
                await loop.sendfile(transport, fobj, start, count)
    except (ConnectionError, RuntimeError) as e:  # the client went away
        log.debug("download of %s aborted: %s", filename, e)
        if request.transport is not None:
            request.transport.close()  # a body cut short: the connection cannot carry another answer
        return resp
    await resp.write_eof()
    return resp


SEND_HOP = 64 << 20  # at most this much sent per worker-thread call
SEND_LINGER = 0.02  # seconds a worker thread waits for room in the socket before handing the wait to the loop


async def _sendfile_wide(
    loop: asyncio.AbstractEventLoop, sock_fd: int, fd: int, start: int, count: int
) -> None:
    """``count`` bytes of ``fd`` from ``start`` into the socket with sendfile(2), called on the threads of
    :func:`cpu_placement.wide_executor` rather than on the event loop's thread.

    Each sendfile wakes the client: the kernel moves a woken task next to its waker, so sent from the
    loop, pinned to its CPU (``cpu-pin``), a client on the same node was pulled onto that CPU and the two
    took turns on it while the other sat idle (measured with a download of 1 GiB on this 2-CPU VM: the
    client on the loop's CPU in every sample, the loop waiting to run 0.7-1.1 s for 0.2 s of its own;
    unpinned 0.1-0.35 s). A thread keeps sending while the client keeps reading (up to SEND_HOP bytes a
    call); a client that stops reading is waited for on the loop, so it holds no thread (for as long as it
    keeps the connection open, as loop.sendfile did).
    """
    dup = os.dup(sock_fd)  # the transport's own number may not be watched (asyncio), nor closed under us
    try:
        wide = cpu_placement.wide_executor()
        sent = 0
        while sent < count:
            n = await loop.run_in_executor(wide, _send_some, dup, fd, start + sent, min(count - sent, SEND_HOP))
            if n is None:
                await wait_ready(loop, dup, None, write=True)
                continue
            if n == 0:  # the file is shorter than it was at open (truncated meanwhile)
                raise ConnectionResetError(f"the file ended {count - sent} bytes early")
            sent += n
    finally:
        os.close(dup)


def _send_some(sock: int, fd: int, offset: int, most: int) -> int | None:
    """sendfile until ``most`` bytes went, the file ended, or the socket has had no room for SEND_LINGER
    seconds; None when nothing could be sent at all."""
    done = 0
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while done < most:
        try:
            n = os.sendfile(sock, fd, offset + done, most - done)
        except BlockingIOError:
            if not poller.poll(SEND_LINGER * 1000):
                return done or None
            continue
        if n == 0:
            return done
        done += n
    return done


# -- directories as zip ---------------------------------------------------------


class _FileChunks:
    """The bytes of one open file, read in big chunks; owns the descriptor."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.left = size

    def __iter__(self) -> Iterator[bytes]:
        try:
            while self.left > 0:
                chunk = os.read(self.fd, min(READ_CHUNK, self.left))
                if not chunk:  # shrank while we read it
                    break
                self.left -= len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _arcname(name: str) -> str:
    """A name for the zip: undecodable bytes of the on-disk name become U+FFFD instead of failing."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def zip_tree(top_fd: int) -> Generator[bytes, None, None]:
    """The zip of the directory open at ``top_fd`` (owned and closed here), produced while walking.

    Directories (empty ones too) become ``name/`` members, regular files their
    content; symlinks, sockets, FIFOs and devices are left out. Each file is
    opened relative to its parent's descriptor with O_NOFOLLOW, so an entry
    swapped for a link during the walk is skipped, not followed.
    """
    zs = ZipStream(compress_type=ZIP_STORED)
    stack: list[tuple[int, str, Iterator[os.DirEntry[str]]]] = []
    current: _FileChunks | None = None
    try:
        stack.append((top_fd, "", os.scandir(top_fd)))
        while stack:
            dir_fd, prefix, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                it.close()  # type: ignore[attr-defined]
                os.close(dir_fd)
                stack.pop()
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            arc = prefix + _arcname(entry.name)
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EACCES):
                        continue
                    raise
                try:
                    stack.append((sub, arc + "/", os.scandir(sub)))
                except BaseException:
                    os.close(sub)
                    raise
                zs.mkdir(arc)
            elif stat.S_ISREG(st.st_mode):
                try:
                    fd, fst = open_entry_at(dir_fd, entry.name)  # never blocks (backends.safeopen)
                except NotRegular:
                    continue
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EACCES):
                        continue
                    raise
                current = _FileChunks(fd, fst.st_size)
                zs.add(current, arc, size=fst.st_size)
            else:
                continue  # symlinks and special files are left out
            yield from zs.all_files()
            if current is not None:
                current.close()
                current = None
        yield from zs.footer()
    finally:
        if current is not None:
            current.close()
        for dir_fd, _, it in stack:
            it.close()  # type: ignore[attr-defined]
            os.close(dir_fd)


def _next_batch(gen: Generator[bytes, None, None]) -> bytes:
    parts: list[bytes] = []
    n = 0
    for chunk in gen:
        parts.append(chunk)
        n += len(chunk)
        if n >= BATCH:
            break
    return b"".join(parts)


async def send_zip(request: web.Request, dir_fd: int, name: str, *, no_cache: bool) -> web.StreamResponse:
    """Answer with a zip of the directory open at ``dir_fd`` (ownership passes to the zip walker)."""
    headers = _common_headers(f"{name}.zip", no_cache)
    headers["Content-Type"] = "application/zip"
    resp = web.StreamResponse(headers=headers)
    if request.method == "HEAD":
        os.close(dir_fd)
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    gen = zip_tree(dir_fd)
    try:
        first = await asyncio.to_thread(_next_batch, gen)  # errors before the first byte still get a proper answer
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        batch = first
        while batch:
            try:
                await resp.write(batch)
            except (ConnectionError, RuntimeError) as e:
                log.debug("zip download of %s aborted: %s", name, e)
                return resp
            batch = await asyncio.to_thread(_next_batch, gen)
        await resp.write_eof()
        return resp
    except OSError as e:
        if not resp.prepared:
            raise
        # headers are out: the only honest signal left is an incomplete chunked stream
        log.warning("zip download of %s failed mid-stream: %s", name, e)
        if request.transport is not None:
            request.transport.close()
        return resp
    finally:
        if inspect.getgeneratorstate(gen) == inspect.GEN_CREATED:
            os.close(dir_fd)  # the walker never started, so it never took the descriptor over
        await asyncio.to_thread(gen.close)
