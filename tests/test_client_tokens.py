"""Forged, expired and misused tokens are refused with a 4xx before any file is read or written."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client_helpers import (
    claims_of,
    download_token,
    head,
    patch,
    sign,
    staged_file,
    staging_dir,
    upload_token,
    vfolder_path,
)
from tests.support import AgentProcess


@pytest.fixture
def cli(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.client_url, timeout=60) as c:
        yield c


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _alg_none(claims: dict) -> str:
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}."


def _tampered(token: str, **changes) -> str:
    header, _, sig = token.split(".")
    return ".".join([header, _b64(json.dumps({**claims_of(token), **changes}).encode()), sig])


def _snapshot(root: Path) -> dict[str, tuple]:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) else None
            snap[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return snap


def _forgeries(agent: AgentProcess, real: str) -> dict[str, str]:
    claims = claims_of(real)
    return {
        "bad-signature": sign(agent, claims, secret="not-the-secret-of-this-agent-at-all-0123"),
        "tampered-claims": _tampered(real, relpath="other.bin"),
        "alg-none": _alg_none(claims),
        "expired": sign(agent, claims, lifetime=-120),
        "wrong-op": sign(agent, {**claims, "op": "delete"}),
        "no-op": sign(agent, {k: v for k, v in claims.items() if k != "op"}),
        "garbage": "not.a.token",
        "empty": "",
    }


def test_forged_upload_tokens_write_nothing(agent, api, cli, vfid):
    root = vfolder_path(agent, vfid)
    (root / "keep.txt").write_bytes(b"keep")
    real = upload_token(api, vfid, "target.bin", 4)
    before = _snapshot(agent.volume_root())
    for name, token in _forgeries(agent, real).items():
        r = patch(cli, token, 0, b"evil")
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        h = head(cli, token)
        assert 400 <= h.status_code < 500, (name, h.status_code)
    assert _snapshot(agent.volume_root()) == before
    assert not (root / "target.bin").exists()
    assert not staged_file(agent, real).exists()
    # the genuine token still works afterwards
    assert patch(cli, real, 0, b"good").status_code == 204
    assert (root / "target.bin").read_bytes() == b"good"


def test_forged_download_tokens_read_nothing(agent, api, cli, vfid):
    root = vfolder_path(agent, vfid)
    secret = b"SECRET-" + os.urandom(8).hex().encode()
    (root / "f.txt").write_bytes(secret)
    real = download_token(api, vfid, "f.txt")
    for name, token in _forgeries(agent, real).items():
        r = cli.get("/download", params={"token": token})
        assert 400 <= r.status_code < 500, (name, r.status_code)
        assert secret not in r.content, name


def test_download_token_cannot_upload_and_upload_token_cannot_download(agent, api, cli, vfid):
    root = vfolder_path(agent, vfid)
    (root / "f.txt").write_bytes(b"original")
    dl = download_token(api, vfid, "f.txt")
    r = patch(cli, dl, 0, b"overwrite")
    assert r.status_code == 403
    assert head(cli, dl).status_code == 403
    up = upload_token(api, vfid, "f.txt", 8)
    r = cli.get("/download", params={"token": up})
    assert r.status_code == 403
    assert b"original" not in r.content
    assert (root / "f.txt").read_bytes() == b"original"
    assert not staging_dir(agent, vfid).exists()


def test_signed_token_for_unknown_session_is_404(agent, api, cli, vfid):
    claims = claims_of(upload_token(api, vfid, "x", 1))
    token = sign(agent, {**claims, "session": "0" * 32})
    r = patch(cli, token, 0, b"x")
    assert r.status_code == 404
    assert r.json()["type"].endswith("/no-such-upload-session")
    assert not (vfolder_path(agent, vfid) / "x").exists()


def test_signed_token_whose_claims_disagree_with_the_session_is_refused(agent, api, cli, vfid, tmp_path):
    claims = claims_of(upload_token(api, vfid, "inside.bin", 3))
    for change in ({"relpath": "../../../../escape.bin"}, {"relpath": "other.bin"}, {"size": 10**6}):
        r = patch(cli, sign(agent, {**claims, **change}), 0, b"abc")
        assert r.status_code == 403, change
    assert not staged_file(agent, sign(agent, claims)).exists()
    assert not any(agent.volume_root().parent.glob("escape.bin"))
