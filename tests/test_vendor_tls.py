"""The shared vendor REST client: TLS verification as the volume options set it, retries, clean errors."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.vendors.rest import ApplianceError, BasicAuth, RestClient
from tests.simulators.gpfs import GpfsSimulator


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GpfsSimulator, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    (d / "mount").mkdir()
    sim = GpfsSimulator(d / "mount").start(ssl_context=ctx)
    yield sim, cert
    sim.stop()


def _cluster(sim: GpfsSimulator, **kw: object) -> object:
    async def go() -> object:
        client = RestClient(
            "GPFS",
            sim.url + "/scalemgmt/v2",
            auth=BasicAuth("admin", "admin001"),
            retries=1,
            backoff=0.01,
            timeout=5,
            **kw,
        )
        await client.open()
        try:
            return (await client.get("/cluster", op="read cluster info")).body
        finally:
            await client.close()

    return asyncio.run(go())


def test_verification_refuses_an_unknown_certificate(tls_sim: tuple[GpfsSimulator, Path]) -> None:
    sim, _ = tls_sim
    with pytest.raises(
        ApplianceError,
        match=r"GPFS \(https://127\.0\.0\.1:\d+/scalemgmt/v2\): read cluster info "
        r"failed: TLS error",
    ):
        _cluster(sim, verify_ssl=True)


def test_verification_with_the_appliance_ca(tls_sim: tuple[GpfsSimulator, Path]) -> None:
    sim, cert = tls_sim
    body = _cluster(sim, verify_ssl=True, ca_file=str(cert))
    assert body["cluster"]["clusterSummary"]["clusterName"] == "gpfs-sim.example"


def test_verification_off(tls_sim: tuple[GpfsSimulator, Path]) -> None:
    sim, _ = tls_sim
    assert "cluster" in _cluster(sim, verify_ssl=False)


def test_4xx_is_not_retried(tls_sim: tuple[GpfsSimulator, Path]) -> None:
    sim, _ = tls_sim
    before = sim.count("GET", "/filesystems/nope/pools")

    async def go() -> None:
        client = RestClient(
            "GPFS",
            sim.url + "/scalemgmt/v2",
            auth=BasicAuth("admin", "admin001"),
            verify_ssl=False,
            retries=3,
            backoff=0.01,
        )
        await client.open()
        try:
            await client.get("/filesystems/nope/pools", op="list pools")
        finally:
            await client.close()

    with pytest.raises(ApplianceError, match="list pools failed: HTTP 400: Invalid value in 'filesystemName'"):
        asyncio.run(go())
    assert sim.count("GET", "/filesystems/nope/pools") == before + 1
