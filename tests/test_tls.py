"""Both listeners speak TLS when ssl-enabled: a self-signed certificate made here, real clients verifying it."""

from __future__ import annotations

import io
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import certifi
import httpx
import pytest
from tusclient.uploader import Uploader

from tests.client_helpers import MiB, create_vfolder, download_token, upload_token, vfolder_path
from tests.support import AgentProcess, assert_clean_log, make_agent

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is needed to make a cert")


class TlsAgent(AgentProcess):
    @property
    def manager_url(self) -> str:
        return super().manager_url.replace("http://", "https://")

    @property
    def client_url(self) -> str:
        return super().client_url.replace("http://", "https://")


def _self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_both_listeners_serve_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx (also in AgentProcess.start) trusts our cert
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # tuspy goes through requests
    tls = {"ssl-enabled": True, "ssl-cert": str(cert), "ssl-privkey": str(key)}
    plain = make_agent(tmp_path / "agent")
    plain.config["api"]["client"].update(tls)
    plain.config["api"]["manager"].update(tls)
    agent = TlsAgent(plain.workdir, plain.config).start()
    try:
        # plain HTTP is not answered on either port
        for url in (agent.manager_url, agent.client_url):
            with pytest.raises(httpx.HTTPError):
                httpx.get(url.replace("https://", "http://") + "/status", timeout=5)
        # and a client that trusts only the public CAs refuses the certificate
        host, port = "127.0.0.1", int(agent.client_url.rsplit(":", 1)[1])
        with socket.create_connection((host, port), timeout=5) as raw, pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context(cafile=certifi.where()).wrap_socket(raw, server_hostname=host)

        with agent.client() as api:
            assert api.get("/").json() == {"status": "ok"}
            vfid = create_vfolder(api)
            data = os.urandom(3 * MiB + 17)
            token = upload_token(api, vfid, "tls/up.bin", len(data))
            url = str(httpx.URL(agent.client_url + "/upload", params={"token": token}))
            Uploader(file_stream=io.BytesIO(data), url=url, chunk_size=MiB).upload()
            assert (vfolder_path(agent, vfid) / "tls" / "up.bin").read_bytes() == data
            dl = download_token(api, vfid, "tls/up.bin")
        with httpx.Client(base_url=agent.client_url, timeout=60) as cli:
            r = cli.get("/download", params={"token": dl})  # over TLS the file goes through asyncio's read fallback
            assert r.status_code == 200 and r.content == data
            r = cli.get("/download", params={"token": dl}, headers={"Range": "bytes=100-199"})
            assert r.status_code == 206 and r.content == data[100:200]
    finally:
        agent.stop()
    assert_clean_log(agent)
