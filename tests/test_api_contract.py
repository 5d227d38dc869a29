"""The OpenAPI documents and /metrics of a real agent: valid, complete, true to real answers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from agent.http import openapi
from agent.http.app import client_app, documents, manager_app
from tests.support import AgentProcess, assert_clean_log, make_agent


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = make_agent(Path(tmp_path_factory.mktemp("contract")) / "agent").start()
    yield proc
    proc.stop()
    assert_clean_log(proc)


@pytest.fixture(scope="module")
def docs(served: AgentProcess) -> dict[str, dict[str, Any]]:
    with served.client() as api:
        manager = api.get("/openapi.json")
    client = httpx.get(served.client_url + "/openapi.json")
    assert manager.status_code == 200 and client.status_code == 200
    return {"manager": manager.json(), "client": client.json()}


def _registered(listener: str) -> set[tuple[str, str]]:
    from types import SimpleNamespace

    from pydantic import SecretStr

    from agent.http.drain import Drain

    stand_in: Any = SimpleNamespace(
        config=SimpleNamespace(api=SimpleNamespace(manager=SimpleNamespace(secret=SecretStr("unused")))),
        drain=Drain(),
    )
    app = (manager_app if listener == "manager" else client_app)(stand_in)
    return {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.resource is not None}


def test_served_documents_are_the_rendered_ones_and_docs_api_md_is_current(docs: dict[str, dict[str, Any]]) -> None:
    assert documents() == docs
    committed = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    assert committed == openapi.markdown(docs), "docs/api.md is stale: python -m agent.http.openapi > docs/api.md"


@pytest.mark.parametrize("listener", ["manager", "client"])
def test_document_is_valid_openapi_and_lists_every_route(docs: dict[str, dict[str, Any]], listener: str) -> None:
    doc = docs[listener]
    validate(doc)
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _registered(listener)
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "4XX" in op["responses"] and "5XX" in op["responses"]


def test_document_describes_bodies_queries_and_auth(docs: dict[str, dict[str, Any]]) -> None:
    manager, client = docs["manager"], docs["client"]
    create = manager["paths"]["/quota-scope"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = manager["components"]["schemas"][create["$ref"].rsplit("/", 1)[1]]
    assert {"volume", "qsid"} <= set(schema["required"])
    assert manager["security"] == [{"managerToken": []}]
    assert manager["paths"]["/status"]["get"]["security"] == []
    download = {p["name"]: p for p in client["paths"]["/download"]["get"]["parameters"]}
    assert download["token"]["required"] and download["token"]["in"] == "query"
    assert download["archive"]["schema"] == {"type": "boolean"}
    assert "security" not in client


def test_manager_document_needs_the_token_client_document_does_not(served: AgentProcess) -> None:
    assert httpx.get(served.manager_url + "/openapi.json").status_code == 403
    assert httpx.get(served.client_url + "/openapi.json").status_code == 200


def _check(doc: dict[str, Any], path: str, method: str, response: httpx.Response) -> None:
    """``response`` matches what ``doc`` says ``method path`` answers with its status."""
    responses = doc["paths"][path][method]["responses"]
    spec = responses.get(str(response.status_code)) or responses[f"{str(response.status_code)[0]}XX"]
    if "$ref" in spec:
        spec = doc["components"]["responses"][spec["$ref"].rsplit("/", 1)[1]]
    if "content" not in spec:
        assert not response.content, f"{method} {path} answered a body the document does not describe"
        return
    ctype = response.headers["content-type"].split(";")[0]
    assert ctype in spec["content"], f"{method} {path}: {ctype} not in {list(spec['content'])}"
    schema = spec["content"][ctype]["schema"]
    if schema.get("format") == "binary":
        return
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(response.json())


def test_real_answers_match_the_document(served: AgentProcess, docs: dict[str, dict[str, Any]]) -> None:
    doc = docs["manager"]
    qsid = f"qs-{uuid.uuid4().hex[:8]}"
    vfid = f"{qsid}/{uuid.uuid4().hex}"
    vf = {"volume": "local", "vfid": vfid}
    calls: list[tuple[str, str, Any]] = [
        ("get", "/", None),
        ("get", "/volumes", None),
        ("get", "/volume/hwinfo", {"volume": "local"}),
        ("get", "/volume/performance-metric", {"volume": "local"}),
        ("get", "/folder/fs-usage", {"volume": "local"}),
        ("post", "/quota-scope", {"volume": "local", "qsid": qsid}),
        ("get", "/quota-scope", {"volume": "local", "qsid": qsid}),
        ("post", "/folder/create", vf),
        ("post", "/folder/file/mkdir", {**vf, "relpath": "d"}),
        ("post", "/folder/file/list", {**vf, "relpath": "."}),
        ("get", "/folder/mount", vf),
        ("post", "/folder/metadata", {**vf, "payload": "x"}),
        ("get", "/folder/metadata", vf),
        ("get", "/folder/usage", vf),
        ("get", "/folder/used-bytes", vf),
        ("post", "/folder/file/upload", {**vf, "relpath": "f", "size": 3}),
        ("post", "/folder/file/download", {**vf, "relpath": "d"}),
        ("post", "/folder/file/delete", {**vf, "relpaths": ["d"]}),
        ("get", "/volume/quota", vf),
        ("post", "/folder/file/list", {**vf, "relpath": "../x"}),  # an error answer: the Problem component
        ("get", "/nowhere", None),
    ]
    with served.client() as api:
        for method, path, body in calls:
            r = api.request(method.upper(), path, json=body)
            assert r.status_code < 500, (path, r.text)
            if path == "/nowhere":
                assert r.status_code == 404 and "msg" in r.json()
            else:
                _check(doc, path, method, r)


def test_metrics_need_auth_and_count_requests_by_route(served: AgentProcess) -> None:
    assert httpx.get(served.manager_url + "/metrics").status_code == 403

    def count(text: str, route: str, status: str) -> float:
        pattern = (
            r'^storage_agent_http_requests_total\{listener="manager",method="POST",'
            rf'route="{re.escape(route)}",status="{status}"\}} (\S+)$'
        )
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0

    with served.client() as api:
        before = api.get("/metrics").text
        for _ in range(3):
            assert api.post("/folder/file/list", json={"volume": "local"}).status_code == 400
        api.post("/quota-scope", json={"volume": "local", "qsid": f"m-{uuid.uuid4().hex[:8]}"})
        assert api.get("/no/such/route/" + uuid.uuid4().hex).status_code == 404
        r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    assert count(after, "/folder/file/list", "400") == count(before, "/folder/file/list", "400") + 3
    assert count(after, "/quota-scope", "204") >= 1
    assert 'route="<unmatched>"' in after and "/no/such/route" not in after  # canonical paths only
    assert re.search(r'^storage_agent_http_request_duration_seconds_bucket\{.*route="/quota-scope"', after, re.M)
    m = re.search(r"^storage_agent_catalog_write_seconds_count (\S+)$", after, re.M)
    assert m and float(m.group(1)) >= 1  # the quota scope was recorded in the catalogue
    for name in ("storage_agent_upload_sessions_open", "storage_agent_usage_vfolders_stale", "process_open_fds"):
        assert re.search(rf"^{name}(\{{.*\}})? \S+$", after, re.M), name


def test_metrics_count_client_requests_and_upload_bytes(served: AgentProcess) -> None:
    with served.client() as api:
        qsid = f"up-{uuid.uuid4().hex[:8]}"
        vfid = f"{qsid}/{uuid.uuid4().hex}"
        assert api.post("/quota-scope", json={"volume": "local", "qsid": qsid}).status_code == 204
        assert api.post("/folder/create", json={"volume": "local", "vfid": vfid}).status_code == 204
        token = api.post("/folder/file/upload", json={"volume": "local", "vfid": vfid, "relpath": "f", "size": 5})
        sessions = api.get("/metrics").text
        r = httpx.patch(
            served.client_url + "/upload",
            params={"token": token.json()["token"]},
            headers={"Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
            content=b"hello",
        )
        assert r.status_code == 204, r.text
        after = api.get("/metrics").text

    def value(text: str, name: str) -> float:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    open_sessions = "storage_agent_upload_sessions_open"
    assert value(sessions, open_sessions) >= 1
    # a finished session is no longer open, although its row stays until it expires
    assert value(after, open_sessions) == value(sessions, open_sessions) - 1
    assert value(after, "storage_agent_python_allocated_blocks") > 0
    assert value(after, "storage_agent_sqlite_memory_bytes") > 0  # the catalogue's connections hold page caches
    received = "storage_agent_upload_received_bytes_total"
    assert value(after, received) >= value(sessions, received) + 5
    assert re.search(r'storage_agent_http_requests_total\{listener="client",method="PATCH",route="/upload"', after)
