"""The two aiohttp applications: the manager API and the client API."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiohttp import web
from pydantic import SecretStr

from agent import __version__
from agent.http import drain, metrics, openapi
from agent.http.auth import manager_auth
from agent.http.errors import error_middleware
from agent.http.params import MAX_METADATA
from agent.http.routes import client, files, folders, quota, service
from agent.runtime.context import AGENT_KEY, Agent

MANAGER_MAX_BODY = MAX_METADATA + 2**20  # a metadata payload at the cap plus its JSON envelope


def manager_app(agent: Agent) -> web.Application:
    secret = agent.config.api.manager.secret.get_secret_value()
    app = web.Application(
        middlewares=[drain.middleware, metrics.middleware("manager"), error_middleware, manager_auth(secret)],
        client_max_size=MANAGER_MAX_BODY,
    )
    app[AGENT_KEY] = agent
    app[drain.DRAIN_KEY] = agent.drain
    for module in (service, quota, folders, files):
        app.add_routes(module.routes)
    metrics.add_route(app)
    openapi.add_route(app, "manager")
    return app


def client_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[drain.middleware, metrics.middleware("client"), error_middleware])
    app[AGENT_KEY] = agent
    app[drain.DRAIN_KEY] = agent.drain
    app.add_routes(client.routes)
    openapi.add_route(app, "client")
    app.on_response_prepare.append(client.add_cors_headers)
    return app


def documents() -> dict[str, dict[str, Any]]:
    """Both listeners' OpenAPI documents, built from the apps without a running agent (for docs/api.md)."""
    stand_in: Any = SimpleNamespace(
        config=SimpleNamespace(api=SimpleNamespace(manager=SimpleNamespace(secret=SecretStr("unused")))),
        drain=drain.Drain(),
    )
    return {
        "manager": openapi.build(manager_app(stand_in), "manager", __version__),
        "client": openapi.build(client_app(stand_in), "client", __version__),
    }
