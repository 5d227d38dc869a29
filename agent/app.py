"""The two aiohttp applications: the manager API and the client API."""

from __future__ import annotations

from aiohttp import web

from agent import metrics, openapi
from agent.auth import manager_auth
from agent.context import AGENT_KEY, Agent
from agent.errors import error_middleware
from agent.params import MAX_METADATA
from agent.routes import client, files, folders, quota, service

MANAGER_MAX_BODY = MAX_METADATA + 2**20  # a metadata payload at the cap plus its JSON envelope


def manager_app(agent: Agent) -> web.Application:
    secret = agent.config.api.manager.secret.get_secret_value()
    app = web.Application(
        middlewares=[metrics.middleware("manager"), error_middleware, manager_auth(secret)],
        client_max_size=MANAGER_MAX_BODY,
    )
    app[AGENT_KEY] = agent
    for module in (service, quota, folders, files):
        app.add_routes(module.routes)
    metrics.add_route(app)
    openapi.add_route(app, "manager")
    return app


def client_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[metrics.middleware("client"), error_middleware])
    app[AGENT_KEY] = agent
    app.add_routes(client.routes)
    openapi.add_route(app, "client")
    app.on_response_prepare.append(client.add_cors_headers)
    return app
