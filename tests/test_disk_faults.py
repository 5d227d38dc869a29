"""Disk full and read-only, on a small loop-mounted ext4 used as a vfs volume, through a real agent.

- ENOSPC (blocks or inodes): uploads, clones, mkdir, folder and scope creation answer a 4xx that names the
  cause (``not-enough-space``, errno 28) and publish nothing partial. An upload keeps the bytes that reached
  the disk durably (HEAD reports them) and resumes once there is room; a clone leaves no destination and no
  ``.staging`` leftovers, whether refused up front or cut off mid-copy.
- Read-only: the filesystem remounted ``ro`` under the running agent turns the volume ``degraded`` in
  hwinfo; every write answers a clear error saying the volume is read-only; reads keep working; remounted
  ``rw``, it is healthy again and an interrupted upload completes.

Every answer is checked to be no 500, and the agent log to hold no traceback.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client_helpers import (
    MiB,
    create_vfolder,
    download_token,
    head,
    patch,
    staged_file,
    upload_token,
    vfolder_path,
)
from tests.support import AgentProcess, assert_clean_log, make_agent

IMAGE_SIZE = "96M"
INODES = 2048
BLOCK = 4096
MKFS = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-m", "0", "-N", str(INODES),
        "-E", "lazy_itable_init=0,lazy_journal_init=0"]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "loop mounts need root"
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "the kernel has no loop device support (/dev/loop-control missing)"
    if "ext4" not in Path("/proc/filesystems").read_text().split():
        return "the kernel has no ext4 support"
    return None


REASON = _why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no loop-mounted ext4: {REASON}")


# -- the filesystem --------------------------------------------------------------------------------


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _remount_read_only(mnt: Path) -> None:
    """``mount -o remount,ro``, retried while the kernel says busy: a file open for writing (an upload's
    background fdatasync holds the staged file for a moment) makes a read-only remount fail with EBUSY,
    as it would for an administrator."""
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        if "busy" not in r.stderr.lower() or time.monotonic() > deadline:
            raise AssertionError(f"remount,ro failed: {r.stderr.strip()}")
        time.sleep(0.1)


def _umount(mnt: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0 or not os.path.ismount(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if REASON:
        pytest.skip(REASON)
    work = tmp_path_factory.mktemp("ext4")
    image, mnt = work / "ext4.img", work / "mnt"
    mnt.mkdir()
    _run("truncate", "-s", IMAGE_SIZE, str(image))
    _run(*MKFS, str(image))
    _run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        if os.path.ismount(mnt):
            _umount(mnt)
        out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)
        image.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def agent(mnt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = mnt / "vol"
    root.mkdir()
    (root / "version.txt").write_text("3\n")
    proc = make_agent(tmp_path_factory.mktemp("agent"), volumes={"local": {"backend": "vfs", "path": str(root)}})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
    assert_clean_log(proc)


@pytest.fixture(scope="module")
def api(agent: AgentProcess) -> Iterator[httpx.Client]:
    with agent.client() as c:
        yield c


@pytest.fixture(scope="module")
def cli(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def restored(mnt: Path, agent: AgentProcess) -> Iterator[None]:
    """Each test leaves the disk writable and empty of fillers, and the agent log clean."""
    try:
        yield
    finally:
        if _read_only(mnt):
            _run("mount", "-o", "remount,rw", str(mnt))
        for p in mnt.glob("filler-*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        settle(mnt)
    assert_clean_log(agent)


def _read_only(mnt: Path) -> bool:
    return bool(os.statvfs(mnt).f_flag & os.ST_RDONLY)


def settle(mnt: Path) -> None:
    """Commit the journal: ext4 reuses blocks freed by an unlink only once its transaction is committed."""
    _run("sync", "-f", str(mnt))


def free_bytes(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def fill(mnt: Path, leave: int = 0) -> Path:
    """Allocate filler files (outside the volume root) until ``leave`` bytes or less are free (0: none)."""
    d = mnt / f"filler-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    for i in range(16):  # a file that cannot grow (no room for its extent tree) leaves its last blocks to the next
        fd = os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while True:
                room = free_bytes(mnt) - leave
                chunk = MiB if room >= MiB else BLOCK
                if room < chunk and (leave or room <= 0):
                    break
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(fd)
        if free_bytes(mnt) - leave < BLOCK:
            break
    if not leave:
        assert free_bytes(mnt) == 0
    return d


def fill_inodes(mnt: Path, leave: int = 0) -> Path:
    """Use up inodes with empty files until ``leave`` or fewer are free."""
    d = mnt / f"filler-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    i = 0
    while os.statvfs(mnt).f_favail > leave:
        try:
            os.close(os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            break
        i += 1
    return d


# -- answers -----------------------------------------------------------------------------------------

SERVED: list[int] = []  # every status code this module saw, checked for 500s at the end


def call(api: httpx.Client, method: str, path: str, **body: object) -> httpx.Response:
    body.setdefault("volume", "local")
    r = api.request(method, path, json=body)
    SERVED.append(r.status_code)
    assert r.status_code < 500, f"{method} {path}: {r.status_code} {r.text}"
    assert "Traceback" not in r.text
    return r


def assert_no_space(r: httpx.Response) -> None:
    SERVED.append(r.status_code)
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["type"].endswith("/not-enough-space"), body
    assert "space" in body["msg"].lower(), body


def assert_read_only(r: httpx.Response) -> None:
    SERVED.append(r.status_code)
    assert r.status_code == 400, r.text  # API.md: filesystem errors of file operations are 400
    body = r.json()
    assert "internal error" not in body["msg"], body
    assert "read-only" in body["msg"], body
    assert body["type"].endswith("/volume-read-only"), body


def scope_dir(agent: AgentProcess, qsid: str) -> Path:
    return agent.volume_root() / qsid


def new_scope(api: httpx.Client) -> str:
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    assert call(api, "POST", "/quota-scope", qsid=qsid).status_code == 204
    return qsid


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- ENOSPC ------------------------------------------------------------------------------------------


def test_upload_that_fills_the_disk_keeps_durable_bytes_and_resumes(agent, api, cli, mnt):
    vfid = create_vfolder(api)
    root = vfolder_path(agent, vfid)
    size = 16 * MiB
    data = os.urandom(size)
    token = upload_token(api, vfid, "models/w.bin", size)
    filler = fill(mnt, leave=6 * MiB)

    r = patch(cli, token, 0, data)
    assert_no_space(r)
    assert r.json()["errno"] == errno.ENOSPC and r.json()["paths"] == ["models/w.bin"]
    offset = int(head(cli, token).headers["Upload-Offset"])
    assert 0 < offset < size
    staged = staged_file(agent, token)
    assert staged.stat().st_size == offset  # HEAD reports exactly the bytes kept, all of them durable
    assert digest(staged.read_bytes()) == digest(data[:offset])
    assert list(root.iterdir()) == []  # nothing published, not even the parent directory

    # still full: refused again, nothing recorded beyond what is on disk
    r = patch(cli, token, offset, data[offset:])
    assert_no_space(r)
    offset = int(head(cli, token).headers["Upload-Offset"])
    assert staged.stat().st_size == offset < size
    assert list(root.iterdir()) == []

    shutil.rmtree(filler)
    settle(mnt)
    r = patch(cli, token, offset, data[offset:])
    assert r.status_code == 204, r.text
    assert r.headers["Upload-Offset"] == str(size)
    assert digest((root / "models" / "w.bin").read_bytes()) == digest(data)
    assert not staged.exists()


def test_publication_blocked_by_a_full_disk_completes_once_there_is_room(agent, api, cli, mnt):
    vfid = create_vfolder(api)
    root = vfolder_path(agent, vfid)
    size = 10_000  # the last byte lands in a block already allocated: only the parent directories need room
    data = os.urandom(size)
    token = upload_token(api, vfid, "deep/er/f.bin", size)
    assert patch(cli, token, 0, data[:-1]).status_code == 204
    filler = fill(mnt)

    r = patch(cli, token, size - 1, data[-1:])
    assert_no_space(r)
    assert r.json()["errno"] == errno.ENOSPC
    assert list(root.iterdir()) == []
    assert staged_file(agent, token).read_bytes() == data  # every byte kept for the publication
    h = head(cli, token)  # never "complete" while the file is not in place: a tus client would stop there
    SERVED.append(h.status_code)
    assert h.status_code == 400 and "Upload-Offset" not in h.headers, h.headers
    assert list(root.iterdir()) == []

    shutil.rmtree(filler)
    settle(mnt)
    h = head(cli, token)  # HEAD publishes an upload whose bytes have all arrived
    assert h.status_code == 200 and h.headers["Upload-Offset"] == str(size)
    assert (root / "deep" / "er" / "f.bin").read_bytes() == data
    assert not staged_file(agent, token).exists()


def test_clone_that_cannot_fit_is_refused_up_front(agent, api, mnt):
    qsid = new_scope(api)
    src = f"{qsid}/{uuid.uuid4().hex}"
    assert call(api, "POST", "/folder/create", vfid=src).status_code == 204
    (vfolder_path(agent, src) / "big.bin").write_bytes(os.urandom(12 * MiB))
    before = sorted(os.listdir(scope_dir(agent, qsid)))
    fill(mnt, leave=6 * MiB)
    dst = f"{qsid}/{uuid.uuid4().hex}"

    r = call(api, "POST", "/folder/clone", src_volume="local", src_vfid=src, dst_vfid=dst)
    assert_no_space(r)
    assert "not enough free space" in r.json()["msg"]
    assert not vfolder_path(agent, dst).exists()
    assert sorted(os.listdir(scope_dir(agent, qsid))) == before  # no .staging, no dst parents


def test_clone_that_runs_out_of_blocks_mid_copy_leaves_nothing(agent, api, mnt):
    """A sparse source passes the up-front check (it allocates almost nothing) but its copy is dense."""
    qsid, dqsid = new_scope(api), new_scope(api)
    src = f"{qsid}/{uuid.uuid4().hex}"
    assert call(api, "POST", "/folder/create", vfid=src).status_code == 204
    sroot = vfolder_path(agent, src)
    (sroot / "sub").mkdir()
    (sroot / "sub" / "small.txt").write_bytes(b"x" * 5000)
    with open(sroot / "sub" / "sparse.bin", "wb") as f:
        f.truncate(48 * MiB)
    fill(mnt, leave=16 * MiB)
    settle(mnt)
    free_before = free_bytes(mnt)
    dst = f"{dqsid}/{uuid.uuid4().hex}"

    r = call(api, "POST", "/folder/clone", src_volume="local", src_vfid=src, dst_vfid=dst)
    assert_no_space(r)
    assert "ran out of space" in r.json()["msg"], r.text
    assert not vfolder_path(agent, dst).exists()
    assert os.listdir(scope_dir(agent, dqsid)) == []  # no .staging, no half-made parents
    settle(mnt)
    assert free_bytes(mnt) >= free_before - 64 * 1024  # the partial copy's blocks were given back
    assert (sroot / "sub" / "small.txt").read_bytes() == b"x" * 5000


def test_out_of_inodes_everywhere_is_a_named_4xx(agent, api, cli, mnt):
    """No inode left: clone (mid-copy), mkdir, folder create, scope create and a first PATCH all say so."""
    qsid, dqsid = new_scope(api), new_scope(api)
    src = f"{qsid}/{uuid.uuid4().hex}"
    assert call(api, "POST", "/folder/create", vfid=src).status_code == 204
    sroot = vfolder_path(agent, src)
    for i in range(120):
        (sroot / f"e{i:03d}").touch()
    token = upload_token(api, src, "up.bin", 10)
    fill_inodes(mnt, leave=40)
    dst = f"{dqsid}/{uuid.uuid4().hex}"

    r = call(api, "POST", "/folder/clone", src_volume="local", src_vfid=src, dst_vfid=dst)
    assert_no_space(r)
    assert "ran out of space" in r.json()["msg"], r.text  # past the up-front check: cut off mid-copy
    assert not vfolder_path(agent, dst).exists()
    assert os.listdir(scope_dir(agent, dqsid)) == []

    fill_inodes(mnt)
    r = call(api, "POST", "/folder/file/mkdir", vfid=src, relpath="newdir")
    assert_no_space(r)
    assert r.json()["errno"] == errno.ENOSPC and r.json()["paths"] == ["newdir"]
    assert_no_space(call(api, "POST", "/folder/create", vfid=f"{qsid}/{uuid.uuid4().hex}"))
    assert_no_space(call(api, "POST", "/quota-scope", qsid=f"qs-{uuid.uuid4().hex[:8]}"))
    r = patch(cli, token, 0, b"0123456789")
    assert_no_space(r)
    assert head(cli, token).headers["Upload-Offset"] == "0"
    assert not (sroot / "up.bin").exists()
    assert ".staging" not in os.listdir(scope_dir(agent, qsid))
    # reads are unaffected
    r = call(api, "POST", "/folder/file/list", vfid=src, relpath=".")
    assert r.status_code == 200 and len(r.json()["items"]) == 120


def test_mkdir_and_create_on_a_disk_with_no_free_block(agent, api, mnt):
    vfid = create_vfolder(api)
    qsid = vfid.partition("/")[0]
    fill(mnt)
    r = call(api, "POST", "/folder/file/mkdir", vfid=vfid, relpath="a/b", parents=True)
    assert_no_space(r)
    assert r.json()["errno"] == errno.ENOSPC
    assert not (vfolder_path(agent, vfid) / "a").exists()
    new = f"{qsid}/{uuid.uuid4().hex}"
    assert_no_space(call(api, "POST", "/folder/create", vfid=new))
    assert not vfolder_path(agent, new).exists()
    assert call(api, "GET", "/folder/fs-usage").status_code == 200


# -- read-only ---------------------------------------------------------------------------------------


def test_read_only_remount_degrades_refuses_writes_and_keeps_reads(agent, api, cli, mnt):
    vfid = create_vfolder(api)
    qsid = vfid.partition("/")[0]
    root = vfolder_path(agent, vfid)
    content = os.urandom(300_000)
    token = upload_token(api, vfid, "data/a.bin", len(content))
    assert patch(cli, token, 0, content).status_code == 204
    half = os.urandom(2 * MiB)
    pending = upload_token(api, vfid, "data/b.bin", len(half))
    assert patch(cli, pending, 0, half[:MiB]).status_code == 204
    assert call(api, "GET", "/volume/hwinfo").json()["status"] == "healthy"

    _remount_read_only(mnt)
    info = call(api, "GET", "/volume/hwinfo").json()
    assert info["status"] == "degraded" and "read-only" in info["status_info"], info

    # writes: a clear refusal each
    assert_read_only(call(api, "POST", "/folder/file/mkdir", vfid=vfid, relpath="new"))
    assert_read_only(call(api, "POST", "/folder/create", vfid=f"{qsid}/{uuid.uuid4().hex}"))
    assert_read_only(call(api, "POST", "/quota-scope", qsid=f"qs-{uuid.uuid4().hex[:8]}"))
    assert_read_only(
        call(api, "POST", "/folder/clone", src_volume="local", src_vfid=vfid, dst_vfid=f"{qsid}/{uuid.uuid4().hex}")
    )
    assert_read_only(call(api, "POST", "/folder/file/rename", vfid=vfid, relpath="data/a.bin", new_name="z.bin"))
    assert_read_only(call(api, "POST", "/folder/file/delete", vfid=vfid, relpaths=["data/a.bin"]))
    assert_read_only(call(api, "POST", "/folder/delete", vfid=vfid))
    assert_read_only(patch(cli, pending, MiB, half[MiB:]))
    fresh = upload_token(api, vfid, "c.bin", 3)
    assert_read_only(patch(cli, fresh, 0, b"abc"))

    # reads: all of them work and see the data unchanged
    assert head(cli, pending).headers["Upload-Offset"] == str(MiB)
    r = call(api, "POST", "/folder/file/list", vfid=vfid, relpath="data")
    assert r.status_code == 200 and [i["name"] for i in r.json()["items"]] == ["a.bin"]
    r = api.post("/folder/file/fetch", json={"volume": "local", "vfid": vfid, "relpath": "data/a.bin"})
    assert r.status_code == 200 and r.content == content
    r = cli.get("/download", params={"token": download_token(api, vfid, "data/a.bin")})
    assert r.status_code == 200 and r.content == content
    r = cli.get("/download", params={"token": download_token(api, vfid, "data", archive=True), "archive": "true"})
    assert r.status_code == 200 and r.content[:2] == b"PK"
    for path in ("/folder/usage", "/folder/used-bytes"):
        assert call(api, "GET", path, vfid=vfid).status_code == 200
    assert call(api, "GET", "/folder/fs-usage").status_code == 200
    assert call(api, "GET", "/quota-scope", qsid=qsid).status_code == 200
    assert api.get("/volumes").status_code == 200

    _run("mount", "-o", "remount,rw", str(mnt))
    assert call(api, "GET", "/volume/hwinfo").json() == {**info, "status": "healthy", "status_info": None}
    r = patch(cli, pending, MiB, half[MiB:])
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(half))
    assert (root / "data" / "b.bin").read_bytes() == half
    assert (root / "data" / "a.bin").read_bytes() == content
    assert call(api, "POST", "/folder/file/mkdir", vfid=vfid, relpath="new").status_code == 204


def test_no_answer_was_a_500():
    assert SERVED and 500 not in SERVED
