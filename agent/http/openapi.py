"""The OpenAPI 3.1 document of a listener, built from its router and the models its handlers declare.

Each handler carries an :class:`agent.http.params.ApiDoc` (set by ``@takes``/``@documented``): the pydantic
model it parses its body with, its query model and its answer model. Walking the aiohttp router
with those gives a document that cannot drift from what the routes validate.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from agent import __version__ as VERSION
from agent.http import answers
from agent.http.auth import AUTH_HEADER, PUBLIC_PATHS
from agent.http.params import ApiDoc, api_doc, documented

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
PROBLEM = {"$ref": "#/components/responses/Problem"}
TITLES = {
    "manager": (
        "storage-agent manager API",
        "Called by the Backend.AI manager; every route but /status, /health, /livez and /readyz needs the token. "
        "A quota scope id is bare (`user-1`: 23.03.5 managers) or typed (`user:<uuid>` / `project:<uuid>`: "
        "23.03.7+ managers, stored under the UUID's hex); a typed id is answered as 23.03.7+ proxies answer.",
    ),
    "client": ("storage-agent client API", "Called by end users with a token from the manager API (tus uploads)."),
}


def build(app: web.Application, listener: str, version: str = "0") -> dict[str, Any]:
    """The document for ``app`` (``listener``: manager | client)."""
    ops: list[tuple[str, str, ApiDoc]] = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        doc = api_doc(route.handler)
        if path is None or doc is None:
            continue
        ops.append((path, route.method.lower(), doc))

    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(answers.Problem, "serialization")]
    for _, _, doc in ops:
        if doc.body is not None:
            models.append((doc.body, "validation"))
        if doc.answer is not None:
            models.append((doc.answer, "serialization"))
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)

    paths: dict[str, dict[str, Any]] = {}
    for path, method, doc in ops:
        paths.setdefault(path, {})[method] = _operation(path, method, doc, refs, listener)
    title, description = TITLES[listener]
    components: dict[str, Any] = {
        "schemas": defs.get("$defs", {}),
        "responses": {
            "Problem": {
                "description": "an error: `msg` names the problem; typed problems are application/problem+json",
                "content": {
                    ctype: {"schema": refs[(answers.Problem, "serialization")]}
                    for ctype in ("application/problem+json", "application/json")
                },
            }
        },
    }
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": dict(sorted(paths.items())),
        "components": components,
    }
    if listener == "manager":
        components["securitySchemes"] = {"managerToken": {"type": "apiKey", "in": "header", "name": AUTH_HEADER}}
        document["security"] = [{"managerToken": []}]
    return document


def _operation(
    path: str, method: str, doc: ApiDoc, refs: dict[Any, Any], listener: str
) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": f"{method}{path.replace('/', '_').replace('-', '_') or '_root'}"}
    if doc.summary:
        op["summary"] = doc.summary
    params = _query_params(doc.query) if doc.query is not None else []
    params += [{"name": h, "in": "header", "required": False, "schema": {"type": "string"}} for h in doc.headers]
    if params:
        op["parameters"] = params
    if doc.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(doc.body, "validation")]}},
        }
    elif doc.raw_body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {doc.raw_body: {"schema": {"type": "string", "format": "binary"}}},
        }
    ok: dict[str, Any] = {"description": "success" if doc.status < 400 else "always an error (deprecated route)"}
    if doc.answer is not None and method != "head":
        ok["content"] = {doc.content_type: {"schema": refs[(doc.answer, "serialization")]}}
    elif doc.status == 200 and method != "head" and doc.content_type != "application/json":
        ok["content"] = {doc.content_type: {"schema": {"type": "string", "format": "binary"}}}
    responses: dict[str, Any] = {str(doc.status): ok if doc.status < 400 else PROBLEM}
    for code, with_answer, when in doc.also:
        other: dict[str, Any] = {"description": when}
        if with_answer and doc.answer is not None:
            other["content"] = {doc.content_type: {"schema": refs[(doc.answer, "serialization")]}}
        responses[str(code)] = other
    responses["4XX"] = PROBLEM
    responses["5XX"] = PROBLEM
    op["responses"] = responses
    if listener == "manager" and path in PUBLIC_PATHS:
        op["security"] = []
    return op


def _query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        alternatives = [s for s in prop.pop("anyOf", []) if s.get("type") != "null"]
        if len(alternatives) == 1:
            prop.update(alternatives[0])  # a query parameter is absent rather than null
        description = prop.pop("description", None)
        prop.pop("title", None)
        prop.pop("default", None)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        out.append(param)
    return out


def add_route(app: web.Application, listener: str) -> None:
    """Serve the listener's document at ``GET /openapi.json`` (built once, on first use)."""

    cache: dict[str, Any] = {}

    @documented(status=200)
    async def openapi_json(request: web.Request) -> web.Response:
        """This document."""
        if not cache:
            cache.update(build(request.app, listener, VERSION))
        return web.json_response(cache)

    app.router.add_get("/openapi.json", openapi_json)


# -- the rendered reference (docs/api.md) -----------------------------------------------------------


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    return str(schema.get("type", "any"))


def _schema_name(content: dict[str, Any] | None) -> str:
    if not content:
        return "-"
    ctype, spec = next(iter(content.items()))
    schema = spec.get("schema", {})
    return _type(schema) if "$ref" in schema else f"`{ctype}`"


def markdown(docs: dict[str, dict[str, Any]]) -> str:
    """A Markdown reference of the documents: routes per listener, then every model's fields."""
    out = [
        "# HTTP API reference",
        "",
        "Generated from the routes' own models by `python -m agent.http.openapi` (a test keeps it current); a",
        "running agent serves the same documents as `GET /openapi.json` on each listener. Every error answer",
        "is a [Problem](#problem).",
        "",
    ]
    schemas: dict[str, Any] = {}
    for listener, doc in docs.items():
        out += [f"## {doc['info']['title']}", "", doc["info"]["description"], ""]
        out += ["| method | path | what | body / query | success |", "|---|---|---|---|---|"]
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if method == "head":
                    continue  # aiohttp answers HEAD for every GET
                body = _schema_name(op.get("requestBody", {}).get("content"))
                if body == "-" and op.get("parameters"):
                    body = ", ".join(f"`{p['name']}`" for p in op["parameters"] if p["in"] == "query") or "-"
                status, answer = next(iter(op["responses"].items()))  # the documented outcome comes first
                what = answer.get("content") and _schema_name(answer["content"])
                auth = " (no auth)" if listener == "manager" and op.get("security") == [] else ""
                out.append(
                    f"| {method.upper()} | `{path}`{auth} | {op.get('summary', '')} | {body} | {status} {what or ''} |"
                )
        out.append("")
        schemas.update(doc["components"]["schemas"])
    out += ["## Models", ""]
    for name in sorted(schemas):
        schema = schemas[name]
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [schema["description"].strip().splitlines()[0], ""]
        props = schema.get("properties")
        if not props:
            out += [f"{_type(schema)}", ""]
            continue
        required = set(schema.get("required", ()))
        out += ["| field | type | required | notes |", "|---|---|---|---|"]
        for field, prop in props.items():
            notes = prop.get("description", "")
            if "default" in prop:
                notes = f"default `{json.dumps(prop['default'])}`; {notes}".rstrip("; ")
            out.append(f"| `{field}` | {_type(prop)} | {'yes' if field in required else ''} | {notes} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    from agent.http.app import documents  # the apps import this module: only as a script, never a cycle

    sys.stdout.write(markdown(documents()))
